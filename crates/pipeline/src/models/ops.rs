//! The models' custom CPU ops, with hand-written backward passes: for the baseline CNN
//! ([`crate::models::cnn`]) the 3x3 convolution (stride 1, zero padding 1) with its bias, and
//! BatchNorm2d + ReLU + 2x2 max-pool fused into one op; for the feature head
//! ([`crate::models::head`]) a linear layer that reads its batch's rows in place ([`gather_linear`]).
//! candle's autograd still drives training: these are ordinary candle tensors
//! ([`CustomOp3`]) whose `bwd` runs our kernels, so the models stay plain candle code.
//!
//! Why: candle's CPU `conv2d` backward always computes the input gradient with a direct
//! `conv_transpose2d` loop (also for the first layer, whose input is the images) and the
//! weight gradient as a convolution with an image-sized kernel; the unfused BN/ReLU/pool chain
//! makes about ten full-resolution passes each way. Here the convolution is a direct loop over
//! padded rows (few channels, large images: every inner loop is a contiguous run of one row,
//! so it vectorises and stays in L1), its input gradient is computed only when the input is
//! tracked by autograd, and the BN/ReLU/pool op reads the conv output once forward and twice
//! backward.
//!
//! Tensors are NCHW, f32 or f64, on the CPU. Work is split over images with rayon; every
//! reduction over the batch is summed in image order, in f64, so results are deterministic
//! whatever the thread count.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Element types the kernels run on.
pub(crate) trait Float: WithDType {}
impl Float for f32 {}
impl Float for f64 {}

/// The contiguous data of an op argument.
pub(crate) fn data<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let all = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => Err(candle_core::Error::Msg(
            "ops: argument is not contiguous".into(),
        )),
    }
}

