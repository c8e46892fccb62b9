//! One 3x3, stride-1, pad-1 convolution on padded NHWC activations, with bias, ReLU and an
//! optional 2x2/2 max-pool fused into the pass that writes the next layer's input.
//!
//! # Layout
//! An image of `h x w x c` lives in a *padded* buffer of `(h + 2) * (w + 2) + SLACK_ROWS` rows of
//! `c` floats ([`padded_len`]): row `(y + 1) * (w + 2) + (x + 1)` holds pixel `(y, x)`; the
//! border rows and columns are zero, and so are the `SLACK_ROWS` trailing rows.
//!
//! # Why this works
//! Read that buffer as a matrix `P` with one row per padded pixel. With `wp = w + 2`, output
//! pixel `(y, x)` is "row" `q = y * wp + x` of an output matrix `O`, and tap `(dy, dx)` of the
//! 3x3 window reads padded row `q + dy * wp + dx`. The three taps of one kernel row `dy` read
//! rows `q + dy*wp`, `+1`, `+2`, which are *adjacent in memory*: the `3 * cin` floats starting at
//! row `q + dy * wp` are exactly the window row. So, for each `dy`, the lhs is a strided matrix
//! of `M` rows, `K = 3 * cin` columns and row stride `cin` (rows overlap, which a read-only GEMM
//! operand does not mind), and the convolution is three accumulated GEMMs
//! `O += P[dy*wp ..] * W[dy]` with `W[dy]` of shape `(3 * cin) x cout`. No im2col copy is ever
//! made. The price is two junk outputs per image row (`x = w, w + 1`, which wrap around into
//! the next row), about `2 / w` extra work, discarded by the output pass.
//!
//! The output rows are processed in chunks of a few image rows so that the accumulator
//! (`M x cout`) stays in L2 between the three GEMMs, and the output pass (bias, ReLU, max-pool,
//! write into the next padded buffer with its zero border columns) runs while it is still hot.
//! Chunks are independent, which is how one image is spread over threads.
//!
//! Where the CPU has AVX2+FMA and `cout % 16 == 0`, [`crate::direct`]'s micro-kernel computes a
//! chunk's accumulator instead of the three GEMMs (same sums, all in registers). Otherwise the
//! GEMMs are the `gemm` crate's (the one candle uses), which picks AVX-512, AVX2+FMA or a scalar
//! kernel at run time, so nothing here needs `-C target-cpu`.

use rayon::prelude::*;

use crate::bf16::round_slice_bf16;
use crate::direct;
use crate::winograd::{self, Tile, Winograd};

/// How a [`Conv3x3`] computes its sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// The direct sum of the 9 taps (AVX2 micro-kernel or `gemm` crate): the exact path, only
    /// the order of additions differs from a plain convolution.
    #[default]
    Direct,
    /// Winograd F(m x m, 3x3) ([`crate::winograd`]): fewer multiplications, a little more
    /// rounding. Used where the CPU has AVX2+FMA, `cout % 16 == 0`, `cin >= 8` and the layer is
    /// f32; other layers fall back to [`Algorithm::Direct`].
    Winograd(Tile),
}

/// Zero rows after the padded image, read by the junk columns of the last output row.
pub const SLACK_ROWS: usize = 2;

/// Aim for about this many output positions per chunk: the accumulator of a 512-channel layer
/// is then ~1 MiB at most, the three GEMMs are large enough to amortise packing, and a 224-wide
/// layer still has 100+ chunks to share between threads.
const CHUNK_PIXELS: usize = 512;

/// Layers with fewer input channels than this use a small per-chunk im2col (one GEMM, K = 9cin)
/// instead of three shifted-view GEMMs.
const IM2COL_BELOW: usize = 8;

