//! A direct ("implicit GEMM") AVX2+FMA micro-kernel for the shifted-view convolution.
//!
//! It computes the same `acc = sum_dy P[dy * wp ..] * W[dy]` as the three GEMMs in
//! [`crate::conv`], but with all `K = 9 * cin` terms of an output tile accumulated in registers:
//! a tile is 6 output positions x 16 output channels (12 ymm accumulators); each step loads 16
//! weights (2 ymm) and broadcasts one input value per position, 12 FMAs for 8 loads. There is no
//! packing of activations (the padded NHWC rows *are* the lhs) and the accumulator is written
//! once instead of being read and written by three GEMMs.
//!
//! Weights are repacked once into `[cout / 16][dy][3 * cin][16]`, so a block of 16 output
//! channels reads one contiguous stream (`36 * cin` floats, 295 KB at `cin = 512`, which stays in
//! a 512 KB L2 while every position of the chunk is visited).
//!
//! Used when the CPU has AVX2 and FMA (checked at run time) and `cout % 16 == 0`; otherwise the
//! `gemm` crate path runs.

/// Output channels per tile.
pub const BLOCK: usize = 16;
/// Output positions per tile.
const ROWS: usize = 6;
/// Input channels per pass over the chunk (see `chunk_avx2`).
const CIN_BLOCK: usize = 128;

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Repacks `[dy][3 * cin][cout]` weights into `[cout / 16][dy][3 * cin][16]`.
pub fn pack(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let k = 3 * cin;
    let mut packed = vec![0.0f32; weight.len()];
    for j in 0..cout / BLOCK {
        for dy in 0..3 {
            for kk in 0..k {
                let src = (dy * k + kk) * cout + j * BLOCK;
                let dst = ((j * 3 + dy) * k + kk) * BLOCK;
                packed[dst..dst + BLOCK].copy_from_slice(&weight[src..src + BLOCK]);
            }
        }
    }
    packed
}

/// Inverse of [`pack`].
pub fn unpack(packed: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let k = 3 * cin;
    let mut weight = vec![0.0f32; packed.len()];
    for j in 0..cout / BLOCK {
        for dy in 0..3 {
            for kk in 0..k {
                let dst = (dy * k + kk) * cout + j * BLOCK;
                let src = ((j * 3 + dy) * k + kk) * BLOCK;
                weight[dst..dst + BLOCK].copy_from_slice(&packed[src..src + BLOCK]);
            }
        }
    }
    weight
}

/// `acc (m x cout) = sum_dy P[dy * wp ..] * W[dy]` for one chunk.
///
/// `input` starts at the chunk's first padded row (row `y0 * wp`); `acc` has `m * cout`
/// elements; `packed` comes from [`pack`].
///
/// # Panics
/// If `input` is shorter than the chunk reads (`(m + 2 * wp + 2) * cin`), or other lengths
/// are off, or the CPU lacks AVX2/FMA.
pub fn chunk(
    input: &[f32],
    wp: usize,
    cin: usize,
    cout: usize,
    m: usize,
    packed: &[f32],
    acc: &mut [f32],
) {
    assert!(available(), "direct kernel needs AVX2 and FMA");
    assert!(cout.is_multiple_of(BLOCK));
    assert_eq!(packed.len(), 9 * cin * cout);
    assert_eq!(acc.len(), m * cout);
    assert!(
        input.len() >= (m + 2 * wp + 2) * cin,
        "input too short for the chunk"
    );
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX2 and FMA were checked above; the lengths checked above bound every access:
        // tile rows q + i < m read input up to ((m - 1) + 2 * wp) * cin + 3 * cin, write acc up
        // to (m - 1) * cout + cout, and read packed blocks j < cout / 16 of 9 * cin * 16 floats.
        unsafe { chunk_avx2(input, wp, cin, cout, m, packed, acc) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2(
    input: &[f32],
    wp: usize,
    cin: usize,
    cout: usize,
    m: usize,
    packed: &[f32],
    acc: &mut [f32],
) {
    let k = 3 * cin;
    // Input channels are taken CIN_BLOCK at a time (the tile adds to its previous partial sums),
    // so that the weights of one 16-channel output block for those channels (9 * 128 * 16 floats,
    // 74 KB) and the chunk's input rows for them stay in L2 together while every tile is visited.
    for c0 in (0..cin).step_by(CIN_BLOCK) {
        let cb = CIN_BLOCK.min(cin - c0);
        let accumulate = c0 > 0;
        for j in 0..cout / BLOCK {
            let w = packed[j * 3 * k * BLOCK + c0 * BLOCK..].as_ptr();
            let mut q = 0;
            while q < m {
                let x = input[q * cin + c0..].as_ptr();
                let out = acc[q * cout + j * BLOCK..].as_mut_ptr();
                let g = Geometry {
                    row_stride: wp * cin,
                    cin,
                    cb,
                    cout,
                    accumulate,
                };
                // SAFETY: see `chunk`; the tile covers rows q .. q + r <= m and channels
                // c0 .. c0 + cb <= cin.
                unsafe {
                    match m - q {
                        1 => tile::<1>(x, w, out, &g),
                        2 => tile::<2>(x, w, out, &g),
                        3 => tile::<3>(x, w, out, &g),
                        4 => tile::<4>(x, w, out, &g),
                        5 => tile::<5>(x, w, out, &g),
                        _ => tile::<ROWS>(x, w, out, &g),
                    }
                }
                q += ROWS;
            }
        }
    }
}

/// Strides and sizes shared by the tiles of a chunk.
struct Geometry {
    /// Floats between padded image rows (`wp * cin`).
    row_stride: usize,
    cin: usize,
    /// Input channels in this block.
    cb: usize,
    cout: usize,
    /// Add to the values already in `out` (later channel blocks) instead of overwriting.
    accumulate: bool,
}

/// One `R x 16` tile over one block of input channels: for each `i < R`,
/// `out[i][..16] (+)= sum_{dy, dx, c < cb} x[dy * row_stride + (i + dx) * cin + c] *
/// w[(dy * 3 + dx) * cin + c][..16]`.
///
/// # Safety
/// AVX2+FMA available; `x` readable at every offset above, `w` at
/// `((dy * 3 + dx) * cin + c) * 16 + 15`, `out` readable and writable at
/// `i * cout .. i * cout + 16` for `i < R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize>(x: *const f32, w: *const f32, out: *mut f32, g: &Geometry) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if g.accumulate {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: row i < R of the tile, inside `out`'s contract.
            unsafe {
                a[0] = _mm256_loadu_ps(out.add(i * g.cout));
                a[1] = _mm256_loadu_ps(out.add(i * g.cout + 8));
            }
        }
    }
    for dy in 0..3 {
        for dx in 0..3 {
            // SAFETY (whole block): offsets stay within the extents in the function's contract.
            unsafe {
                let xd = x.add(dy * g.row_stride + dx * g.cin);
                let wd = w.add((dy * 3 + dx) * g.cin * BLOCK);
                for c in 0..g.cb {
                    let w0 = _mm256_loadu_ps(wd.add(c * BLOCK));
                    let w1 = _mm256_loadu_ps(wd.add(c * BLOCK + 8));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let v = _mm256_broadcast_ss(&*xd.add(i * g.cin + c));
                        a[0] = _mm256_fmadd_ps(v, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(v, w1, a[1]);
                    }
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        // SAFETY: row i < R of the tile, 16 floats, inside `out`'s contract.
        unsafe {
            _mm256_storeu_ps(out.add(i * g.cout), a[0]);
            _mm256_storeu_ps(out.add(i * g.cout + 8), a[1]);
        }
    }
}
