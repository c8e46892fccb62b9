//! f32 convolution kernels over one NHWC image, for the CPU backbones that candle's CPU ops serve
//! badly (EfficientNet-Lite0; any depthwise/pointwise network).
//!
//! candle's CPU `conv2d` with `groups = channels` runs one tiny convolution per channel (1152 of
//! them in a Lite0 layer) and its 1x1 convolutions go through im2col; these kernels instead work
//! on plain slices in H,W,C order, so the channels of one pixel are contiguous and every inner
//! loop runs over channels (AVX-512 intrinsics kernels when the CPU has AVX-512F, else the same
//! loops vectorised for AVX2+FMA or plain; checked at run time), with the (folded) bias, the
//! activation and an optional residual fused in:
//! - [`depthwise`]: `k x k` per-channel convolution, any stride and padding ([`Geometry`]);
//! - [`pointwise`]: 1x1 convolution over a block of pixels: with AVX-512 a register-tiled kernel
//!   on weights packed once ([`PointwiseWeights`]), otherwise the `gemm` crate;
//! - [`dense`]: a full `k x k` convolution for few input channels (a network's stem).
//!
//! Each kernel computes a range of output rows (or pixels), so a caller can spread one image
//! over threads with [`for_each_rows`], or run whole images in parallel and each one serially.
//! Every output value is computed by the same arithmetic whichever way the work is cut, so an
//! image's result does not depend on the batch it is in or on the number of threads.

use rayon::prelude::*;