/// `dst (m x n, row-major) (+)= lhs (m x k, row stride lhs_rs, column stride 1) * rhs (k x n,
/// row-major)`, single-threaded (callers parallelise over chunks), on the `gemm` crate.
///
/// # Safety
/// `dst` must be valid for `m * n` writes, `lhs` for reads up to `(m - 1) * lhs_rs + k`, and
/// `rhs` must hold `k * n` elements; `dst` must not overlap the other two.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: &[f32],
) {
    debug_assert_eq!(rhs.len(), k * n);
    // SAFETY: forwarded from the caller's contract; strides describe exactly those extents.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs,
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Elements of a padded NHWC buffer for an `h x w x c` image.
pub fn padded_len(h: usize, w: usize, c: usize) -> usize {
    ((h + 2) * (w + 2) + SLACK_ROWS) * c
}

/// Output size of the layer: `(h, w)` or, with pooling, PyTorch's floor mode `(h / 2, w / 2)`.
pub fn output_hw(h: usize, w: usize, pool: bool) -> (usize, usize) {
    if pool {
        (h / 2, w / 2)
    } else {
        (h, w)
    }
}

/// A 3x3/pad-1 conv layer, weights repacked once for the shifted-view GEMMs.
#[derive(Clone, Debug)]
pub struct Conv3x3 {
    cin: usize,
    cout: usize,
    /// `[dy][dx][cin][cout]`, i.e. for each `dy` a `(3 * cin) x cout` row-major matrix; empty
    /// when `direct` holds the weights instead (one copy is enough: VGG16's are 59 MB).
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// Round everything this layer writes to bf16 (see [`crate::Precision::Bf16`]).
    round_bf16: bool,
    /// Weights for the AVX2 direct kernel ([`crate::direct`]), when it is used.
    direct: Option<Vec<f32>>,
    /// Transformed weights when the layer runs Winograd (then `weight` and `direct` are empty).
    winograd: Option<Winograd>,
}

impl Conv3x3 {
    /// Repacks PyTorch-layout weights `[cout, cin, 3, 3]` and a `[cout]` bias, for the direct
    /// (exact) algorithm.
    pub fn new(
        weight_oihw: &[f32],
        bias: &[f32],
        cin: usize,
        cout: usize,
        round_bf16: bool,
    ) -> crate::Result<Self> {
        Self::with_algorithm(weight_oihw, bias, cin, cout, round_bf16, Algorithm::Direct)
    }

    /// Like [`Self::new`] with a choice of algorithm; a layer that Winograd cannot run (see
    /// [`Algorithm::Winograd`]) uses the direct one.
    pub fn with_algorithm(
        weight_oihw: &[f32],
        bias: &[f32],
        cin: usize,
        cout: usize,
        round_bf16: bool,
        algorithm: Algorithm,
    ) -> crate::Result<Self> {
        if cin == 0 || cout == 0 {
            return Err(crate::Error::Shape(format!(
                "conv with cin={cin}, cout={cout}"
            )));
        }
        crate::error::check_len("conv weight", cout * cin * 9, weight_oihw.len())?;
        crate::error::check_len("conv bias", cout, bias.len())?;
        if let Algorithm::Winograd(tile) = algorithm {
            if !round_bf16
                && cin >= IM2COL_BELOW
                && cout.is_multiple_of(direct::BLOCK)
                && winograd::available()
            {
                return Ok(Self {
                    cin,
                    cout,
                    weight: Vec::new(),
                    bias: bias.to_vec(),
                    round_bf16,
                    direct: None,
                    winograd: Some(Winograd::new(weight_oihw, cin, cout, tile)),
                });
            }
        }
        let mut weight = vec![0.0f32; 9 * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for dy in 0..3 {
                    for dx in 0..3 {
                        let src = ((o * cin + i) * 3 + dy) * 3 + dx;
                        let dst = ((dy * 3 + dx) * cin + i) * cout + o;
                        weight[dst] = weight_oihw[src];
                    }
                }
            }
        }
        if round_bf16 {
            round_slice_bf16(&mut weight);
        }
        let direct =
            (cin >= IM2COL_BELOW && cout.is_multiple_of(direct::BLOCK) && direct::available())
                .then(|| direct::pack(&weight, cin, cout));
        Ok(Self {
            cin,
            cout,
            weight,
            bias: bias.to_vec(),
            round_bf16,
            direct,
            winograd: None,
        })
    }

    /// Forces the `gemm` crate path even where the direct AVX2 kernel would run (tests and
    /// benchmarks compare the two). A Winograd layer is left as it is (it holds only
    /// transformed weights).
    pub fn gemm_only(mut self) -> Self {
        if let Some(packed) = self.direct.take() {
            self.weight = direct::unpack(&packed, self.cin, self.cout);
        }
        self
    }

    /// Whether this layer runs the direct AVX2 kernel (else Winograd or the `gemm` crate).
    pub fn uses_direct_kernel(&self) -> bool {
        self.direct.is_some()
    }

    /// The Winograd variant this layer runs, if any.
    pub fn winograd_tile(&self) -> Option<Tile> {
        self.winograd.as_ref().map(Winograd::tile)
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Rows per chunk for an input `w` wide with `h_eff` contributing rows: about
    /// `CHUNK_PIXELS` positions, but when spreading over threads at least ~4 chunks per thread
    /// (the 14x14 layers would otherwise be one chunk on one thread); a multiple of 2 when
    /// pooling.
    fn rows_per_chunk(w: usize, h_eff: usize, pool: bool, parallel: bool) -> usize {
        let mut rows = (CHUNK_PIXELS / (w + 2)).max(1);
        if parallel {
            let chunks = 4 * rayon::current_num_threads();
            rows = rows.min(h_eff.div_ceil(chunks)).max(1);
        }
        if pool {
            rows = rows.div_ceil(2) * 2;
        }
        rows.min(h_eff.max(1))
    }

    /// Runs the layer on one padded image.
    ///
    /// # Shapes
    /// `input`: `padded_len(h, w, cin)`; `out`: `padded_len(ho, wo, cout)` with
    /// `(ho, wo) = output_hw(h, w, pool)`. `out` is fully overwritten (borders zeroed).
    /// With `parallel`, chunks of rows are spread over the rayon pool.
    ///
    /// # Panics
    /// If the buffer lengths are wrong (a caller bug; the public entry points check shapes).
    pub fn forward_padded(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        pool: bool,
        out: &mut [f32],
        parallel: bool,
    ) {
        if let Some(wg) = &self.winograd {
            wg.forward_padded(input, h, w, pool, &self.bias, out, parallel);
            return;
        }
        let (ho, wo) = output_hw(h, w, pool);
        assert_eq!(input.len(), padded_len(h, w, self.cin), "conv input buffer");
        assert_eq!(
            out.len(),
            padded_len(ho, wo, self.cout),
            "conv output buffer"
        );
        let cout = self.cout;
        let wpo = wo + 2;
        // Zero the top border row, and the bottom border plus slack rows; the output pass
        // writes every interior row in full (its zero border columns included).
        out[..wpo * cout].fill(0.0);
        out[(ho + 1) * wpo * cout..].fill(0.0);
        if ho == 0 || wo == 0 {
            out.fill(0.0);
            return;
        }
        // Input rows that contribute to the output (floor-mode pooling drops an odd last row).
        let h_eff = if pool { 2 * ho } else { h };
        let rows = Self::rows_per_chunk(w, h_eff, pool, parallel);
        let out_rows_per_chunk = if pool { rows / 2 } else { rows };
        let interior = &mut out[wpo * cout..(ho + 1) * wpo * cout];
        let chunk_len = out_rows_per_chunk * wpo * cout;
        let run = |acc: &mut Vec<f32>, (i, dst): (usize, &mut [f32])| {
            let y0 = i * rows;
            let y1 = (y0 + rows).min(h_eff);
            self.chunk(input, w, pool, y0, y1, acc, dst);
        };
        if parallel {
            interior
                .par_chunks_mut(chunk_len)
                .enumerate()
                .for_each_init(Vec::new, run);
        } else {
            let mut acc = Vec::new();
            interior
                .chunks_mut(chunk_len)
                .enumerate()
                .for_each(|item| run(&mut acc, item));
        }
    }

    /// Computes input rows `y0..y1` and writes their (pooled) output rows into `dst`.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &self,
        input: &[f32],
        w: usize,
        pool: bool,
        y0: usize,
        y1: usize,
        acc: &mut Vec<f32>,
        dst: &mut [f32],
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let wp = w + 2;
        let m = (y1 - y0) * wp;
        let k = 3 * cin;
        acc.clear();
        acc.resize(m * cout, 0.0);
        // The last lhs element read for this chunk: row (y1 - 1 + 2) * wp + wp - 1 + 2, col cin - 1.
        let last = ((y1 + 2) * wp + 2) * cin;
        assert!(last <= input.len(), "chunk reads past the padded buffer");
        if let Some(packed) = &self.direct {
            let input = &input[y0 * wp * cin..last];
            direct::chunk(input, wp, cin, cout, m, packed, acc);
        } else if cin < IM2COL_BELOW {
            // Few channels (the RGB layer): three GEMMs with K = 3 * cin would each re-read and
            // re-write the accumulator for very little work, so gather the 9 taps into one
            // `m x 9cin` matrix (small: 27 floats per position) and do one GEMM.
            let k9 = 9 * cin;
            let mut cols = vec![0.0f32; m * k9];
            for (q, row) in cols.chunks_exact_mut(k9).enumerate() {
                for dy in 0..3 {
                    let src = (y0 * wp + q + dy * wp) * cin;
                    row[dy * k..(dy + 1) * k].copy_from_slice(&input[src..src + k]);
                }
            }
            // SAFETY: dst m x cout, lhs m x 9cin, rhs 9cin x cout, all row-major and exactly
            // that long; dst does not alias the inputs.
            unsafe {
                gemm_f32(
                    m,
                    cout,
                    k9,
                    acc.as_mut_ptr(),
                    false,
                    cols.as_ptr(),
                    k9,
                    &self.weight,
                )
            };
        } else {
            for dy in 0..3 {
                let lhs = &input[(y0 + dy) * wp * cin..];
                let rhs = &self.weight[dy * k * cout..(dy + 1) * k * cout];
                // SAFETY: dst is m x cout row-major (acc has m * cout elements). lhs is m x k with
                // row stride cin and column stride 1: its last element is at
                // (m - 1) * cin + k - 1 = ((y1 - y0) * wp + 2) * cin - 1 from `lhs`, i.e. before
                // `last` checked above. rhs is k x cout row-major and exactly that long. Only dst
                // is written, and it does not alias the inputs.
                unsafe { gemm_f32(m, cout, k, acc.as_mut_ptr(), dy > 0, lhs.as_ptr(), cin, rhs) };
            }
        }
        if pool {
            self.pool_pass(acc, w, (y1 - y0) / 2, dst);
        } else {
            self.relu_pass(acc, w, y1 - y0, dst);
        }
    }

    /// `dst` padded rows (with zero border columns) = ReLU(acc + bias), dropping junk columns.
    fn relu_pass(&self, acc: &[f32], w: usize, rows: usize, dst: &mut [f32]) {
        let cout = self.cout;
        let wp = w + 2;
        for r in 0..rows {
            let row = &mut dst[r * wp * cout..(r + 1) * wp * cout];
            row[..cout].fill(0.0);
            row[(w + 1) * cout..].fill(0.0);
            let src = &acc[r * wp * cout..(r * wp + w) * cout];
            let body = &mut row[cout..(w + 1) * cout];
            for (d, s) in body.chunks_exact_mut(cout).zip(src.chunks_exact(cout)) {
                for ((d, &s), &b) in d.iter_mut().zip(s).zip(&self.bias) {
                    *d = (s + b).max(0.0);
                }
            }
            if self.round_bf16 {
                round_slice_bf16(body);
            }
        }
    }

    /// Like [`Self::relu_pass`] with a 2x2/2 max-pool: `ReLU(max(a) + b) = max(ReLU(a + b))`.
    fn pool_pass(&self, acc: &[f32], w: usize, out_rows: usize, dst: &mut [f32]) {
        let cout = self.cout;
        let wp = w + 2;
        let wo = w / 2;
        let wpo = wo + 2;
        for ro in 0..out_rows {
            let row = &mut dst[ro * wpo * cout..(ro + 1) * wpo * cout];
            row[..cout].fill(0.0);
            row[(wo + 1) * cout..].fill(0.0);
            let top = &acc[2 * ro * wp * cout..(2 * ro * wp + 2 * wo) * cout];
            let bot = &acc[(2 * ro + 1) * wp * cout..((2 * ro + 1) * wp + 2 * wo) * cout];
            let body = &mut row[cout..(wo + 1) * cout];
            for ((d, t), b) in body
                .chunks_exact_mut(cout)
                .zip(top.chunks_exact(2 * cout))
                .zip(bot.chunks_exact(2 * cout))
            {
                let (t0, t1) = t.split_at(cout);
                let (b0, b1) = b.split_at(cout);
                for c in 0..cout {
                    let m = t0[c].max(t1[c]).max(b0[c].max(b1[c]));
                    d[c] = (m + self.bias[c]).max(0.0);
                }
            }
            if self.round_bf16 {
                round_slice_bf16(body);
            }
        }
    }
}

