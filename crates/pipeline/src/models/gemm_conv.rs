//! A 3x3 convolution (stride 1, zero padding 1) plus bias for wide layers on small maps, as
//! im2col + GEMM with a hand-written backward: the op VGG16's fine-tuned block 5
//! ([`crate::models::finetune`]: 512 -> 512 channels on 14x14 maps) trains with on the CPU.
//!
//! Why not [`crate::models::ops::conv3x3`]: that direct loop is built for few channels on large
//! images (every inner loop one image row); at 512 channels and 14-wide rows its inner loops are
//! 14 elements long and it reaches a fraction of the CPU's FLOP rate. Why not
//! [`crate::models::cnn::conv3x3`] (im2col in candle ops + candle's matmul): its columns are
//! built by a stack of nine strided copies, broadcast the kernel over the batch, and candle's
//! matmul backward computes the columns' gradient (9x the input) also for the first conv, whose
//! input is cached data. Here, per image, the columns `[cin * 9, h * w]` are built by row
//! copies into a per-thread buffer, and every product is one `gemm` call:
//! - forward: `y_b = W [cout, cin*9] x col_b + bias`;
//! - input gradient (only when the input is tracked by autograd): `dcol_b = Wᵀ x g_b`, scattered
//!   back (col2im);
//! - weight gradient: `dW = sum_b g_b x col_bᵀ`, `db = sum_b rowsum(g_b)`, summed per fixed chunk
//!   of [`CHUNK`] images and the chunks added in order, so the result does not depend on the
//!   thread count.
//!
//! Images are rayon tasks, each GEMM single-threaded: with a batch of 8+ images every core has
//! whole GEMMs of `512 x 4608 x 196` to run. Tensors are NCHW, f32 or f64, contiguous, on the
//! CPU. Checked against finite differences and PyTorch in the tests.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::models::ops::{conv3x3_bwd, data, op_error, Float};

/// Images per partial sum of the weight gradient (fixed, so sums are deterministic).
const CHUNK: usize = 8;

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
}

impl Dims {
    /// Rows of the column matrix: `cin * 9`.
    fn k(&self) -> usize {
        self.cin * 9
    }

    /// Pixels of one map: `h * w`.
    fn p(&self) -> usize {
        self.h * self.w
    }
}

/// A row-major or transposed view of a matrix in a slice: `(slice, row stride, column
/// stride)`.
type View<'a, T> = (&'a [T], usize, usize);