/// The nonlinearity applied after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None (a projection before a residual sum).
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)` (MobileNet / EfficientNet-Lite).
    Relu6,
}

impl Activation {
    /// `out[j] = act(acc[j])`. The match sits outside the loop so each arm vectorises.
    #[inline(always)]
    fn store(self, acc: &[f32], out: &mut [f32]) {
        match self {
            Self::Identity => out.copy_from_slice(acc),
            Self::Relu => {
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = a.max(0.0);
                }
            }
            Self::Relu6 => {
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = a.clamp(0.0, 6.0);
                }
            }
        }
    }

    /// `v = act(v)` in place.
    #[inline(always)]
    fn apply_in_place(self, v: &mut [f32]) {
        match self {
            Self::Identity => {}
            Self::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
            Self::Relu6 => v.iter_mut().for_each(|x| *x = x.clamp(0.0, 6.0)),
        }
    }
}

/// Spatial geometry of one convolution: input size, square kernel, stride, the padding before
/// the first row and column, and the output size. Padding after the last row/column is implied
/// (positions outside the input read as zero), so asymmetric padding needs nothing special.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geometry {
    /// TensorFlow's "SAME" padding: output `ceil(in / stride)`, total padding
    /// `max((out - 1) * stride + k - in, 0)` split with the odd one at the bottom/right (so a
    /// 3x3 stride-2 conv on an even input pads only after).
    ///
    /// # Panics
    /// If `k` or `stride` is zero.
    pub fn same(h: usize, w: usize, k: usize, stride: usize) -> Self {
        assert!(k > 0 && stride > 0, "kernel and stride must be positive");
        let dim = |n: usize| {
            let out = n.div_ceil(stride);
            let total = ((out.max(1) - 1) * stride + k).saturating_sub(n);
            (out, total / 2)
        };
        let (oh, pad_top) = dim(h);
        let (ow, pad_left) = dim(w);
        Self {
            h,
            w,
            k,
            stride,
            pad_top,
            pad_left,
            oh,
            ow,
        }
    }

    /// PyTorch's symmetric `padding = pad`: output `(in + 2 pad - k) / stride + 1`, or `None`
    /// when the kernel does not fit.
    pub fn symmetric(h: usize, w: usize, k: usize, stride: usize, pad: usize) -> Option<Self> {
        if k == 0 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
            return None;
        }
        Some(Self {
            h,
            w,
            k,
            stride,
            pad_top: pad,
            pad_left: pad,
            oh: (h + 2 * pad - k) / stride + 1,
            ow: (w + 2 * pad - k) / stride + 1,
        })
    }

    /// Padding after the last row and column that the output reads: `(bottom, right)`. With
    /// [`Geometry::pad_top`] / [`Geometry::pad_left`] this is what an explicit pad before a
    /// padding-free convolution needs (candle's engine).
    pub fn pad_after(&self) -> (usize, usize) {
        let after = |out: usize, n: usize, before: usize| {
            ((out.max(1) - 1) * self.stride + self.k).saturating_sub(n + before)
        };
        (
            after(self.oh, self.h, self.pad_top),
            after(self.ow, self.w, self.pad_left),
        )
    }

    /// The kernel taps `[first, end)` of output position `o` that fall inside an input of
    /// length `n` (the others read padding).
    #[inline(always)]
    fn taps(&self, o: usize, pad: usize, n: usize) -> (usize, usize) {
        let start = o * self.stride; // input position of tap 0, plus `pad`
        let first = pad.saturating_sub(start);
        let end = (n + pad).saturating_sub(start).min(self.k);
        (first, end.max(first))
    }
}

/// Runs `f(first_row, rows)` over consecutive chunks of `rows_per_task` rows of `out` (rows of
/// `row_len` values), spread over the rayon pool when `parallel`, in order otherwise.
pub fn for_each_rows<F>(out: &mut [f32], row_len: usize, rows_per_task: usize, parallel: bool, f: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    let rows_per_task = rows_per_task.max(1);
    let chunk = row_len * rows_per_task;
    if chunk == 0 {
        return;
    }
    if parallel {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, rows)| f(i * rows_per_task, rows));
    } else {
        for (i, rows) in out.chunks_mut(chunk).enumerate() {
            f(i * rows_per_task, rows);
        }
    }
}

/// Which vector instructions the kernels may use (checked once per call; the check is a cached
/// atomic load).
#[derive(Clone, Copy)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// Whether the AVX-512 kernels run (always false off x86_64).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(simd(), Simd::Avx512)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Simd::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Simd::Avx2;
        }
    }
    Simd::Portable
}

/// `a * b + c`, fused when the caller was compiled with FMA (the portable build has no fast
/// `mul_add`).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Depthwise `k x k` convolution of an `h x w x c` image, + bias, + activation, for output rows
/// `oy0 ..` (as many as `out` holds, `ow * c` values each).
///
/// `weight` is `[k][k][c]` (tap-major, so a tap's channels are contiguous), `bias` is `[c]`.
///
/// # Panics
/// If a length disagrees with the geometry (a programming error, not bad input).
#[allow(clippy::too_many_arguments)]
pub fn depthwise(
    input: &[f32],
    c: usize,
    g: &Geometry,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    oy0: usize,
    out: &mut [f32],
) {
    assert_eq!(input.len(), g.h * g.w * c, "depthwise: input length");
    assert_eq!(weight.len(), g.k * g.k * c, "depthwise: weight length");
    assert_eq!(bias.len(), c, "depthwise: bias length");
    let row_len = g.ow * c;
    assert!(
        row_len > 0 && out.len().is_multiple_of(row_len) && oy0 + out.len() / row_len <= g.oh,
        "depthwise: output rows"
    );
    #[cfg(target_arch = "x86_64")]
    match simd() {
        // SAFETY: the CPU has AVX-512F (checked by `simd`); the lengths were checked above.
        Simd::Avx512 => {
            return unsafe { dw512::depthwise(input, c, g, weight, bias, act, oy0, out) }
        }
        // SAFETY: the CPU has AVX2 and FMA (checked by `simd`); the body is safe code.
        Simd::Avx2 => return unsafe { depthwise_avx2(input, c, g, weight, bias, act, oy0, out) },
        Simd::Portable => {}
    }
    depthwise_body::<false>(input, c, g, weight, bias, act, oy0, out)
}

/// The AVX-512 depthwise kernel: 64 channels (4 registers) at a time accumulated over all valid
/// taps, masked loads and stores for the channel tail. Where 4 neighbouring outputs of a row have
/// every tap inside the input (all but the borders), they are computed together, so each
/// weight load feeds 4 FMAs: 1.25 loads per FMA instead of 2 (the kernel is load-bound).
#[cfg(target_arch = "x86_64")]
mod dw512 {
    use std::arch::x86_64::*;

    use super::{Activation, Geometry};

    /// Outputs per run in the interior.
    const RUN: usize = 4;

    /// # Safety
    /// AVX-512F must be available, and the lengths must be those `super::depthwise` checks.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn depthwise(
        input: &[f32],
        c: usize,
        g: &Geometry,
        weight: &[f32],
        bias: &[f32],
        act: Activation,
        oy0: usize,
        out: &mut [f32],
    ) {
        let rows = out.len() / (g.ow * c);
        let full = (0, g.k);
        for r in 0..rows {
            let oy = oy0 + r;
            let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
            let iy0 = oy * g.stride + ky0 - g.pad_top;
            let mut ox = 0;
            while ox < g.ow {
                let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
                // Tap ranges only shrink towards the borders, so two interior ends mean an
                // interior run.
                let n = if (kx0, kx1) == full
                    && ox + RUN <= g.ow
                    && g.taps(ox + RUN - 1, g.pad_left, g.w) == full
                {
                    RUN
                } else {
                    1
                };
                let ix0 = ox * g.stride + kx0 - g.pad_left;
                // Offsets of the first valid tap; every tap of the `n` outputs stays inside
                // `input` / `weight`, every channel block inside a pixel's `c` values.
                let run = Run {
                    src: input[(iy0 * g.w + ix0) * c..].as_ptr(),
                    wt: weight[(ky0 * g.k + kx0) * c..].as_ptr(),
                    ny: ky1 - ky0,
                    nx: kx1 - kx0,
                    src_row: g.w * c,
                    wt_row: g.k * c,
                    src_step: g.stride * c,
                    c,
                    bias: bias.as_ptr(),
                    out: out[(r * g.ow + ox) * c..].as_mut_ptr(),
                    act,
                };
                // SAFETY (both arms): outputs ox .. ox + n < ow of row r, channels < c.
                if n == RUN {
                    unsafe { run.channels::<RUN>() };
                } else {
                    unsafe { run.channels::<1>() };
                }
                ox += n;
            }
        }
    }

    /// `P` consecutive outputs of one row with the same valid taps.
    struct Run {
        /// The first output's first valid tap's input pixel, channel 0.
        src: *const f32,
        /// The first valid tap's weights, channel 0.
        wt: *const f32,
        ny: usize,
        nx: usize,
        /// Values per input row and per kernel row.
        src_row: usize,
        wt_row: usize,
        /// Input values between consecutive outputs' taps (`stride * c`).
        src_step: usize,
        c: usize,
        bias: *const f32,
        /// The first output pixel, channel 0.
        out: *mut f32,
        act: Activation,
    }

    impl Run {
        /// All channels of the `P` outputs.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn channels<const P: usize>(&self) {
            let c = self.c;
            let mut c0 = 0;
            // SAFETY (all calls): channel ranges within `c`; forwarded from the caller.
            unsafe {
                while c0 + 64 <= c {
                    self.block::<4, P>(c0, 16);
                    c0 += 64;
                }
                let rest = c - c0;
                match rest.div_ceil(16) {
                    0 => {}
                    1 => self.block::<1, P>(c0, rest),
                    2 => self.block::<2, P>(c0, rest - 16),
                    3 => self.block::<3, P>(c0, rest - 32),
                    _ => self.block::<4, P>(c0, rest - 48),
                }
            }
        }

        /// Channels `c0 .. c0 + 16 * (NB - 1) + last` (`1 <= last <= 16`) of the `P` outputs.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn block<const NB: usize, const P: usize>(&self, c0: usize, last: usize) {
            let mut mask = [0xffffu16; NB];
            mask[NB - 1] = if last >= 16 {
                0xffff
            } else {
                (1u16 << last) - 1
            };
            // SAFETY: the caller guarantees the channel range; taps were clipped to the input.
            // Wrapping pointer steps: no checks in the inner loop, even in the dev profile.
            // Constant-bound index loops, so the accumulators stay in registers.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); NB]; P];
                #[allow(clippy::needless_range_loop)]
                for j in 0..NB {
                    let b = _mm512_maskz_loadu_ps(mask[j], self.bias.wrapping_add(c0 + 16 * j));
                    for p in 0..P {
                        acc[p][j] = b;
                    }
                }
                let mut src_row = self.src.wrapping_add(c0);
                let mut wt_row = self.wt.wrapping_add(c0);
                for _ in 0..self.ny {
                    let (mut s, mut w) = (src_row, wt_row);
                    for _ in 0..self.nx {
                        let mut wv = [_mm512_setzero_ps(); NB];
                        #[allow(clippy::needless_range_loop)]
                        for j in 0..NB {
                            wv[j] = _mm512_maskz_loadu_ps(mask[j], w.wrapping_add(16 * j));
                        }
                        #[allow(clippy::needless_range_loop)]
                        for p in 0..P {
                            let sp = s.wrapping_add(p.wrapping_mul(self.src_step));
                            for j in 0..NB {
                                let x = _mm512_maskz_loadu_ps(mask[j], sp.wrapping_add(16 * j));
                                acc[p][j] = _mm512_fmadd_ps(x, wv[j], acc[p][j]);
                            }
                        }
                        s = s.wrapping_add(self.c);
                        w = w.wrapping_add(self.c);
                    }
                    src_row = src_row.wrapping_add(self.src_row);
                    wt_row = wt_row.wrapping_add(self.wt_row);
                }
                let zero = _mm512_setzero_ps();
                let six = _mm512_set1_ps(6.0);
                #[allow(clippy::needless_range_loop)]
                for p in 0..P {
                    for j in 0..NB {
                        // max/min return the second operand for a NaN: NaN propagates, as in
                        // clamp.
                        let v = match self.act {
                            Activation::Identity => acc[p][j],
                            Activation::Relu => _mm512_max_ps(zero, acc[p][j]),
                            Activation::Relu6 => _mm512_min_ps(six, _mm512_max_ps(zero, acc[p][j])),
                        };
                        let o = self.out.wrapping_add(p * self.c + c0 + 16 * j);
                        _mm512_mask_storeu_ps(o, mask[j], v);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn depthwise_avx2(
    input: &[f32],
    c: usize,
    g: &Geometry,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    oy0: usize,
    out: &mut [f32],
) {
    depthwise_body::<true>(input, c, g, weight, bias, act, oy0, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_body<const FMA: bool>(
    input: &[f32],
    c: usize,
    g: &Geometry,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    oy0: usize,
    out: &mut [f32],
) {
    for (r, out_row) in out.chunks_exact_mut(g.ow * c).enumerate() {
        let oy = oy0 + r;
        let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
        for (ox, o) in out_row.chunks_exact_mut(c).enumerate() {
            let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
            let pixel = Taps {
                input,
                weight,
                c,
                w: g.w,
                k: g.k,
                iy0: oy * g.stride + ky0 - g.pad_top,
                ix0: ox * g.stride + kx0 - g.pad_left,
                ky: (ky0, ky1),
                kx: (kx0, kx1),
            };
            // Channels in blocks whose accumulators stay in registers across all taps.
            let mut c0 = 0;
            while c0 + 32 <= c {
                pixel.block::<32, FMA>(c0, bias, act, o);
                c0 += 32;
            }
            while c0 + 8 <= c {
                pixel.block::<8, FMA>(c0, bias, act, o);
                c0 += 8;
            }
            while c0 < c {
                pixel.block::<1, FMA>(c0, bias, act, o);
                c0 += 1;
            }
        }
    }
}

/// The valid taps of one depthwise output pixel.
struct Taps<'a> {
    input: &'a [f32],
    weight: &'a [f32],
    c: usize,
    w: usize,
    k: usize,
    /// Input row and column of the first valid tap.
    iy0: usize,
    ix0: usize,
    ky: (usize, usize),
    kx: (usize, usize),
}

impl Taps<'_> {
    /// Channels `c0 .. c0 + B` of the pixel into `o`.
    #[inline(always)]
    fn block<const B: usize, const FMA: bool>(
        &self,
        c0: usize,
        bias: &[f32],
        act: Activation,
        o: &mut [f32],
    ) {
        let mut acc = [0.0f32; B];
        acc.copy_from_slice(&bias[c0..c0 + B]);
        for (dy, ky) in (self.ky.0..self.ky.1).enumerate() {
            let row = (self.iy0 + dy) * self.w;
            for (dx, kx) in (self.kx.0..self.kx.1).enumerate() {
                let src = &self.input[(row + self.ix0 + dx) * self.c + c0..][..B];
                let wt = &self.weight[(ky * self.k + kx) * self.c + c0..][..B];
                for j in 0..B {
                    acc[j] = madd::<FMA>(src[j], wt[j], acc[j]);
                }
            }
        }
        act.store(&acc, &mut o[c0..c0 + B]);
    }
}

/// A 1x1 convolution's weights and bias, laid out once (at load time) for [`pointwise`].
#[derive(Debug, Clone)]
pub struct PointwiseWeights {
    cin: usize,
    cout: usize,
    bias: Vec<f32>,
    layout: PointwiseLayout,
}

#[derive(Debug, Clone)]
enum PointwiseLayout {
    /// `[cin][cout]`, for the `gemm` crate.
    Plain(Vec<f32>),
    /// `[cout / 64 (rounded up)][cin][64]`, zero-padded, for the AVX-512 kernel; the bias
    /// zero-padded to whole blocks alongside.
    Packed { weight: Vec<f32>, bias: Vec<f32> },
}

/// Output channels per packed block of the AVX-512 1x1 kernel (4 registers of 16).
const PW_BLOCK: usize = 64;

impl PointwiseWeights {
    /// From `weight` `[cin][cout]` and `bias` `[cout]`: packed for the AVX-512 kernel when the
    /// CPU has AVX-512F, else kept for the `gemm` crate.
    ///
    /// # Panics
    /// If the lengths disagree or a size is zero (a programming error).
    pub fn new(cin: usize, weight: &[f32], bias: &[f32]) -> Self {
        let w = Self::portable(cin, weight, bias);
        if has_avx512() {
            w.packed()
        } else {
            w
        }
    }

    /// The `gemm`-crate layout whatever the CPU (the fallback path; tests compare both).
    ///
    /// # Panics
    /// If the lengths disagree or a size is zero (a programming error).
    pub fn portable(cin: usize, weight: &[f32], bias: &[f32]) -> Self {
        let cout = bias.len();
        assert!(cin > 0 && cout > 0, "pointwise: empty channels");
        assert_eq!(weight.len(), cin * cout, "pointwise: weight length");
        Self {
            cin,
            cout,
            bias: bias.to_vec(),
            layout: PointwiseLayout::Plain(weight.to_vec()),
        }
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Repacked into 64-channel blocks (from the plain layout).
    fn packed(self) -> Self {
        let PointwiseLayout::Plain(plain) = &self.layout else {
            return self;
        };
        let (cin, cout) = (self.cin, self.cout);
        let blocks = cout.div_ceil(PW_BLOCK);
        let mut weight = vec![0.0f32; blocks * cin * PW_BLOCK];
        for b in 0..blocks {
            let (c0, n) = (b * PW_BLOCK, PW_BLOCK.min(cout - b * PW_BLOCK));
            for k in 0..cin {
                let dst = (b * cin + k) * PW_BLOCK;
                weight[dst..dst + n].copy_from_slice(&plain[k * cout + c0..k * cout + c0 + n]);
            }
        }
        let mut bias = vec![0.0f32; blocks * PW_BLOCK];
        bias[..cout].copy_from_slice(&self.bias);
        Self {
            layout: PointwiseLayout::Packed { weight, bias },
            ..self
        }
    }
}

/// 1x1 convolution of `m` pixels: `out[m][cout] = act(input[m][cin] . weight[cin][cout] + bias
/// (+ residual[m][cout]))`, `m = input.len() / cin`.
///
/// With AVX-512 ([`PointwiseWeights::new`] packed the weights) a register-tiled kernel reads
/// the NHWC rows as they are (6 pixels x 64 channels per tile, all `cin` terms accumulated in
/// registers, bias, residual and activation added before the one store); otherwise the `gemm`
/// crate computes the product and a second pass adds the rest (call it on blocks of a few
/// hundred pixels so the block is still in cache). Either way each output value's sum runs
/// over `cin` in order, whatever `m` is.
///
/// # Panics
/// If a length disagrees (a programming error, not bad input), or if packed weights are used
/// on a CPU without AVX-512F.
pub fn pointwise(
    input: &[f32],
    w: &PointwiseWeights,
    act: Activation,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let (cin, cout) = (w.cin, w.cout);
    assert!(
        input.len().is_multiple_of(cin),
        "pointwise: input length {} is not a multiple of {cin}",
        input.len()
    );
    let m = input.len() / cin;
    assert_eq!(out.len(), m * cout, "pointwise: output length");
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "pointwise: residual length");
    }
    if m == 0 {
        return;
    }
    match &w.layout {
        PointwiseLayout::Plain(weight) => {
            pointwise_gemm(input, m, cin, cout, weight, &w.bias, act, residual, out)
        }
        PointwiseLayout::Packed { weight, bias } => {
            // Packed weights are made only where `has_avx512` holds (`PointwiseWeights::new`).
            assert!(has_avx512(), "pointwise: packed weights need AVX-512F");
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (weight, bias);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted above); the lengths checked above and by
            // `PointwiseWeights::packed` (weight `blocks * cin * 64`, bias `blocks * 64`) bound
            // every access the kernel makes (see `pw512`).
            unsafe {
                pw512::pointwise(input, m, cin, cout, weight, bias, act, residual, out)
            }
        }
    }
}

