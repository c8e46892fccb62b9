//! Winograd F(m x m, 3x3) convolution on padded NHWC activations (AVX2 + FMA), with bias,
//! ReLU and the 2x2 max-pool fused into the output transform.
//!
//! # Why
//! A 3x3 convolution producing an `m x m` output tile reads an `n x n` input tile (`n = m + 2`).
//! Winograd's minimal filtering computes that tile as `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: after
//! transforming the input tile (`V = Bᵀ d B`) and the filter (`U = G g Gᵀ`, once, at
//! construction), each of the `n²` tile positions `ξ` is an ordinary matrix product over
//! channels, `M[ξ] (tiles x cout) = V[ξ] (tiles x cin) * U[ξ] (cin x cout)`. That takes `n²`
//! multiply-adds per output tile and channel pair instead of `9 m²`: 2.25x fewer for
//! F(2x2, 3x3) (`n = 4`), 4x fewer for F(4x4, 3x3) (`n = 6`). The transforms are additions
//! (and small constant multiplies), linear in channels, not in `cin * cout`.
//!
//! # Accuracy
//! The price is rounding: F(2x2) uses only 0, ±1 and ±1/2 and stays close to the direct sum;
//! F(4x4)'s larger constants (up to 8 in `A`, 5 in `B`) lose a few more bits. Both variants'
//! errors are measured by `tests/kernels.rs` (random layers) and `tests/parity.rs` (real VGG16
//! features against PyTorch), and reported in BENCHMARKS.md. The filter transform is done in
//! f64 and rounded once.
//!
//! # Schedule (one image, one layer)
//! 1. Tile rows are taken in blocks whose transformed input `V` (`[tile][ξ][cin]`, `n²`
//!    times the input tile's floats) fits [`V_BUDGET`] bytes, a share of L3; the small deep
//!    layers fit whole.
//! 2. Input transform of the block, tiles spread over the threads.
//! 3. Work items = (16 output channels `j`) x (sub-range of [`sub_tiles`] tiles): for each `ξ`,
//!    the AVX2 micro-kernel (6 tiles x 16 channels, 12 ymm accumulators, weights
//!    `[j][ξ][cin][16]` read contiguously) fills `M [tile][ξ][16]`, still in L2 when the output
//!    transform turns it into the output tiles, adds the bias, applies ReLU and, when pooling,
//!    the 2x2 max, and writes straight into the next layer's padded buffer.
//!
//! Tiles that overhang the image (odd sizes, or sizes not a multiple of `m`) read zeros for
//! rows and columns past the padded buffer and drop the outputs past the image; outputs
//! inside the image only ever read real padded pixels, so they are exact Winograd values.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::conv::{output_hw, padded_len};
use crate::direct::BLOCK;

/// Which Winograd tile size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// F(2x2, 3x3): 4x4 input tiles, 16 products per tile instead of 36.
    F2x2,
    /// F(4x4, 3x3): 6x6 input tiles, 36 products per tile instead of 144.
    F4x4,
}

impl Tile {
    /// Input tile side `n`.
    pub fn n(self) -> usize {
        match self {
            Tile::F2x2 => 4,
            Tile::F4x4 => 6,
        }
    }

    /// Output tile side `m`.
    pub fn m(self) -> usize {
        self.n() - 2
    }
}

// Transform matrices (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016),
// for cross-correlation (what PyTorch's conv computes). Interpolation points 0, ±1 (F2x2) and
// 0, ±1, ±2, ∞ (F4x4).
const BT2: [[f32; 4]; 4] = [
    [1.0, 0.0, -1.0, 0.0],
    [0.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, -1.0],
];
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
const AT2: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];

const BT4: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const AT4: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// Bytes of transformed input per block of tile rows: a quarter of a 32 MB L3, so that the
/// block, a deep layer's transformed weights (16.8 MB for F2x2 at 512x512) and the output
/// mostly stay there. The 28x28 and 14x14 layers fit whole; the 224x224 layer takes 17 of its
/// 112 tile rows (F2x2) per block.
const V_BUDGET: usize = 8 << 20;