/// `dst [m, n] (row-major, row stride n) = (accumulate ? dst : 0) + a [m, k] x b [k, n]`.
fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: View<T>,
    b: View<T>,
) {
    let (a, a_rs, a_cs) = a;
    let (b, b_rs, b_cs) = b;
    // The last element each operand is read at: checked so that the raw GEMM stays in bounds.
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(dst.len() >= m * n, "gemm_conv: destination too small");
    assert!(m == 0 || k == 0 || last(a_rs, a_cs, m, k) < a.len());
    assert!(n == 0 || k == 0 || last(b_rs, b_cs, k, n) < b.len());
    // SAFETY: every index the GEMM reads or writes is within the slices (checked above); `dst`
    // is a unique borrow, so it does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `col [cin * 9, h * w]`: row `(ci, ky, kx)`, column `(i, j)` holds `x[ci, i + ky - 1,
/// j + kx - 1]` (0 outside the map).
fn im2col<T: Float>(x: &[T], col: &mut [T], d: Dims) {
    let (h, w) = (d.h, d.w);
    let zero = T::from_f64(0.0);
    for ci in 0..d.cin {
        let plane = &x[ci * h * w..][..h * w];
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &mut col[(ci * 9 + ky * 3 + kx) * h * w..][..h * w];
                for (i, out) in row.chunks_exact_mut(w).enumerate() {
                    let si = i + ky;
                    if si == 0 || si > h {
                        out.fill(zero);
                        continue;
                    }
                    let src = &plane[(si - 1) * w..][..w];
                    match kx {
                        0 => {
                            out[0] = zero;
                            out[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => out.copy_from_slice(src),
                        _ => {
                            out[..w - 1].copy_from_slice(&src[1..]);
                            out[w - 1] = zero;
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `dx [cin, h, w] += ` each column entry at its source pixel.
fn col2im<T: Float>(col: &[T], dx: &mut [T], d: Dims) {
    let (h, w) = (d.h, d.w);
    for ci in 0..d.cin {
        let plane = &mut dx[ci * h * w..][..h * w];
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &col[(ci * 9 + ky * 3 + kx) * h * w..][..h * w];
                for (i, src) in row.chunks_exact(w).enumerate() {
                    let si = i + ky;
                    if si == 0 || si > h {
                        continue;
                    }
                    let out = &mut plane[(si - 1) * w..][..w];
                    let (o, s) = match kx {
                        0 => (&mut out[..w - 1], &src[1..]),
                        1 => (&mut out[..], src),
                        _ => (&mut out[1..], &src[..w - 1]),
                    };
                    for (a, &b) in o.iter_mut().zip(s) {
                        *a += b;
                    }
                }
            }
        }
    }
}

fn forward<T: Float>(x: &[T], wt: &[T], bias: &[T], d: Dims) -> Vec<T> {
    let (k, p) = (d.k(), d.p());
    let mut y = vec![T::from_f64(0.0); d.n * d.cout * p];
    y.par_chunks_mut(d.cout * p)
        .zip(x.par_chunks(d.cin * p))
        .for_each_init(
            || vec![T::from_f64(0.0); k * p],
            |col, (yb, xb)| {
                im2col(xb, col, d);
                for (row, &b) in yb.chunks_exact_mut(p).zip(bias) {
                    row.fill(b);
                }
                matmul(d.cout, p, k, yb, true, (wt, k, 1), (col, p, 1));
            },
        );
    y
}

/// Packed `[dW (cout * cin * 9) | db (cout)]`.
fn grad_params<T: Float>(x: &[T], g: &[T], d: Dims) -> Vec<T> {
    let (k, p) = (d.k(), d.p());
    let len = d.cout * k + d.cout;
    let partials: Vec<Vec<T>> = x
        .par_chunks(CHUNK * d.cin * p)
        .zip(g.par_chunks(CHUNK * d.cout * p))
        .map(|(xs, gs)| {
            let mut acc = vec![T::from_f64(0.0); len];
            let mut col = vec![T::from_f64(0.0); k * p];
            let (dw, db) = acc.split_at_mut(d.cout * k);
            for (xb, gb) in xs.chunks_exact(d.cin * p).zip(gs.chunks_exact(d.cout * p)) {
                im2col(xb, &mut col, d);
                // dW [cout, k] += g_b [cout, p] x col_bᵀ [p, k].
                matmul(d.cout, k, p, dw, true, (gb, p, 1), (&col, 1, p));
                for (b, row) in db.iter_mut().zip(gb.chunks_exact(p)) {
                    *b += row.iter().fold(T::from_f64(0.0), |s, &v| s + v);
                }
            }
            acc
        })
        .collect();
    let mut total = vec![T::from_f64(0.0); len];
    for part in &partials {
        for (t, &v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    total
}

fn grad_input<T: Float>(g: &[T], wt: &[T], d: Dims) -> Vec<T> {
    let (k, p) = (d.k(), d.p());
    let mut dx = vec![T::from_f64(0.0); d.n * d.cin * p];
    dx.par_chunks_mut(d.cin * p)
        .zip(g.par_chunks(d.cout * p))
        .for_each_init(
            || vec![T::from_f64(0.0); k * p],
            |dcol, (dxb, gb)| {
                // dcol [k, p] = Wᵀ [k, cout] x g_b [cout, p].
                matmul(k, p, d.cout, dcol, false, (wt, 1, k), (gb, p, 1));
                col2im(dcol, dxb, d);
            },
        );
    dx
}

/// Runs `$body` with `$t` bound to f32 or f64 according to `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => Err(op_error(format!(
                "gemm-conv3x3: unsupported dtype {other:?}"
            ))),
        }
    };
}

fn dims(x: &Layout, w: &Layout) -> candle_core::Result<Dims> {
    let (n, cin, h, wd) = x.shape().dims4()?;
    let (cout, wcin, kh, kw) = w.shape().dims4()?;
    if (wcin, kh, kw) != (cin, 3, 3) || h == 0 || wd == 0 {
        return Err(op_error(format!(
            "gemm-conv3x3: input {:?} with weight {:?}",
            x.dims(),
            w.dims()
        )));
    }
    Ok(Dims {
        n,
        cin,
        cout,
        h,
        w: wd,
    })
}

/// `(x, weight, bias)` -> `y`.
struct GemmConv {
    /// Compute the input's gradient in `bwd` (false when the input is data).
    input_grad: bool,
}

impl CustomOp3 for GemmConv {
    fn name(&self) -> &'static str {
        "gemm-conv3x3"
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
        let d = dims(l1, l2)?;
        if l3.dims() != [d.cout] {
            return Err(op_error(format!("gemm-conv3x3: bias {:?}", l3.dims())));
        }
        by_dtype!(s1.dtype(), T => {
            let y = forward::<T>(data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, d);
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
            &GradParams,
            self.input_grad.then_some(&GradInput),
        )
    }
}

/// `(x, grad)` -> packed `[dW | db]`.
struct GradParams;

impl CustomOp2 for GradParams {
    fn name(&self) -> &'static str {
        "gemm-conv3x3-grad-params"
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
                "gemm-conv3x3 backward: input {:?}, gradient {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let d = Dims { n, cin, cout, h, w };
        by_dtype!(s1.dtype(), T => {
            let p = grad_params::<T>(data(s1, l1)?, data(s2, l2)?, d);
            let len = p.len();
            Ok((T::to_cpu_storage_owned(p), Shape::from(len)))
        })
    }
}

/// `(grad [n, cout, h, w], weight [cout, cin, 3, 3])` -> `dx [n, cin, h, w]`.
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "gemm-conv3x3-grad-input"
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
                "gemm-conv3x3 backward: gradient {:?}, weight {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let d = Dims { n, cin, cout, h, w };
        by_dtype!(s1.dtype(), T => {
            let dx = grad_input::<T>(data(s1, l1)?, data(s2, l2)?, d);
            Ok((T::to_cpu_storage_owned(dx), Shape::from((n, cin, h, w))))
        })
    }
}

/// 3x3 convolution, stride 1, zero padding 1, plus bias, as im2col + GEMM: `x [n, cin, h, w]`,
/// `weight [cout, cin, 3, 3]`, `bias [cout]` -> `[n, cout, h, w]`, one float dtype (f32 or
/// f64), on the CPU.
///
/// Backward gives the weight and bias gradients, and the input gradient only when `x` is
/// tracked by autograd (cached activations get none).
pub fn conv3x3_gemm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, cin, _, _) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if (wcin, kh, kw) != (cin, 3, 3) || bias.dims() != [cout] {
        return Err(Error::Model {
            model: "conv3x3_gemm".into(),
            message: format!(
                "{cin} input channels with weight {:?} and bias {:?}",
                weight.dims(),
                bias.dims()
            ),
        });
    }
    let op = GemmConv {
        input_grad: x.track_op(),
    };
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}