/// The portable 1x1 path: the `gemm` crate, then bias, residual and activation.
#[allow(clippy::too_many_arguments)]
fn pointwise_gemm(
    input: &[f32],
    m: usize,
    cin: usize,
    cout: usize,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    // SAFETY: `out` is m x cout row-major (row stride cout), `input` m x cin (row stride cin),
    // `weight` cin x cout (row stride cout); the caller checked the lengths, so every element
    // the GEMM touches is inside its slice, and `out` does not alias the inputs (&mut).
    unsafe {
        gemm::gemm(
            m,
            cout,
            cin,
            out.as_mut_ptr(),
            1,
            cout as isize,
            false,
            input.as_ptr(),
            1,
            cin as isize,
            weight.as_ptr(),
            1,
            cout as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (i, row) in out.chunks_exact_mut(cout).enumerate() {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
        if let Some(r) = residual {
            for (o, x) in row.iter_mut().zip(&r[i * cout..(i + 1) * cout]) {
                *o += x;
            }
        }
        act.apply_in_place(row);
    }
}

/// The AVX-512 1x1 kernel over [`PointwiseWeights::packed`] weights.
#[cfg(target_arch = "x86_64")]
mod pw512 {
    use std::arch::x86_64::*;

    use super::{Activation, PW_BLOCK};

    /// Pixels per register tile: 6 x 4 accumulators + 4 weight registers + 1 broadcast fit in
    /// the 32 zmm registers.
    const ROWS: usize = 6;

    /// # Safety
    /// AVX-512F must be available; `input` is `m * cin`, `out` (and `residual`) `m * cout`,
    /// `weight` `cout.div_ceil(64) * cin * 64`, `bias` `cout.div_ceil(64) * 64` values.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pointwise(
        input: &[f32],
        m: usize,
        cin: usize,
        cout: usize,
        weight: &[f32],
        bias: &[f32],
        act: Activation,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let blocks = cout.div_ceil(PW_BLOCK);
        assert!(input.len() >= m * cin && out.len() >= m * cout);
        assert!(weight.len() >= blocks * cin * PW_BLOCK && bias.len() >= blocks * PW_BLOCK);
        let t = Tile {
            input: input.as_ptr(),
            cin,
            cout,
            residual: residual.map(<[f32]>::as_ptr),
            out: out.as_mut_ptr(),
            act,
        };
        // One 64-channel block at a time: its weights (cin x 64 floats, at most 295 KB at
        // cin = 1152) stay in L2 while every pixel of the call passes under them.
        for b in 0..blocks {
            let c0 = b * PW_BLOCK;
            let valid = (cout - c0).min(PW_BLOCK);
            let w = weight[b * cin * PW_BLOCK..].as_ptr();
            let bias = bias[c0..].as_ptr();
            // SAFETY (all arms): tiles read pixels < m, weight rows < cin of block b, and
            // write channels c0 .. c0 + valid of those pixels; all inside the checked lengths.
            match valid.div_ceil(16) {
                1 => unsafe { t.rows::<1>(m, w, bias, c0, valid) },
                2 => unsafe { t.rows::<2>(m, w, bias, c0, valid) },
                3 => unsafe { t.rows::<3>(m, w, bias, c0, valid) },
                _ => unsafe { t.rows::<4>(m, w, bias, c0, valid) },
            }
        }
    }

    /// What every tile of one call shares.
    struct Tile {
        input: *const f32,
        cin: usize,
        cout: usize,
        residual: Option<*const f32>,
        out: *mut f32,
        act: Activation,
    }

    impl Tile {
        /// All `m` pixels for one block of `NB * 16 >= valid` channels starting at `c0`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn rows<const NB: usize>(
            &self,
            m: usize,
            w: *const f32,
            bias: *const f32,
            c0: usize,
            valid: usize,
        ) {
            let mut p = 0;
            while p + ROWS <= m {
                // SAFETY: forwarded; pixels p .. p + ROWS < m.
                unsafe { self.tile::<NB, ROWS>(p, w, bias, c0, valid) };
                p += ROWS;
            }
            while p < m {
                // SAFETY: forwarded; pixel p < m.
                unsafe { self.tile::<NB, 1>(p, w, bias, c0, valid) };
                p += 1;
            }
        }

        /// Pixels `p .. p + R`, channels `c0 .. c0 + min(valid, NB * 16)`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn tile<const NB: usize, const R: usize>(
            &self,
            p: usize,
            w: *const f32,
            bias: *const f32,
            c0: usize,
            valid: usize,
        ) {
            // SAFETY: the caller guarantees the pixel and channel ranges (see `pointwise`).
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); NB]; R];
                // Wrapping arithmetic throughout the inner loop: no overflow or precondition
                // checks there even in the dev profile (every address is in bounds anyway).
                // Constant-bound index loops, so LLVM unrolls them and keeps `acc` in registers.
                let cin = self.cin;
                let mut x = self.input.wrapping_add(p.wrapping_mul(cin));
                let mut wk = w;
                for _ in 0..cin {
                    let mut wv = [_mm512_setzero_ps(); NB];
                    #[allow(clippy::needless_range_loop)]
                    for j in 0..NB {
                        wv[j] = _mm512_loadu_ps(wk.wrapping_add(16 * j));
                    }
                    #[allow(clippy::needless_range_loop)]
                    for r in 0..R {
                        let xv = _mm512_set1_ps(*x.wrapping_add(r.wrapping_mul(cin)));
                        for j in 0..NB {
                            acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
                        }
                    }
                    x = x.wrapping_add(1);
                    wk = wk.wrapping_add(PW_BLOCK);
                }
                let zero = _mm512_setzero_ps();
                let six = _mm512_set1_ps(6.0);
                for j in 0..NB {
                    let lanes = valid.saturating_sub(16 * j).min(16);
                    if lanes == 0 {
                        continue;
                    }
                    let mask: __mmask16 = if lanes == 16 {
                        0xffff
                    } else {
                        (1u16 << lanes) - 1
                    };
                    let b = _mm512_loadu_ps(bias.add(16 * j));
                    for (r, row) in acc.iter().enumerate() {
                        let o = (p + r) * self.cout + c0 + 16 * j;
                        let mut v = _mm512_add_ps(row[j], b);
                        if let Some(res) = self.residual {
                            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res.add(o)));
                        }
                        // max/min return their second operand when either is NaN: with the
                        // value second, a NaN propagates (like `f32::clamp`).
                        v = match self.act {
                            Activation::Identity => v,
                            Activation::Relu => _mm512_max_ps(zero, v),
                            Activation::Relu6 => _mm512_min_ps(six, _mm512_max_ps(zero, v)),
                        };
                        _mm512_mask_storeu_ps(self.out.add(o), mask, v);
                    }
                }
            }
        }
    }
}