/// Copies NCHW image planes into a padded NHWC buffer (zero border and slack).
///
/// # Shapes
/// `image`: `c * h * w`; `out`: `padded_len(h, w, c)`.
pub fn nchw_to_padded(image: &[f32], c: usize, h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(image.len(), c * h * w, "nchw image");
    assert_eq!(out.len(), padded_len(h, w, c), "padded buffer");
    out.fill(0.0);
    let wp = w + 2;
    for ch in 0..c {
        let plane = &image[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                out[((y + 1) * wp + x + 1) * c + ch] = plane[y * w + x];
            }
        }
    }
}

/// Copies the interior of a padded NHWC buffer out as C,H,W-ordered values.
///
/// # Shapes
/// `padded`: `padded_len(h, w, c)`; `out`: `c * h * w`.
pub fn padded_to_nchw(padded: &[f32], c: usize, h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(padded.len(), padded_len(h, w, c), "padded buffer");
    assert_eq!(out.len(), c * h * w, "nchw output");
    let wp = w + 2;
    for y in 0..h {
        for x in 0..w {
            let px = &padded[((y + 1) * wp + x + 1) * c..((y + 1) * wp + x + 2) * c];
            for (ch, &v) in px.iter().enumerate() {
                out[ch * h * w + y * w + x] = v;
            }
        }
    }
}