/// Tiles per work item: their `M` (`tiles x n² x 16` floats, 96 KB / 216 KB) stays in L2
/// between the products and the output transform, and the weights of one `(j, ξ)` pair
/// (`cin x 16`) are reused by `tiles / 6` micro-kernel calls.
fn sub_tiles(tile: Tile) -> usize {
    match tile {
        Tile::F2x2 => 96,
        Tile::F4x4 => 48,
    }
}

/// Output positions per micro-kernel call.
const ROWS: usize = 6;

/// Whether this CPU can run the Winograd path (its micro-kernel and transforms are AVX2+FMA).
pub fn available() -> bool {
    crate::direct::available()
}

/// A layer's filters, transformed and packed for one Winograd variant.
#[derive(Clone, Debug)]
pub struct Winograd {
    tile: Tile,
    cin: usize,
    cout: usize,
    /// `U` packed as `[cout / 16][ξ][cin][16]`.
    packed: Vec<f32>,
}

impl Winograd {
    /// Transforms PyTorch-layout weights `[cout, cin, 3, 3]` (`U = G g Gᵀ` in f64).
    ///
    /// # Panics
    /// If `cout % 16 != 0` or the weight length is not `cout * cin * 9` (callers check).
    pub fn new(weight_oihw: &[f32], cin: usize, cout: usize, tile: Tile) -> Self {
        assert!(cout.is_multiple_of(BLOCK), "winograd needs cout % 16 == 0");
        assert_eq!(weight_oihw.len(), cout * cin * 9, "winograd weights");
        let n = tile.n();
        let g: &[[f64; 3]] = match tile {
            Tile::F2x2 => &G2,
            Tile::F4x4 => &G4,
        };
        let mut packed = vec![0.0f32; n * n * cin * cout];
        for o in 0..cout {
            let (j, lane) = (o / BLOCK, o % BLOCK);
            for c in 0..cin {
                let k = &weight_oihw[(o * cin + c) * 9..][..9];
                // t = G k (n x 3), then u = t Gᵀ (n x n).
                let mut t = vec![[0.0f64; 3]; n];
                for (a, row) in t.iter_mut().enumerate() {
                    for (col, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|i| g[a][i] * f64::from(k[i * 3 + col])).sum();
                    }
                }
                for (a, ta) in t.iter().enumerate() {
                    for (b, gb) in g.iter().enumerate() {
                        let u: f64 = (0..3).map(|col| ta[col] * gb[col]).sum();
                        let xi = a * n + b;
                        packed[((j * n * n + xi) * cin + c) * BLOCK + lane] = u as f32;
                    }
                }
            }
        }
        Self {
            tile,
            cin,
            cout,
            packed,
        }
    }

    /// The tile variant.
    pub fn tile(&self) -> Tile {
        self.tile
    }

    /// Runs the layer on one padded image: `out = maxpool2x2?(ReLU(conv3x3(input) + bias))`.
    ///
    /// # Shapes
    /// As [`crate::Conv3x3::forward_padded`]: `input` `padded_len(h, w, cin)`, `out`
    /// `padded_len(ho, wo, cout)`, fully overwritten (borders zeroed).
    ///
    /// # Panics
    /// On wrong buffer lengths or a CPU without AVX2/FMA (callers check [`available`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_padded(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        pool: bool,
        bias: &[f32],
        out: &mut [f32],
        parallel: bool,
    ) {
        assert!(available(), "winograd needs AVX2 and FMA");
        let (cin, cout) = (self.cin, self.cout);
        let (ho, wo) = output_hw(h, w, pool);
        assert_eq!(input.len(), padded_len(h, w, cin), "winograd input buffer");
        assert_eq!(
            out.len(),
            padded_len(ho, wo, cout),
            "winograd output buffer"
        );
        assert_eq!(bias.len(), cout, "winograd bias");
        zero_borders(out, ho, wo, cout);
        if ho == 0 || wo == 0 {
            return;
        }
        let geo = Geometry::new(self.tile, h, w, pool, cin, cout);
        // The block buffer is taken out of the thread-local slot for the call (a nested call on
        // the same thread, e.g. from a rayon worker that steals another image, gets its own).
        let mut v = V_SCRATCH.with(|s| s.take());
        let per_row = geo.nn * geo.tw * cin;
        let rows_per_block = (V_BUDGET / 4 / per_row).clamp(1, geo.th);
        v.resize(rows_per_block * per_row, 0.0);
        let zeros = vec![0.0f32; cin];
        let dst = SyncPtr(out.as_mut_ptr());
        let mut ty0 = 0;
        while ty0 < geo.th {
            let rows = rows_per_block.min(geo.th - ty0);
            let tiles = rows * geo.tw;
            let vblock = SyncPtr(v.as_mut_ptr());
            // Input transform, one tile row per item.
            for_each(rows, parallel, |r| {
                // SAFETY: item r writes only tile row r of the block (tiles r * tw .. (r + 1) * tw,
                // each nn * cin floats), inside `v`, which holds rows_per_block such rows.
                unsafe {
                    let row = vblock.get().add(r * per_row);
                    self.input_row(input, &zeros, &geo, ty0 + r, row);
                }
            });
            // Products and output transform, one (channel block, tile range) per item.
            let sub = sub_tiles(self.tile);
            let ranges = tiles.div_ceil(sub);
            for_each(ranges * (cout / BLOCK), parallel, |item| {
                let (s, j) = (item / (cout / BLOCK), item % (cout / BLOCK));
                let t0 = s * sub;
                let t1 = (t0 + sub).min(tiles);
                // SAFETY: the block's V is complete (the input transform returned) and only read
                // here; the item writes output channels j * 16 .. j * 16 + 16 of the pixels of
                // tiles ty0 * tw + t0 .. ty0 * tw + t1, which no other item writes.
                unsafe { self.products(vblock.get(), &geo, ty0, t0, t1, j, bias, dst.get()) };
            });
            ty0 += rows;
        }
        V_SCRATCH.with(|s| s.replace(v));
    }

    /// Transforms tile row `ty` (`tw` tiles) into `dst` (`[tile][ξ][cin]`).
    ///
    /// # Safety
    /// `dst` valid for `tw * nn * cin` writes; AVX2+FMA available.
    unsafe fn input_row(
        &self,
        input: &[f32],
        zeros: &[f32],
        geo: &Geometry,
        ty: usize,
        dst: *mut f32,
    ) {
        // SAFETY: forwarded.
        unsafe {
            match self.tile {
                Tile::F2x2 => input_row_avx2::<4>(&BT2, input, zeros, geo, ty, dst),
                Tile::F4x4 => input_row_avx2::<6>(&BT4, input, zeros, geo, ty, dst),
            }
        }
    }

    /// `M = V * U` for tiles `t0..t1` of the block starting at tile row `ty0`, output channel
    /// block `j`, then the output transform into `out`.
    ///
    /// # Safety
    /// `v` holds the block's transformed tiles; `out` is the padded output buffer, of which
    /// this call writes only the pixels of those tiles, channels `j * 16 .. + 16`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn products(
        &self,
        v: *const f32,
        geo: &Geometry,
        ty0: usize,
        t0: usize,
        t1: usize,
        j: usize,
        bias: &[f32],
        out: *mut f32,
    ) {
        let (cin, nn) = (self.cin, geo.nn);
        let mut m = M_SCRATCH.with(|s| s.take());
        m.resize((t1 - t0) * nn * BLOCK, 0.0);
        // SAFETY (whole block): V rows t0..t1 hold nn * cin floats each; the packed weights of
        // block j are nn * cin * 16 floats; `m` holds (t1 - t0) * nn * 16 floats.
        unsafe {
            for xi in 0..nn {
                let w = self.packed.as_ptr().add((j * nn + xi) * cin * BLOCK);
                let mut t = t0;
                while t < t1 {
                    let a = v.add((t * nn + xi) * cin);
                    let o = m.as_mut_ptr().add(((t - t0) * nn + xi) * BLOCK);
                    let (lda, ldo) = (nn * cin, nn * BLOCK);
                    match t1 - t {
                        1 => gemm_tile::<1>(a, lda, w, cin, o, ldo),
                        2 => gemm_tile::<2>(a, lda, w, cin, o, ldo),
                        3 => gemm_tile::<3>(a, lda, w, cin, o, ldo),
                        4 => gemm_tile::<4>(a, lda, w, cin, o, ldo),
                        5 => gemm_tile::<5>(a, lda, w, cin, o, ldo),
                        _ => gemm_tile::<ROWS>(a, lda, w, cin, o, ldo),
                    }
                    t += ROWS;
                }
            }
            let bias: &[f32; BLOCK] = bias[j * BLOCK..][..BLOCK]
                .try_into()
                .expect("16 bias values");
            for t in t0..t1 {
                let (ty, tx) = (ty0 + t / geo.tw, t % geo.tw);
                let mt = &m[(t - t0) * nn * BLOCK..][..nn * BLOCK];
                let dst = out.add(j * BLOCK);
                match self.tile {
                    Tile::F2x2 => output_tile_avx2::<4, 2>(&AT2, mt, bias, geo, ty, tx, dst),
                    Tile::F4x4 => output_tile_avx2::<6, 4>(&AT4, mt, bias, geo, ty, tx, dst),
                }
            }
        }
        M_SCRATCH.with(|s| s.replace(m));
    }
}