/// Full `k x k` convolution of an `h x w x cin` image, + bias, + activation, for output rows
/// `oy0 ..` (as many as `out` holds, `ow * cout` values each). Meant for a stem (few input
/// channels): each output pixel accumulates `k * k * cin` broadcast-multiplies of a weight row.
///
/// `weight` is `[k][k][cin][cout]`, `bias` is `[cout]`.
///
/// # Panics
/// If a length disagrees with the geometry (a programming error, not bad input).
#[allow(clippy::too_many_arguments)]
pub fn dense(
    input: &[f32],
    cin: usize,
    g: &Geometry,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    oy0: usize,
    out: &mut [f32],
) {
    let cout = bias.len();
    assert_eq!(input.len(), g.h * g.w * cin, "dense: input length");
    assert_eq!(weight.len(), g.k * g.k * cin * cout, "dense: weight length");
    let row_len = g.ow * cout;
    assert!(
        row_len > 0 && out.len().is_multiple_of(row_len) && oy0 + out.len() / row_len <= g.oh,
        "dense: output rows"
    );
    #[cfg(target_arch = "x86_64")]
    match simd() {
        // SAFETY: the CPU has AVX-512F (checked by `simd`); the lengths were checked above.
        Simd::Avx512 => {
            return unsafe { dense512::dense(input, cin, g, weight, bias, act, oy0, out) }
        }
        // SAFETY: the CPU has AVX2 and FMA (checked by `simd`); the body is safe code.
        Simd::Avx2 => return unsafe { dense_avx2(input, cin, g, weight, bias, act, oy0, out) },
        Simd::Portable => {}
    }
    dense_body::<false>(input, cin, g, weight, bias, act, oy0, out)
}