/// One fused layer on an NCHW batch: `maxpool2x2?(ReLU(conv3x3(x) + b))`.
///
/// A convenience (and test) entry point over [`Conv3x3::forward_padded`]; whole networks should
/// keep activations padded between layers, as [`crate::Vgg16Cpu`] does.
///
/// # Shapes
/// `input`: `[batch, layer.cin(), h, w]` -> `[batch, layer.cout(), ho, wo]`.
pub fn conv3x3_relu_nchw(
    layer: &Conv3x3,
    input: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    pool: bool,
) -> crate::Result<Vec<f32>> {
    let (cin, cout) = (layer.cin(), layer.cout());
    crate::error::check_len("conv input", batch * cin * h * w, input.len())?;
    let (ho, wo) = output_hw(h, w, pool);
    let mut output = vec![0.0f32; batch * cout * ho * wo];
    if output.is_empty() {
        return Ok(output);
    }
    let mut padded_in = vec![0.0f32; padded_len(h, w, cin)];
    let mut padded_out = vec![0.0f32; padded_len(ho, wo, cout)];
    for (image, out) in input
        .chunks_exact(cin * h * w)
        .zip(output.chunks_exact_mut(cout * ho * wo))
    {
        nchw_to_padded(image, cin, h, w, &mut padded_in);
        if layer.round_bf16 {
            round_slice_bf16(&mut padded_in);
        }
        layer.forward_padded(&padded_in, h, w, pool, &mut padded_out, true);
        padded_to_nchw(&padded_out, cout, ho, wo, out);
    }
    Ok(output)
}