pub(crate) fn op_error(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// Runs `$body` with `$t` bound to f32 or f64 according to `$dtype`.
macro_rules! dispatch {
    ($dtype:expr, $name:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => Err($crate::models::ops::op_error(format!(
                "{}: unsupported dtype {other:?}",
                $name
            ))),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Row kernels. Plain loops over equal-length slices, which LLVM vectorises.

/// `acc += a * x`.
#[inline(always)]
pub(crate) fn axpy<T: Float>(acc: &mut [T], a: T, x: &[T]) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `sum(a * b)`, with 8 partial sums so that the loop vectorises.
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> f64 {
    let zero = T::from_f64(0.0);
    let mut lanes = [zero; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut s: f64 = lanes.iter().map(|v| v.to_f64()).sum();
    for (x, y) in ra.iter().zip(rb) {
        s += (*x * *y).to_f64();
    }
    s
}

/// Copies the `c` planes `h x w` of `src` into `dst` as `(h + 2) x (w + 2)` planes with a zero
/// border (`dst` must be zero-filled; the border is never written).
fn pad_planes<T: Float>(src: &[T], dst: &mut [T], h: usize, w: usize) {
    let (ph, pw) = (h + 2, w + 2);
    for (plane, padded) in src.chunks_exact(h * w).zip(dst.chunks_exact_mut(ph * pw)) {
        for (i, row) in plane.chunks_exact(w).enumerate() {
            padded[(i + 1) * pw + 1..(i + 1) * pw + 1 + w].copy_from_slice(row);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Convolution.

/// Sizes of one 3x3 convolution: batch, input and output channels, height, width.
#[derive(Debug, Clone, Copy)]
struct ConvDims {
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
}

/// Defines `$name`, which runs the `#[inline(always)]` kernel `$kernel` compiled for AVX-512F
/// or AVX2 + FMA when the CPU has them (checked at run time, cached by std), else for the
/// baseline target: the kernels are plain loops that LLVM vectorises to whatever the
/// enabled features allow, and the baseline x86-64 has only SSE2.
macro_rules! multiversion {
    (fn $name:ident<$t:ident>($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $kernel:ident) => {
        fn $name<$t: Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn v4<$t: Float>($($arg: $ty),*) $(-> $ret)? {
                    $kernel::<$t>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3<$t: Float>($($arg: $ty),*) $(-> $ret)? {
                    $kernel::<$t>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for (checked above).
                    return unsafe { v4::<$t>($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `v3`.
                    return unsafe { v3::<$t>($($arg),*) };
                }
            }
            $kernel::<$t>($($arg),*)
        }
    };
}

/// One image of the forward: `yb [cout, h, w] = bias + conv(xb [cin, h, w])`, with `xp` a
/// zeroed scratch of `cin` padded planes.
#[inline(always)]
fn conv_forward_image_kernel<T: Float>(
    xb: &[T],
    wt: &[T],
    bias: &[T],
    yb: &mut [T],
    xp: &mut [T],
    d: ConvDims,
) {
    let ConvDims {
        cin, cout, h, w, ..
    } = d;
    let pw = w + 2;
    let plane = (h + 2) * pw;
    pad_planes(xb, xp, h, w);
    for i in 0..h {
        for co in 0..cout {
            let row = &mut yb[(co * h + i) * w..][..w];
            row.fill(bias[co]);
            for ci in 0..cin {
                let k = &wt[(co * cin + ci) * 9..][..9];
                let src = &xp[ci * plane..][..plane];
                for ky in 0..3 {
                    for kx in 0..3 {
                        axpy(row, k[ky * 3 + kx], &src[(i + ky) * pw + kx..][..w]);
                    }
                }
            }
        }
    }
}

multiversion!(fn conv_forward_image<T>(xb: &[T], wt: &[T], bias: &[T], yb: &mut [T], xp: &mut [T], d: ConvDims) => conv_forward_image_kernel);

/// `y[b, co] = bias[co] + sum_ci sum_(dy,dx) w[co, ci, dy, dx] * x_padded[b, ci, i + dy, j + dx]`.
fn conv_forward<T: Float>(x: &[T], wt: &[T], bias: &[T], d: ConvDims) -> Vec<T> {
    let ConvDims {
        cin, cout, h, w, ..
    } = d;
    let plane = (h + 2) * (w + 2);
    let mut y = vec![T::from_f64(0.0); d.n * cout * h * w];
    y.par_chunks_mut(cout * h * w)
        .zip(x.par_chunks(cin * h * w))
        .for_each_init(
            || vec![T::from_f64(0.0); cin * plane],
            |xp, (yb, xb)| conv_forward_image(xb, wt, bias, yb, xp, d),
        );
    y
}

/// One image's share of the weight and bias gradients, packed as [`conv_grad_params`]'s.
#[inline(always)]
fn conv_params_image_kernel<T: Float>(xb: &[T], gb: &[T], xp: &mut [T], d: ConvDims) -> Vec<f64> {
    let ConvDims {
        cin, cout, h, w, ..
    } = d;
    let pw = w + 2;
    let plane = (h + 2) * pw;
    pad_planes(xb, xp, h, w);
    let mut acc = vec![0.0f64; cout * cin * 9 + cout];
    for co in 0..cout {
        for i in 0..h {
            let grow = &gb[(co * h + i) * w..][..w];
            acc[cout * cin * 9 + co] += grow.iter().map(|v| v.to_f64()).sum::<f64>();
            for ci in 0..cin {
                let src = &xp[ci * plane..][..plane];
                let out = &mut acc[(co * cin + ci) * 9..][..9];
                for ky in 0..3 {
                    for kx in 0..3 {
                        out[ky * 3 + kx] += dot(grow, &src[(i + ky) * pw + kx..][..w]);
                    }
                }
            }
        }
    }
    acc
}

multiversion!(fn conv_params_image<T>(xb: &[T], gb: &[T], xp: &mut [T], d: ConvDims) -> Vec<f64> => conv_params_image_kernel);

/// Weight and bias gradients, packed `[cout * cin * 9 | cout]`:
/// `dw[co, ci, ky, kx] = sum_(b,i,j) g[b, co, i, j] * x_padded[b, ci, i + ky, j + kx]` and
/// `db[co] = sum g[., co, ., .]`.
fn conv_grad_params<T: Float>(x: &[T], g: &[T], d: ConvDims) -> Vec<T> {
    let ConvDims {
        cin, cout, h, w, ..
    } = d;
    let plane = (h + 2) * (w + 2);
    let len = cout * cin * 9 + cout;
    // One partial sum per image, added in image order: deterministic.
    let partials: Vec<Vec<f64>> = x
        .par_chunks(cin * h * w)
        .zip(g.par_chunks(cout * h * w))
        .map_init(
            || vec![T::from_f64(0.0); cin * plane],
            |xp, (xb, gb)| conv_params_image(xb, gb, xp, d),
        )
        .collect();
    let mut total = vec![0.0f64; len];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total.into_iter().map(T::from_f64).collect()
}

/// One image of the input gradient, `dxb [cin, h, w]` from `gb [cout, h, w]`, with `gp` a
/// zeroed scratch of `cout` padded planes.
#[inline(always)]
fn conv_input_image_kernel<T: Float>(gb: &[T], wt: &[T], dxb: &mut [T], gp: &mut [T], d: ConvDims) {
    let ConvDims {
        cin, cout, h, w, ..
    } = d;
    let pw = w + 2;
    let plane = (h + 2) * pw;
    pad_planes(gb, gp, h, w);
    for i in 0..h {
        for ci in 0..cin {
            let row = &mut dxb[(ci * h + i) * w..][..w];
            for co in 0..cout {
                let k = &wt[(co * cin + ci) * 9..][..9];
                let src = &gp[co * plane..][..plane];
                for ky in 0..3 {
                    for kx in 0..3 {
                        // g[p + 1 - ky] is padded row p + 2 - ky.
                        let at = (i + 2 - ky) * pw + 2 - kx;
                        axpy(row, k[ky * 3 + kx], &src[at..][..w]);
                    }
                }
            }
        }
    }
}

multiversion!(fn conv_input_image<T>(gb: &[T], wt: &[T], dxb: &mut [T], gp: &mut [T], d: ConvDims) => conv_input_image_kernel);

/// Input gradient: `dx[b, ci, p, q] = sum_(co,ky,kx) w[co, ci, ky, kx] * g[b, co, p + 1 - ky,
/// q + 1 - kx]` (zero outside the map), i.e. the padded gradient correlated with the flipped
/// kernel.
fn conv_grad_input<T: Float>(g: &[T], wt: &[T], d: ConvDims) -> Vec<T> {
    let ConvDims {
        cin, cout, h, w, ..
    } = d;
    let plane = (h + 2) * (w + 2);
    let mut dx = vec![T::from_f64(0.0); d.n * cin * h * w];
    dx.par_chunks_mut(cin * h * w)
        .zip(g.par_chunks(cout * h * w))
        .for_each_init(
            || vec![T::from_f64(0.0); cout * plane],
            |gp, (dxb, gb)| conv_input_image(gb, wt, dxb, gp, d),
        );
    dx
}

/// Forward of [`conv3x3`]: `(x [n, cin, h, w], weight [cout, cin, 3, 3], bias [cout])`.
struct Conv3x3 {
    /// Compute the input's gradient in `bwd` (false for the first layer, whose input is data).
    input_grad: bool,
}

fn conv_dims(x: &Layout, w: &Layout) -> candle_core::Result<ConvDims> {
    let (n, cin, h, wd) = x.shape().dims4()?;
    let (cout, wcin, kh, kw) = w.shape().dims4()?;
    if (wcin, kh, kw) != (cin, 3, 3) {
        return Err(op_error(format!(
            "conv3x3: input {:?} with weight {:?}",
            x.dims(),
            w.dims()
        )));
    }
    Ok(ConvDims {
        n,
        cin,
        cout,
        h,
        w: wd,
    })
}

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = conv_dims(l1, l2)?;
        if l3.dims() != [d.cout] {
            return Err(op_error(format!("conv3x3: bias {:?}", l3.dims())));
        }
        dispatch!(s1.dtype(), "conv3x3", T => {
            let y = conv_forward::<T>(data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, d);
            Ok((T::to_cpu_storage_owned(y), Shape::from((d.n, d.cout, d.h, d.w))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        conv3x3_bwd(
            x,
            weight,
            bias,
            grad,
            &ConvGradParams,
            self.input_grad.then_some(&ConvGradInput),
        )
    }
}

/// The backward of a 3x3 convolution op whose gradients come from two ops: `params` maps
/// `(x, grad)` to the packed `[dW | db]`, `input` (when the input is tracked) maps
/// `(grad, weight)` to dx. Shared by [`conv3x3`] and `gemm_conv`'s op.
pub(crate) fn conv3x3_bwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
    params: &impl CustomOp2,
    input: Option<&impl CustomOp2>,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let (cout, cin) = (weight.dim(0)?, weight.dim(1)?);
    let packed = x.apply_op2_no_bwd(&grad, params)?;
    let dw = packed
        .narrow(0, 0, cout * cin * 9)?
        .reshape(weight.shape())?;
    let db = packed
        .narrow(0, cout * cin * 9, cout)?
        .reshape(bias.shape())?;
    let dx = match input {
        Some(op) => Some(grad.apply_op2_no_bwd(weight, op)?),
        None => None,
    };
    Ok((dx, Some(dw), Some(db)))
}

/// `(x, grad)` -> packed `[dw | db]` (see [`conv_grad_params`]).
struct ConvGradParams;

impl CustomOp2 for ConvGradParams {
    fn name(&self) -> &'static str {
        "conv3x3-grad-params"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = l1.shape().dims4()?;
        let (gn, cout, gh, gw) = l2.shape().dims4()?;
        if (gn, gh, gw) != (n, h, w) {
            return Err(op_error(format!(
                "conv3x3 backward: input {:?}, gradient {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let d = ConvDims { n, cin, cout, h, w };
        dispatch!(s1.dtype(), "conv3x3 backward", T => {
            let p = conv_grad_params::<T>(data(s1, l1)?, data(s2, l2)?, d);
            let len = p.len();
            Ok((T::to_cpu_storage_owned(p), Shape::from(len)))
        })
    }
}

/// `(grad [n, cout, h, w], weight [cout, cin, 3, 3])` -> `dx [n, cin, h, w]`.
struct ConvGradInput;

impl CustomOp2 for ConvGradInput {
    fn name(&self) -> &'static str {
        "conv3x3-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, cout, h, w) = l1.shape().dims4()?;
        let (wcout, cin, _, _) = l2.shape().dims4()?;
        if wcout != cout {
            return Err(op_error(format!(
                "conv3x3 backward: gradient {:?}, weight {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let d = ConvDims { n, cin, cout, h, w };
        dispatch!(s1.dtype(), "conv3x3 backward", T => {
            let dx = conv_grad_input::<T>(data(s1, l1)?, data(s2, l2)?, d);
            Ok((T::to_cpu_storage_owned(dx), Shape::from((n, cin, h, w))))
        })
    }
}

/// 3x3 convolution, stride 1, zero padding 1, plus bias: `x [n, cin, h, w]`, `weight
/// [cout, cin, 3, 3]`, `bias [cout]` -> `[n, cout, h, w]`, all of one float dtype on the CPU.
///
/// Backward gives the weight and bias gradients, and the input gradient only when `x` is
/// tracked by autograd (a variable or computed from one): the first layer's images get none.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, cin, _, _) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if (wcin, kh, kw) != (cin, 3, 3) || bias.dims() != [cout] {
        return Err(Error::Model {
            model: "conv3x3".into(),
            message: format!(
                "{cin} input channels with weight {:?} and bias {:?}",
                weight.dims(),
                bias.dims()
            ),
        });
    }
    let op = Conv3x3 {
        input_grad: x.track_op(),
    };
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

// ---------------------------------------------------------------------------------------------
// BatchNorm + ReLU + max-pool.

/// Per-channel mean and biased variance of `[n, c, h, w]`, packed `[mean | var]` in f64
/// (two passes: exact enough whatever the data's offset).
struct ChannelStats;

fn channel_stats_of<T: Float>(y: &[T], n: usize, c: usize, hw: usize) -> Vec<f64> {
    let count = (n * hw) as f64;
    let sums = |mean: Option<&[f64]>| -> Vec<f64> {
        let partials: Vec<Vec<f64>> = y
            .par_chunks(c * hw)
            .map(|img| {
                img.chunks_exact(hw)
                    .enumerate()
                    .map(|(ch, plane)| match mean {
                        None => plane.iter().map(|v| v.to_f64()).sum(),
                        Some(m) => {
                            let m = T::from_f64(m[ch]);
                            plane
                                .iter()
                                .map(|&v| {
                                    let d = v - m;
                                    (d * d).to_f64()
                                })
                                .sum()
                        }
                    })
                    .collect()
            })
            .collect();
        let mut total = vec![0.0f64; c];
        for p in &partials {
            for (t, v) in total.iter_mut().zip(p) {
                *t += v;
            }
        }
        total.iter().map(|t| t / count).collect()
    };
    let mean = sums(None);
    let var = sums(Some(&mean));
    mean.into_iter().chain(var).collect()
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        dispatch!(s.dtype(), "channel stats", T => {
            let v = channel_stats_of::<T>(data(s, l)?, n, c, h * w);
            Ok((CpuStorage::F64(v), Shape::from(2 * c)))
        })
    }
}

/// Per-channel mean and biased variance (over batch, height and width) of `[n, c, h, w]`, in
/// f64: BatchNorm's batch statistics.
pub fn channel_stats(y: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let (_, c, _, _) = y.dims4()?;
    let v = y
        .contiguous()?
        .apply_op1_no_bwd(&ChannelStats)?
        .to_vec1::<f64>()?;
    let var = v[c..].to_vec();
    let mut mean = v;
    mean.truncate(c);
    Ok((mean, var))
}

/// Statistics a [`bn_relu_pool`] normalises with.
#[derive(Debug, Clone)]
pub struct BnStats {
    /// Per-channel mean, `[c]`.
    pub mean: Vec<f64>,
    /// Per-channel variance, `[c]` (BatchNorm adds its epsilon).
    pub var: Vec<f64>,
    /// True when these are the input's own batch statistics (training mode): the gradient
    /// then flows through them. False for fixed (running) statistics.
    pub batch: bool,
}

/// Forward of [`bn_relu_pool`]: `(y [n, c, h, w], gamma [c], beta [c])`.
struct BnReluPool {
    /// Per channel: `z = y * scale + shift` with `scale = gamma / sqrt(var + eps)`,
    /// `shift = beta - mean * scale` are computed in the kernels from these.
    mean: Vec<f64>,
    invstd: Vec<f64>,
    batch: bool,
}

/// `(scale, shift)` per channel, in T: `bn(y) = y * scale + shift`.
fn affine<T: Float>(gamma: &[T], beta: &[T], mean: &[f64], invstd: &[f64]) -> Vec<(T, T)> {
    (0..mean.len())
        .map(|ch| {
            let s = gamma[ch].to_f64() * invstd[ch];
            (
                T::from_f64(s),
                T::from_f64(beta[ch].to_f64() - mean[ch] * s),
            )
        })
        .collect()
}

/// Index (0..4, row-major) of the first maximum of a 2x2 window of the pre-pool activation
/// `z = relu(y * scale + shift)`, and that maximum.
#[inline(always)]
fn window_max<T: Float>(y: &[T], at: usize, w: usize, scale: T, shift: T) -> (usize, T) {
    let zero = T::from_f64(0.0);
    let z = |k: usize| {
        let v = y[k] * scale + shift;
        if v > zero {
            v
        } else {
            zero
        }
    };
    let vals = [z(at), z(at + 1), z(at + w), z(at + w + 1)];
    let mut best = 0;
    for k in 1..4 {
        if vals[k] > vals[best] {
            best = k;
        }
    }
    (best, vals[best])
}

fn bn_relu_pool_forward<T: Float>(
    y: &[T],
    ab: &[(T, T)],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
) -> Vec<T> {
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![T::from_f64(0.0); n * c * h2 * w2];
    out.par_chunks_mut(c * h2 * w2)
        .zip(y.par_chunks(c * h * w))
        .for_each(|(ob, yb)| {
            for ch in 0..c {
                let (scale, shift) = ab[ch];
                let plane = &yb[ch * h * w..][..h * w];
                let oplane = &mut ob[ch * h2 * w2..][..h2 * w2];
                for i in 0..h2 {
                    for j in 0..w2 {
                        oplane[i * w2 + j] =
                            window_max(plane, 2 * i * w + 2 * j, w, scale, shift).1;
                    }
                }
            }
        });
    out
}

/// Backward of BN + ReLU + pool, packed `[dgamma (c) | dbeta (c) | dy (n*c*h*w)]`.
///
/// With `dz` the gradient reaching the BN output (the pooled gradient at each window's first
/// maximum where that maximum is positive, 0 elsewhere) and `xhat = (y - mean) * invstd`:
/// `dbeta = sum dz`, `dgamma = sum dz * xhat`, and
/// `dy = gamma * invstd * (dz - dbeta / N - xhat * dgamma / N)` with batch statistics
/// (N = n*h*w), `gamma * invstd * dz` with fixed ones.
#[allow(clippy::too_many_arguments)]
fn bn_relu_pool_backward<T: Float>(
    y: &[T],
    gamma: &[T],
    beta: &[T],
    g: &[T],
    op: &BnReluPool,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
) -> Vec<T> {
    let (h2, w2) = (h / 2, w / 2);
    let ab = affine(gamma, beta, &op.mean, &op.invstd);
    // Pass 1: per image, per channel sums of dz and dz * xhat.
    let partials: Vec<Vec<f64>> = y
        .par_chunks(c * h * w)
        .zip(g.par_chunks(c * h2 * w2))
        .map(|(yb, gb)| {
            let mut acc = vec![0.0f64; 2 * c];
            for ch in 0..c {
                let (scale, shift) = ab[ch];
                let plane = &yb[ch * h * w..][..h * w];
                let gplane = &gb[ch * h2 * w2..][..h2 * w2];
                let (mut sdz, mut sdzx) = (0.0f64, 0.0f64);
                for i in 0..h2 {
                    for j in 0..w2 {
                        let at = 2 * i * w + 2 * j;
                        let (k, z) = window_max(plane, at, w, scale, shift);
                        if z > T::from_f64(0.0) {
                            let dz = gplane[i * w2 + j].to_f64();
                            let yv = plane[at + (k / 2) * w + k % 2].to_f64();
                            sdz += dz;
                            sdzx += dz * (yv - op.mean[ch]) * op.invstd[ch];
                        }
                    }
                }
                acc[ch] = sdzx;
                acc[c + ch] = sdz;
            }
            acc
        })
        .collect();
    let mut sums = vec![0.0f64; 2 * c];
    for p in &partials {
        for (t, v) in sums.iter_mut().zip(p) {
            *t += v;
        }
    }
    let count = (n * h * w) as f64;
    // Pass 2: dy = k * dz + (a + b * y) with per-channel k, a, b.
    let coef: Vec<(T, T, T)> = (0..c)
        .map(|ch| {
            let k = gamma[ch].to_f64() * op.invstd[ch];
            if op.batch {
                let (dgamma, dbeta) = (sums[ch], sums[c + ch]);
                // -k * (dbeta / N + (y - mean) * invstd * dgamma / N)
                let b = -k * op.invstd[ch] * dgamma / count;
                let a = -k * dbeta / count - b * op.mean[ch];
                (T::from_f64(k), T::from_f64(a), T::from_f64(b))
            } else {
                (T::from_f64(k), T::from_f64(0.0), T::from_f64(0.0))
            }
        })
        .collect();
    let mut out = vec![T::from_f64(0.0); 2 * c + n * c * h * w];
    for (o, s) in out.iter_mut().zip(&sums) {
        *o = T::from_f64(*s);
    }
    out[2 * c..]
        .par_chunks_mut(c * h * w)
        .zip(y.par_chunks(c * h * w))
        .zip(g.par_chunks(c * h2 * w2))
        .for_each(|((db, yb), gb)| {
            for ch in 0..c {
                let (scale, shift) = ab[ch];
                let (k, a, b) = coef[ch];
                let plane = &yb[ch * h * w..][..h * w];
                let dplane = &mut db[ch * h * w..][..h * w];
                let gplane = &gb[ch * h2 * w2..][..h2 * w2];
                for (d, &v) in dplane.iter_mut().zip(plane) {
                    *d = a + b * v;
                }
                for i in 0..h2 {
                    for j in 0..w2 {
                        let at = 2 * i * w + 2 * j;
                        let (kk, z) = window_max(plane, at, w, scale, shift);
                        if z > T::from_f64(0.0) {
                            dplane[at + (kk / 2) * w + kk % 2] += k * gplane[i * w2 + j];
                        }
                    }
                }
            }
        });
    out
}

impl CustomOp3 for BnReluPool {
    fn name(&self) -> &'static str {
        "bn-relu-pool"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        dispatch!(s1.dtype(), "bn-relu-pool", T => {
            let ab = affine::<T>(data(s2, l2)?, data(s3, l3)?, &self.mean, &self.invstd);
            let out = bn_relu_pool_forward::<T>(data(s1, l1)?, &ab, n, c, h, w);
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, c, h / 2, w / 2))))
        })
    }

    fn bwd(
        &self,
        y: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.dim(0)?;
        let op = BnReluPoolGrad {
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
            batch: self.batch,
            gamma: gamma.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?,
            beta: beta.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?,
        };
        let packed = y.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let dgamma = packed.narrow(0, 0, c)?;
        let dbeta = packed.narrow(0, c, c)?;
        let dy = packed
            .narrow(0, 2 * c, y.elem_count())?
            .reshape(y.shape())?;
        Ok((Some(dy), Some(dgamma), Some(dbeta)))
    }
}

/// `(y, grad)` -> packed `[dgamma | dbeta | dy]` (see [`bn_relu_pool_backward`]).
struct BnReluPoolGrad {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    batch: bool,
    gamma: Vec<f64>,
    beta: Vec<f64>,
}

impl CustomOp2 for BnReluPoolGrad {
    fn name(&self) -> &'static str {
        "bn-relu-pool-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.dims() != [n, c, h / 2, w / 2] {
            return Err(op_error(format!(
                "bn-relu-pool backward: input {:?}, gradient {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let fwd = BnReluPool {
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
            batch: self.batch,
        };
        dispatch!(s1.dtype(), "bn-relu-pool backward", T => {
            let gamma: Vec<T> = self.gamma.iter().map(|&v| T::from_f64(v)).collect();
            let beta: Vec<T> = self.beta.iter().map(|&v| T::from_f64(v)).collect();
            let out = bn_relu_pool_backward::<T>(
                data(s1, l1)?, &gamma, &beta, data(s2, l2)?, &fwd, n, c, h, w,
            );
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// BatchNorm2d (normalising with `stats`, epsilon `eps`, then `* gamma + beta`), ReLU and
/// 2x2 max-pool with stride 2, fused: `y [n, c, h, w]` -> `[n, c, h / 2, w / 2]`.
///
/// Odd sizes drop the last row and/or column in the pool, as PyTorch (they still count in
/// the batch statistics). The pool's gradient goes to the first maximum of each window in
/// row-major order, as PyTorch, and nowhere when that maximum is 0 (ReLU's gradient at 0 is 0).
/// With `stats.batch`, `stats` must be `y`'s own [`channel_stats`]: the backward pass then
/// includes their dependence on `y`, as training-mode BatchNorm.
pub fn bn_relu_pool(
    y: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: &BnStats,
    eps: f64,
) -> Result<Tensor> {
    let (_, c, h, w) = y.dims4()?;
    if gamma.dims() != [c]
        || beta.dims() != [c]
        || stats.mean.len() != c
        || stats.var.len() != c
        || h < 2
        || w < 2
    {
        return Err(Error::Model {
            model: "bn_relu_pool".into(),
            message: format!(
                "input {:?} with gamma {:?}, beta {:?} and {} statistics",
                y.dims(),
                gamma.dims(),
                beta.dims(),
                stats.mean.len()
            ),
        });
    }
    let op = BnReluPool {
        mean: stats.mean.clone(),
        invstd: stats.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
        batch: stats.batch,
    };
    Ok(y.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?)
}

/// `out[r] = features[rows[r]] . weight^T + bias`, without copying the rows out: `features
/// [n, dim]` (never given a gradient: cached data), `weight [out, dim]`, `bias [out]` ->
/// `[rows.len(), out]`. Row indices must be in range (checked).
///
/// Why not `index_select` + `matmul`: for a linear head, the step is a few passes over the
/// batch's features, and candle's matmul backward also computes the (unneeded) gradient of
/// the selected rows (a `[batch, dim]` zeros + matmul + add) besides the copy itself.
pub fn gather_linear(
    features: &Tensor,
    rows: &[usize],
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (n, dim) = features.dims2()?;
    let (out, wdim) = weight.dims2()?;
    if wdim != dim || bias.dims() != [out] {
        return Err(Error::Model {
            model: "gather_linear".into(),
            message: format!(
                "linear layer {:?} + {:?} over features [{n}, {dim}]",
                weight.dims(),
                bias.dims()
            ),
        });
    }
    if let Some(r) = rows.iter().find(|&&r| r >= n) {
        return Err(Error::Model {
            model: "gather_linear".into(),
            message: format!("row {r} of {n} feature rows"),
        });
    }
    let op = GatherLinear {
        rows: rows.to_vec(),
    };
    Ok(features
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// Forward of [`gather_linear`].
struct GatherLinear {
    rows: Vec<usize>,
}

/// One output row: `yr[o] = b[o] + xr . w[o]`.
#[inline(always)]
fn gather_row_kernel<T: Float>(xr: &[T], w: &[T], b: &[T], yr: &mut [T]) {
    let dim = xr.len();
    for (o, v) in yr.iter_mut().enumerate() {
        *v = T::from_f64(b[o].to_f64() + dot(xr, &w[o * dim..][..dim]));
    }
}

multiversion!(fn gather_row<T>(xr: &[T], w: &[T], b: &[T], yr: &mut [T]) => gather_row_kernel);

fn gather_linear_forward<T: Float>(x: &[T], w: &[T], b: &[T], rows: &[usize]) -> Vec<T> {
    let out = b.len();
    let dim = w.len() / out.max(1);
    let mut y = vec![T::from_f64(0.0); rows.len() * out];
    y.par_chunks_mut(out.max(1))
        .zip(rows.par_iter())
        .for_each(|(yr, &r)| gather_row(&x[r * dim..][..dim], w, b, yr));
    y
}

/// Columns `start..start + acc.len() / out` of `dweight`, into `acc [out, len]`.
#[inline(always)]
fn grad_columns_kernel<T: Float>(
    x: &[T],
    g: &[T],
    rows: &[usize],
    dim: usize,
    start: usize,
    acc: &mut [T],
) {
    let out = g.len() / rows.len().max(1);
    let len = acc.len() / out.max(1);
    for (k, &r) in rows.iter().enumerate() {
        let xr = &x[r * dim + start..][..len];
        for o in 0..out {
            axpy(&mut acc[o * len..][..len], g[k * out + o], xr);
        }
    }
}

multiversion!(fn grad_columns<T>(x: &[T], g: &[T], rows: &[usize], dim: usize, start: usize, acc: &mut [T]) => grad_columns_kernel);

/// Packed `[dweight (out * dim) | dbias (out)]`: `dweight[o] = sum_r g[r, o] * x[rows[r]]`,
/// split over column ranges (no reduction across threads: deterministic).
fn gather_linear_backward<T: Float>(x: &[T], g: &[T], rows: &[usize], dim: usize) -> Vec<T> {
    const COLS: usize = 2048;
    let out = g.len() / rows.len().max(1);
    let chunks: Vec<Vec<T>> = (0..dim.div_ceil(COLS))
        .into_par_iter()
        .map(|c| {
            let (start, len) = (c * COLS, COLS.min(dim - c * COLS));
            let mut acc = vec![T::from_f64(0.0); out * len];
            grad_columns(x, g, rows, dim, start, &mut acc);
            acc
        })
        .collect();
    let mut packed = vec![T::from_f64(0.0); out * dim + out];
    for (c, acc) in chunks.iter().enumerate() {
        let (start, len) = (c * COLS, COLS.min(dim - c * COLS));
        for o in 0..out {
            packed[o * dim + start..][..len].copy_from_slice(&acc[o * len..][..len]);
        }
    }
    for o in 0..out {
        let s: f64 = (0..rows.len()).map(|k| g[k * out + o].to_f64()).sum();
        packed[out * dim + o] = T::from_f64(s);
    }
    packed
}

impl CustomOp3 for GatherLinear {
    fn name(&self) -> &'static str {
        "gather-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = l3.dims().first().copied().unwrap_or(0);
        dispatch!(s1.dtype(), "gather-linear", T => {
            let y = gather_linear_forward::<T>(
                data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, &self.rows,
            );
            Ok((T::to_cpu_storage_owned(y), Shape::from((self.rows.len(), out))))
        })
    }

    fn bwd(
        &self,
        features: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GatherLinearGrad {
            rows: self.rows.clone(),
        };
        let packed = features.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let n = weight.elem_count();
        let dw = packed.narrow(0, 0, n)?.reshape(weight.shape())?;
        let db = packed.narrow(0, n, bias.elem_count())?;
        Ok((None, Some(dw), Some(db)))
    }
}

/// `(features, grad)` -> packed `[dweight | dbias]` (see [`gather_linear_backward`]).
struct GatherLinearGrad {
    rows: Vec<usize>,
}

impl CustomOp2 for GatherLinearGrad {
    fn name(&self) -> &'static str {
        "gather-linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, dim) = l1.shape().dims2()?;
        let (rows, out) = l2.shape().dims2()?;
        if rows != self.rows.len() {
            return Err(op_error(format!(
                "gather-linear backward: gradient {:?} for {} rows",
                l2.dims(),
                self.rows.len()
            )));
        }
        dispatch!(s1.dtype(), "gather-linear backward", T => {
            let p = gather_linear_backward::<T>(data(s1, l1)?, data(s2, l2)?, &self.rows, dim);
            Ok((T::to_cpu_storage_owned(p), Shape::from(out * dim + out)))
        })
    }
}