/// The AVX-512 dense kernel: per output pixel, 64 output channels (4 registers) at a time
/// accumulated in registers over every valid tap and input channel, masked at the tail.
#[cfg(target_arch = "x86_64")]
mod dense512 {
    use std::arch::x86_64::*;

    use super::{Activation, Geometry};

    /// # Safety
    /// AVX-512F must be available, and the lengths must be those `super::dense` checks.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dense(
        input: &[f32],
        cin: usize,
        g: &Geometry,
        weight: &[f32],
        bias: &[f32],
        act: Activation,
        oy0: usize,
        out: &mut [f32],
    ) {
        let cout = bias.len();
        let rows = out.len() / (g.ow * cout);
        for r in 0..rows {
            let oy = oy0 + r;
            let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
            let iy0 = oy * g.stride + ky0 - g.pad_top;
            for ox in 0..g.ow {
                let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
                let ix0 = ox * g.stride + kx0 - g.pad_left;
                let px = Pixel {
                    src: input[(iy0 * g.w + ix0) * cin..].as_ptr(),
                    wt: weight[(ky0 * g.k + kx0) * cin * cout..].as_ptr(),
                    ny: ky1 - ky0,
                    nx: kx1 - kx0,
                    cin,
                    cout,
                    src_row: g.w * cin,
                    wt_row: g.k * cin * cout,
                    bias: bias.as_ptr(),
                    out: out[(r * g.ow + ox) * cout..].as_mut_ptr(),
                    act,
                };
                let mut c0 = 0;
                while c0 + 64 <= cout {
                    // SAFETY: output channels c0 .. c0 + 64 <= cout.
                    unsafe { px.block::<4>(c0, 16) };
                    c0 += 64;
                }
                let rest = cout - c0;
                // SAFETY: output channels c0 .. cout (the last register masked).
                unsafe {
                    match rest.div_ceil(16) {
                        0 => {}
                        1 => px.block::<1>(c0, rest),
                        2 => px.block::<2>(c0, rest - 16),
                        3 => px.block::<3>(c0, rest - 32),
                        _ => px.block::<4>(c0, rest - 48),
                    }
                }
            }
        }
    }

    /// One output pixel and its valid taps.
    struct Pixel {
        /// The first valid tap's input pixel, channel 0.
        src: *const f32,
        /// The first valid tap's weights `[cin][cout]`.
        wt: *const f32,
        ny: usize,
        nx: usize,
        cin: usize,
        cout: usize,
        /// Values per input row and per kernel row of weights.
        src_row: usize,
        wt_row: usize,
        bias: *const f32,
        /// The output pixel, channel 0.
        out: *mut f32,
        act: Activation,
    }

    impl Pixel {
        /// Output channels `c0 .. c0 + 16 * (NB - 1) + last` (`1 <= last <= 16`).
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn block<const NB: usize>(&self, c0: usize, last: usize) {
            let mut mask = [0xffffu16; NB];
            mask[NB - 1] = if last >= 16 {
                0xffff
            } else {
                (1u16 << last) - 1
            };
            // SAFETY: the caller guarantees the channel range; taps were clipped to the input.
            // Wrapping pointer steps: no checks in the inner loop, even in the dev profile.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); NB];
                #[allow(clippy::needless_range_loop)]
                for j in 0..NB {
                    acc[j] = _mm512_maskz_loadu_ps(mask[j], self.bias.wrapping_add(c0 + 16 * j));
                }
                let mut src_row = self.src;
                let mut wt_row = self.wt.wrapping_add(c0);
                for _ in 0..self.ny {
                    let (mut s, mut w) = (src_row, wt_row);
                    // A kernel row's valid taps are contiguous in both the input (nx pixels of
                    // cin values) and the weights (nx * cin rows of cout values).
                    for _ in 0..self.nx * self.cin {
                        let x = _mm512_set1_ps(*s);
                        #[allow(clippy::needless_range_loop)]
                        for j in 0..NB {
                            let k = _mm512_maskz_loadu_ps(mask[j], w.wrapping_add(16 * j));
                            acc[j] = _mm512_fmadd_ps(x, k, acc[j]);
                        }
                        s = s.wrapping_add(1);
                        w = w.wrapping_add(self.cout);
                    }
                    src_row = src_row.wrapping_add(self.src_row);
                    wt_row = wt_row.wrapping_add(self.wt_row);
                }
                let zero = _mm512_setzero_ps();
                let six = _mm512_set1_ps(6.0);
                #[allow(clippy::needless_range_loop)]
                for j in 0..NB {
                    // max/min return the second operand for a NaN: NaN propagates, as in clamp.
                    let v = match self.act {
                        Activation::Identity => acc[j],
                        Activation::Relu => _mm512_max_ps(zero, acc[j]),
                        Activation::Relu6 => _mm512_min_ps(six, _mm512_max_ps(zero, acc[j])),
                    };
                    _mm512_mask_storeu_ps(self.out.wrapping_add(c0 + 16 * j), mask[j], v);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dense_avx2(
    input: &[f32],
    cin: usize,
    g: &Geometry,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    oy0: usize,
    out: &mut [f32],
) {
    dense_body::<true>(input, cin, g, weight, bias, act, oy0, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dense_body<const FMA: bool>(
    input: &[f32],
    cin: usize,
    g: &Geometry,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    oy0: usize,
    out: &mut [f32],
) {
    let cout = bias.len();
    for (r, out_row) in out.chunks_exact_mut(g.ow * cout).enumerate() {
        let oy = oy0 + r;
        let (ky0, ky1) = g.taps(oy, g.pad_top, g.h);
        for (ox, o) in out_row.chunks_exact_mut(cout).enumerate() {
            let (kx0, kx1) = g.taps(ox, g.pad_left, g.w);
            o.copy_from_slice(bias);
            for ky in ky0..ky1 {
                let iy = oy * g.stride + ky - g.pad_top;
                for kx in kx0..kx1 {
                    let ix = ox * g.stride + kx - g.pad_left;
                    let src = &input[(iy * g.w + ix) * cin..][..cin];
                    let taps = &weight[(ky * g.k + kx) * cin * cout..][..cin * cout];
                    for (x, wrow) in src.iter().zip(taps.chunks_exact(cout)) {
                        for (acc, wv) in o.iter_mut().zip(wrow) {
                            *acc = madd::<FMA>(*x, *wv, *acc);
                        }
                    }
                }
            }
            act.apply_in_place(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // 224, 3x3, stride 2: 112 out, the one padding row/column after (TF), not before.
        let g = Geometry::same(224, 224, 3, 2);
        assert_eq!((g.oh, g.pad_top, g.pad_after().0), (112, 0, 1));
        // 56, 5x5, stride 2: 28 out, total 3 split 1 before, 2 after.
        let g = Geometry::same(56, 56, 5, 2);
        assert_eq!((g.oh, g.pad_top, g.pad_after().0), (28, 1, 2));
        // Odd input, 3x3 stride 2: 7 -> 4, total 2, symmetric.
        let g = Geometry::same(7, 7, 3, 2);
        assert_eq!((g.oh, g.pad_top, g.pad_after().0), (4, 1, 1));
        // Stride 1 keeps the size and pads (k - 1) / 2 each side.
        let g = Geometry::same(14, 9, 5, 1);
        assert_eq!((g.oh, g.ow, g.pad_top, g.pad_left), (14, 9, 2, 2));
        assert_eq!(g.pad_after(), (2, 2));
        // 1x1 input, 5x5 stride 2: one output, padded 2 each side.
        let g = Geometry::same(1, 1, 5, 2);
        assert_eq!((g.oh, g.pad_top, g.pad_after().0), (1, 2, 2));
    }

    #[test]
    fn taps_skip_the_padding() {
        let g = Geometry::same(224, 224, 3, 2);
        assert_eq!(g.taps(0, 0, 224), (0, 3));
        // The last output's third tap is the padding row 224.
        assert_eq!(g.taps(111, 0, 224), (0, 2));
        let g = Geometry::same(5, 5, 5, 1);
        assert_eq!(g.taps(0, 2, 5), (2, 5));
        assert_eq!(g.taps(4, 2, 5), (0, 3));
    }

    /// The AVX-512 depthwise kernel and the portable body agree (when the CPU has AVX-512;
    /// elsewhere only the portable body runs, and tests/efficientnet.rs checks it).
    #[test]
    fn avx512_depthwise_matches_the_portable_body() {
        if !has_avx512() {
            eprintln!("avx512_depthwise_matches_the_portable_body: SKIPPED: no AVX-512F");
            return;
        }
        let mut state = 1u64;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        for (c, k, stride, h, w) in [
            (1, 3, 1, 4, 5),
            (17, 5, 2, 9, 8),
            (80, 3, 2, 7, 7),
            (144, 5, 1, 6, 3),
            // Wide rows: interior runs of 4 outputs, at stride 1 and 2, with channel tails.
            (40, 3, 2, 5, 21),
            (24, 5, 2, 6, 23),
            (100, 5, 1, 3, 13),
            (7, 3, 1, 2, 16),
        ] {
            let g = Geometry::same(h, w, k, stride);
            let (x, wt, b) = (rand(h * w * c), rand(k * k * c), rand(c));
            for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
                let mut fast = vec![f32::NAN; g.oh * g.ow * c];
                let mut slow = fast.clone();
                depthwise(&x, c, &g, &wt, &b, act, 0, &mut fast);
                depthwise_body::<false>(&x, c, &g, &wt, &b, act, 0, &mut slow);
                let diff = fast
                    .iter()
                    .zip(&slow)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    diff <= 1e-5,
                    "c={c} k={k} s={stride} {h}x{w} {act:?}: {diff}"
                );
            }
        }
    }

    /// The AVX-512 dense kernel and the portable body agree (AVX-512 CPUs only, as above).
    #[test]
    fn avx512_dense_matches_the_portable_body() {
        if !has_avx512() {
            eprintln!("avx512_dense_matches_the_portable_body: SKIPPED: no AVX-512F");
            return;
        }
        let mut state = 3u64;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        for (cin, cout, k, stride, h, w) in [
            (3, 32, 3, 2, 9, 8),
            (1, 5, 3, 1, 4, 4),
            (2, 70, 5, 2, 7, 6),
            (4, 64, 1, 1, 3, 5),
        ] {
            let g = Geometry::same(h, w, k, stride);
            let (x, wt, b) = (rand(h * w * cin), rand(k * k * cin * cout), rand(cout));
            for act in [Activation::Identity, Activation::Relu6] {
                let mut fast = vec![f32::NAN; g.oh * g.ow * cout];
                let mut slow = fast.clone();
                dense(&x, cin, &g, &wt, &b, act, 0, &mut fast);
                dense_body::<false>(&x, cin, &g, &wt, &b, act, 0, &mut slow);
                let diff = fast
                    .iter()
                    .zip(&slow)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    diff <= 1e-5,
                    "{cin}->{cout} k={k} s={stride} {h}x{w} {act:?}: {diff}"
                );
            }
        }
    }

    #[test]
    fn symmetric_padding_is_pytorchs() {
        let g = Geometry::symmetric(10, 7, 3, 2, 1).expect("fits");
        assert_eq!((g.oh, g.ow), (5, 4));
        assert!(Geometry::symmetric(2, 2, 5, 1, 1).is_none());
    }
}