thread_local! {
    /// The transformed-input block of the layer being run by this thread.
    static V_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A work item's `M` (`tiles x n² x 16`).
    static M_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Sizes of one layer's tiling.
struct Geometry {
    nn: usize,
    m: usize,
    /// Padded input rows and columns (reads past them give zeros).
    hp: usize,
    wp: usize,
    cin: usize,
    cout: usize,
    pool: bool,
    /// Conv outputs kept (`h`, `w`, or with floor pooling `2 * ho`, `2 * wo`).
    h_eff: usize,
    w_eff: usize,
    /// Padded output width.
    wpo: usize,
    /// Tile rows and columns.
    th: usize,
    tw: usize,
}

impl Geometry {
    fn new(tile: Tile, h: usize, w: usize, pool: bool, cin: usize, cout: usize) -> Self {
        let (ho, wo) = output_hw(h, w, pool);
        let (h_eff, w_eff) = if pool { (2 * ho, 2 * wo) } else { (h, w) };
        let (n, m) = (tile.n(), tile.m());
        Self {
            nn: n * n,
            m,
            hp: h + 2,
            wp: w + 2,
            cin,
            cout,
            pool,
            h_eff,
            w_eff,
            wpo: wo + 2,
            th: h_eff.div_ceil(m),
            tw: w_eff.div_ceil(m),
        }
    }
}

/// Zeroes the border rows (top, bottom, slack) and border columns of a padded buffer; the
/// Winograd pass writes every interior pixel.
fn zero_borders(out: &mut [f32], ho: usize, wo: usize, c: usize) {
    let wpo = wo + 2;
    out[..wpo * c].fill(0.0);
    out[(ho + 1) * wpo * c..].fill(0.0);
    for y in 1..=ho {
        out[y * wpo * c..][..c].fill(0.0);
        out[(y * wpo + wo + 1) * c..][..c].fill(0.0);
    }
}

/// A raw pointer that may cross threads: the work items of a layer write disjoint parts of one
/// buffer, which the borrow checker cannot see through `par_iter`.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used for disjoint writes / read-only sharing, as argued at each use.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `f(0..count)`, on the rayon pool or in order on this thread.
fn for_each(count: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    if parallel {
        (0..count).into_par_iter().for_each(f);
    } else {
        (0..count).for_each(f);
    }
}

/// Input transform of one tile row. Channels go 8 at a time (one ymm per tile entry once
/// vectorised), the tail one at a time.
///
/// # Safety
/// `dst` valid for `tw * N² * cin` writes; AVX2+FMA available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_row_avx2<const N: usize>(
    bt: &[[f32; N]; N],
    input: &[f32],
    zeros: &[f32],
    geo: &Geometry,
    ty: usize,
    dst: *mut f32,
) {
    let cin = geo.cin;
    for tx in 0..geo.tw {
        // Rows of the padded input for each tile entry (zeros past the buffer).
        let mut src = [[zeros.as_ptr(); N]; N];
        for (i, row) in src.iter_mut().enumerate() {
            let y = geo.m * ty + i;
            if y >= geo.hp {
                continue;
            }
            for (k, p) in row.iter_mut().enumerate() {
                let x = geo.m * tx + k;
                if x < geo.wp {
                    *p = input[(y * geo.wp + x) * cin..][..cin].as_ptr();
                }
            }
        }
        // SAFETY: every `src` pointer has cin readable floats; the tile's dst has N² * cin.
        unsafe {
            let d = dst.add(tx * N * N * cin);
            let mut c = 0;
            while c + 8 <= cin {
                transform_in::<N, 8>(bt, &src, c, d, cin);
                c += 8;
            }
            while c < cin {
                transform_in::<N, 1>(bt, &src, c, d, cin);
                c += 1;
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_row_avx2<const N: usize>(
    _: &[[f32; N]; N],
    _: &[f32],
    _: &[f32],
    _: &Geometry,
    _: usize,
    _: *mut f32,
) {
    unreachable!("winograd::available() is false off x86_64")
}

/// `V = Bᵀ d B` for channels `c .. c + L` of one tile; `V[ξ]` goes to `dst[ξ * cin + c ..]`.
///
/// # Safety
/// `src[i][k]` readable at `c .. c + L`; `dst` writable at `ξ * cin + c .. + L`.
#[inline(always)]
unsafe fn transform_in<const N: usize, const L: usize>(
    bt: &[[f32; N]; N],
    src: &[[*const f32; N]; N],
    c: usize,
    dst: *mut f32,
    cin: usize,
) {
    let mut d = [[[0.0f32; L]; N]; N];
    for (di, si) in d.iter_mut().zip(src) {
        for (dik, &sik) in di.iter_mut().zip(si) {
            // SAFETY: caller's contract.
            *dik = unsafe { *(sik.add(c) as *const [f32; L]) };
        }
    }
    // tmp = Bᵀ d (rows), then V = tmp B (columns). The constants fold after inlining.
    let mut tmp = [[[0.0f32; L]; N]; N];
    for (a, ta) in tmp.iter_mut().enumerate() {
        for (i, di) in d.iter().enumerate() {
            let k = bt[a][i];
            if k != 0.0 {
                for (t, dv) in ta.iter_mut().zip(di) {
                    for l in 0..L {
                        t[l] += k * dv[l];
                    }
                }
            }
        }
    }
    for (a, ta) in tmp.iter().enumerate() {
        for (b, btb) in bt.iter().enumerate() {
            let mut v = [0.0f32; L];
            for (&k, tv) in btb.iter().zip(ta) {
                if k != 0.0 {
                    for l in 0..L {
                        v[l] += k * tv[l];
                    }
                }
            }
            // SAFETY: caller's contract.
            unsafe { *(dst.add((a * N + b) * cin + c) as *mut [f32; L]) = v };
        }
    }
}

/// Output transform of one tile for 16 channels: `Y = Aᵀ M A`, `+ bias`, ReLU, optional 2x2
/// max-pool, written into the padded output at `dst` (already offset to the channel block).
///
/// # Safety
/// `dst` is the padded output buffer (offset by the channel block) with `geo`'s shape.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_tile_avx2<const N: usize, const M: usize>(
    at: &[[f32; N]; M],
    mt: &[f32],
    bias: &[f32; BLOCK],
    geo: &Geometry,
    ty: usize,
    tx: usize,
    dst: *mut f32,
) {
    let mut mm = [[[0.0f32; BLOCK]; N]; N];
    for (i, row) in mm.iter_mut().enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            v.copy_from_slice(&mt[(i * N + k) * BLOCK..][..BLOCK]);
        }
    }
    let mut tmp = [[[0.0f32; BLOCK]; N]; M];
    for (p, tp) in tmp.iter_mut().enumerate() {
        for (i, mi) in mm.iter().enumerate() {
            let k = at[p][i];
            if k != 0.0 {
                for (t, mv) in tp.iter_mut().zip(mi) {
                    for l in 0..BLOCK {
                        t[l] += k * mv[l];
                    }
                }
            }
        }
    }
    let mut y = [[[0.0f32; BLOCK]; M]; M];
    for (p, yp) in y.iter_mut().enumerate() {
        for (q, ypq) in yp.iter_mut().enumerate() {
            for (&k, tv) in at[q].iter().zip(&tmp[p]) {
                if k != 0.0 {
                    for l in 0..BLOCK {
                        ypq[l] += k * tv[l];
                    }
                }
            }
        }
    }
    let store = |oy: usize, ox: usize, v: &[f32; BLOCK]| {
        let mut r = [0.0f32; BLOCK];
        for l in 0..BLOCK {
            r[l] = (v[l] + bias[l]).max(0.0);
        }
        // SAFETY: (oy, ox) is inside the output image, so the 16 floats at this padded pixel
        // and channel block are inside the buffer (caller's contract).
        unsafe { *(dst.add(((oy + 1) * geo.wpo + ox + 1) * geo.cout) as *mut [f32; BLOCK]) = r };
    };
    if geo.pool {
        for pp in 0..M / 2 {
            for qq in 0..M / 2 {
                let (oy, ox) = ((M / 2) * ty + pp, (M / 2) * tx + qq);
                if 2 * oy >= geo.h_eff || 2 * ox >= geo.w_eff {
                    continue;
                }
                let mut v = y[2 * pp][2 * qq];
                for (a, b) in [(0, 1), (1, 0), (1, 1)] {
                    for l in 0..BLOCK {
                        v[l] = v[l].max(y[2 * pp + a][2 * qq + b][l]);
                    }
                }
                store(oy, ox, &v);
            }
        }
    } else {
        for (p, yp) in y.iter().enumerate() {
            for (q, v) in yp.iter().enumerate() {
                let (oy, ox) = (M * ty + p, M * tx + q);
                if oy < geo.h_eff && ox < geo.w_eff {
                    store(oy, ox, v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn output_tile_avx2<const N: usize, const M: usize>(
    _: &[[f32; N]; M],
    _: &[f32],
    _: &[f32; BLOCK],
    _: &Geometry,
    _: usize,
    _: usize,
    _: *mut f32,
) {
    unreachable!("winograd::available() is false off x86_64")
}

/// `out[i][..16] = sum_{c < k} a[i * lda + c] * b[c * 16 ..][..16]` for `i < R`.
///
/// # Safety
/// AVX2+FMA; `a` readable at `i * lda + c`, `b` at `k * 16` floats, `out` writable at
/// `i * ldo .. + 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_tile<const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    k: usize,
    out: *mut f32,
    ldo: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): offsets within the extents of the contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..k {
            let w0 = _mm256_loadu_ps(b.add(c * BLOCK));
            let w1 = _mm256_loadu_ps(b.add(c * BLOCK + 8));
            for (i, s) in acc.iter_mut().enumerate() {
                let v = _mm256_broadcast_ss(&*a.add(i * lda + c));
                s[0] = _mm256_fmadd_ps(v, w0, s[0]);
                s[1] = _mm256_fmadd_ps(v, w1, s[1]);
            }
        }
        for (i, s) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(i * ldo), s[0]);
            _mm256_storeu_ps(out.add(i * ldo + 8), s[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gemm_tile<const R: usize>(
    _: *const f32,
    _: usize,
    _: *const f32,
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("winograd::available() is false off x86_64")
}
