//! EfficientNet-Lite0 as a frozen feature extractor: global-average-pooled 1280-dim features
//! (and the ImageNet logits, for parity checks), inference only.
//!
//! Weights use the EfficientNet-PyTorch (lukemelas) names: `_conv_stem`, `_bn0`,
//! `_blocks.{i}.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}`, `_conv_head`,
//! `_bn1`, `_fc`. The architecture is Lite0's published one ([`STAGES`]): a 3x3 stride-2 stem
//! to 32 channels, 16 MBConv blocks without squeeze-excite, a 1x1 head to 1280 channels;
//! ReLU6 everywhere, BatchNorm with eps 1e-3, TensorFlow "SAME" padding (asymmetric on stride
//! 2). Every BatchNorm is folded into the convolution before it at load time (in f64), so the
//! forward pass is convolutions + bias + ReLU6 only.
//!
//! Two engines compute the same function:
//! - on the CPU, [`crate::features::nhwc`]'s kernels over f32 NHWC slices (depthwise loops, 1x1 GEMMs,
//!   bias/ReLU6/residual fused), images in parallel over the rayon pool and each image's layers
//!   split into row tasks that idle threads steal;
//! - elsewhere (CUDA), candle's ops: explicit asymmetric zero padding + `conv2d` with
//!   `groups = channels` for the depthwise layers.
//!
//! Both agree with the float64 reference forward to 1e-4 relative (tests/efficientnet.rs).

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::features::nhwc::{self, Activation, Geometry};
use crate::features::weights::Weights;

/// The name of this backbone (in errors, and for the backbone registry).
pub const NAME: &str = "efficientnet_lite0";
/// Length of the pooled feature vector, whatever the input size.
pub const FEATURE_DIM: usize = 1280;
/// ImageNet classes of the `_fc` classifier.
pub const CLASSES: usize = 1000;
/// BatchNorm epsilon of the TensorFlow-trained weights (PyTorch's default is 1e-5).
pub const BN_EPS: f64 = 1e-3;
/// Channels of the stem convolution.
const STEM_CHANNELS: usize = 32;

/// One stage of MBConv blocks in EfficientNet's block-argument notation (`r1_k3_s11_e1_i32_o16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    /// Number of blocks.
    pub repeats: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Stride of the stage's first block (the others have stride 1).
    pub stride: usize,
    /// Expansion ratio of the 1x1 expand convolution (1: no expand convolution).
    pub expand: usize,
    /// Output channels.
    pub out: usize,
}

/// EfficientNet-Lite0's published block arguments (width and depth multipliers 1.0): 16 blocks.
/// The strides cannot be read from the weights; the kernel sizes can, and are checked against
/// these through the tensors' shapes.
pub const STAGES: [Stage; 7] = [
    stage(1, 3, 1, 1, 16),
    stage(2, 3, 2, 6, 24),
    stage(2, 5, 2, 6, 40),
    stage(3, 3, 2, 6, 80),
    stage(3, 5, 1, 6, 112),
    stage(4, 5, 2, 6, 192),
    stage(1, 3, 1, 6, 320),
];

const fn stage(repeats: usize, kernel: usize, stride: usize, expand: usize, out: usize) -> Stage {
    Stage {
        repeats,
        kernel,
        stride,
        expand,
        out,
    }
}

/// One MBConv block's shape, as [`STAGES`] unrolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub cin: usize,
    /// Channels after the expand convolution (`cin` when there is none).
    pub mid: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl BlockSpec {
    /// Whether the block has a 1x1 expand convolution (expansion ratio above 1).
    pub fn has_expand(&self) -> bool {
        self.mid != self.cin
    }

    /// Whether the block adds its input to its output (EfficientNet's identity skip: stride 1
    /// and as many output channels as input).
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.cin == self.cout
    }
}

/// The 16 blocks in order.
pub fn blocks() -> Vec<BlockSpec> {
    let mut specs = Vec::new();
    let mut cin = STEM_CHANNELS;
    for s in STAGES {
        for r in 0..s.repeats {
            specs.push(BlockSpec {
                cin,
                mid: cin * s.expand,
                cout: s.out,
                kernel: s.kernel,
                stride: if r == 0 { s.stride } else { 1 },
            });
            cin = s.out;
        }
    }
    specs
}

/// Channels entering the head convolution.
fn head_in() -> usize {
    STAGES[STAGES.len() - 1].out
}

/// A convolution with its BatchNorm folded in: PyTorch layout `[cout, cin / groups, k, k]`.
struct FoldedConv {
    weight: Vec<f32>,
    bias: Vec<f32>,
    cout: usize,
    cin_per_group: usize,
    k: usize,
}

impl FoldedConv {
    /// Reads `{conv}.weight` of shape `[cout, cin_per_group, k, k]` and the BatchNorm `{bn}.*`
    /// and folds them: `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * gamma / sqrt(var
    /// + eps)`, computed in f64.
    fn load(
        w: &Weights,
        conv: &str,
        bn: &str,
        cout: usize,
        cin_per_group: usize,
        k: usize,
    ) -> Result<Self> {
        let weight = read(w, &format!("{conv}.weight"), &[cout, cin_per_group, k, k])?;
        let gamma = read(w, &format!("{bn}.weight"), &[cout])?;
        let beta = read(w, &format!("{bn}.bias"), &[cout])?;
        let mean = read(w, &format!("{bn}.running_mean"), &[cout])?;
        let var_name = format!("{bn}.running_var");
        let var = read(w, &var_name, &[cout])?;
        if let Some(v) = var.iter().find(|v| **v < 0.0) {
            return Err(Error::Weights {
                path: w.path.clone(),
                tensor: var_name,
                message: format!("negative variance {v}"),
            });
        }
        let per_out = cin_per_group * k * k;
        let mut folded = Vec::with_capacity(weight.len());
        let mut bias = Vec::with_capacity(cout);
        for o in 0..cout {
            let scale = f64::from(gamma[o]) / (f64::from(var[o]) + BN_EPS).sqrt();
            folded.extend(
                weight[o * per_out..(o + 1) * per_out]
                    .iter()
                    .map(|v| (f64::from(*v) * scale) as f32),
            );
            bias.push((f64::from(beta[o]) - f64::from(mean[o]) * scale) as f32);
        }
        Ok(Self {
            weight: folded,
            bias,
            cout,
            cin_per_group,
            k,
        })
    }

    /// `[k][k][cin][cout]`: the layout of [`nhwc::dense`], [`nhwc::pointwise`] (k = 1) and, with
    /// one input channel per group, [`nhwc::depthwise`] (`[k][k][c]`).
    fn taps_major(&self) -> Vec<f32> {
        let (cin, kk) = (self.cin_per_group, self.k * self.k);
        let mut out = vec![0.0f32; self.weight.len()];
        for o in 0..self.cout {
            for i in 0..cin {
                for t in 0..kk {
                    out[(t * cin + i) * self.cout + o] = self.weight[(o * cin + i) * kk + t];
                }
            }
        }
        out
    }
}

/// A tensor as f32 values, shape-checked, with NaN and infinity rejected naming the tensor.
fn read(w: &Weights, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let values = w
        .tensor(name, shape, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::Weights {
            path: w.path.clone(),
            tensor: name.to_string(),
            message: "contains NaN or infinite values".into(),
        });
    }
    Ok(values)
}

/// All folded parameters, in file order.
struct Params {
    stem: FoldedConv,
    /// Per block: expand (if any), depthwise, project.
    blocks: Vec<(BlockSpec, Option<FoldedConv>, FoldedConv, FoldedConv)>,
    head: FoldedConv,
}

impl Params {
    fn load(w: &Weights) -> Result<Self> {
        let stem = FoldedConv::load(w, "_conv_stem", "_bn0", STEM_CHANNELS, 3, 3)?;
        let mut blocks = Vec::new();
        for (i, spec) in self::blocks().into_iter().enumerate() {
            let p = format!("_blocks.{i}");
            let expand = if spec.has_expand() {
                Some(FoldedConv::load(
                    w,
                    &format!("{p}._expand_conv"),
                    &format!("{p}._bn0"),
                    spec.mid,
                    spec.cin,
                    1,
                )?)
            } else {
                None
            };
            let depthwise = FoldedConv::load(
                w,
                &format!("{p}._depthwise_conv"),
                &format!("{p}._bn1"),
                spec.mid,
                1,
                spec.kernel,
            )?;
            let project = FoldedConv::load(
                w,
                &format!("{p}._project_conv"),
                &format!("{p}._bn2"),
                spec.cout,
                spec.mid,
                1,
            )?;
            blocks.push((spec, expand, depthwise, project));
        }
        let head = FoldedConv::load(w, "_conv_head", "_bn1", FEATURE_DIM, head_in(), 1)?;
        reject_unknown_tensors(w)?;
        Ok(Self { stem, blocks, head })
    }
}

/// Every tensor name Lite0 reads (with `_fc.*`); BatchNorm's `num_batches_tracked` is allowed
/// besides.
fn known_names() -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    let mut conv_bn = |conv: &str, bn: &str| {
        names.insert(format!("{conv}.weight"));
        for field in ["weight", "bias", "running_mean", "running_var"] {
            names.insert(format!("{bn}.{field}"));
        }
    };
    conv_bn("_conv_stem", "_bn0");
    for (i, spec) in blocks().into_iter().enumerate() {
        let p = format!("_blocks.{i}");
        if spec.has_expand() {
            conv_bn(&format!("{p}._expand_conv"), &format!("{p}._bn0"));
        }
        conv_bn(&format!("{p}._depthwise_conv"), &format!("{p}._bn1"));
        conv_bn(&format!("{p}._project_conv"), &format!("{p}._bn2"));
    }
    conv_bn("_conv_head", "_bn1");
    names.insert("_fc.weight".into());
    names.insert("_fc.bias".into());
    names
}

/// A tensor Lite0 does not use means another network with the same names: EfficientNet-B0 in
/// this naming has the very same blocks plus squeeze-excite (`_se_reduce`, `_se_expand`) and
/// swish, Lite1-4 have more blocks. Loading it as Lite0 would give wrong features silently, so
/// it is an error naming the first such tensor.
fn reject_unknown_tensors(w: &Weights) -> Result<()> {
    let known = known_names();
    let unknown = w
        .names()
        .into_iter()
        .find(|n| !known.contains(n) && !n.ends_with(".num_batches_tracked"));
    match unknown {
        None => Ok(()),
        Some(tensor) => Err(Error::Weights {
            path: w.path.clone(),
            message: "not a tensor of EfficientNet-Lite0: these weights are another network \
                      (squeeze-excite tensors mean EfficientNet-B*, more blocks a larger Lite); \
                      `backbone.name` must match the weights"
                .into(),
            tensor,
        }),
    }
}

/// A 1x1 convolution for [`nhwc::pointwise`].
fn pointwise_weights(c: &FoldedConv) -> nhwc::PointwiseWeights {
    nhwc::PointwiseWeights::new(c.cin_per_group, &c.taps_major(), &c.bias)
}

/// `out = act(input . W + b (+ residual))` over all pixels, in blocks of [`pixels_per_task`].
fn run_pointwise(
    w: &nhwc::PointwiseWeights,
    input: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let (cin, cout) = (w.cin(), w.cout());
    nhwc::for_each_rows(
        out,
        cout,
        pixels_per_task(cin, out.len() / cout),
        true,
        |p0, o| {
            let n = o.len() / cout;
            nhwc::pointwise(
                &input[p0 * cin..(p0 + n) * cin],
                w,
                act,
                residual.map(|r| &r[p0 * cout..(p0 + n) * cout]),
                o,
            );
        },
    );
}

/// Pixels per 1x1-convolution task for a layer of `m` pixels: at most about 128 KB of input,
/// which stays in L2 while the kernel passes over it once per 64 output channels (and the
/// `gemm` fallback's block of output is still in cache for its bias/activation pass), and at
/// most a quarter of the layer, so even the 7x7 layers split over threads; a multiple of the
/// kernel's 6-pixel tile. It depends on the layer's shape alone, never on the threads, so
/// results do not either.
fn pixels_per_task(cin: usize, m: usize) -> usize {
    let by_cache = 32_768 / cin.max(1);
    by_cache
        .min(m.div_ceil(4))
        .clamp(6, 1024)
        .next_multiple_of(6)
}

/// A block on the CPU engine.
struct CpuBlock {
    spec: BlockSpec,
    expand: Option<nhwc::PointwiseWeights>,
    /// `[k][k][mid]`.
    depthwise: Vec<f32>,
    depthwise_bias: Vec<f32>,
    project: nhwc::PointwiseWeights,
}

/// The CPU engine: folded weights in the NHWC kernels' layouts.
struct CpuNet {
    /// Activation buffers of finished tasks, reused by the next ones (and the next batch):
    /// fresh buffers of this size would be fresh pages, and page faults cost ~10%.
    scratch: std::sync::Mutex<Vec<Scratch>>,
    /// `[3][3][3][32]`.
    stem: Vec<f32>,
    stem_bias: Vec<f32>,
    blocks: Vec<CpuBlock>,
    head: nhwc::PointwiseWeights,
}

/// One worker's activation buffers, grown to the largest layer and reused across images.
#[derive(Default)]
struct Scratch {
    input: Vec<f32>,
    x: Vec<f32>,
    expanded: Vec<f32>,
    depthwise: Vec<f32>,
    y: Vec<f32>,
}

/// The first `n` values of `v`, grown if needed (contents unspecified: every kernel overwrites
/// its output). Never shrunk, so layers of alternating sizes do not refill it each time.
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

impl CpuNet {
    fn new(p: &Params) -> Self {
        Self {
            scratch: std::sync::Mutex::new(Vec::new()),
            stem: p.stem.taps_major(),
            stem_bias: p.stem.bias.clone(),
            blocks: p
                .blocks
                .iter()
                .map(|(spec, e, d, pr)| CpuBlock {
                    spec: *spec,
                    expand: e.as_ref().map(pointwise_weights),
                    depthwise: d.taps_major(),
                    depthwise_bias: d.bias.clone(),
                    project: pointwise_weights(pr),
                })
                .collect(),
            head: pointwise_weights(&p.head),
        }
    }

    /// Pooled features of a `[b][3][h][w]` batch into `out` (`b * 1280`). Images run in
    /// parallel and each image's layers split their rows into tasks too: a thread that runs out
    /// of images steals rows of another's, so a batch smaller than the pool (or a thread slowed
    /// by other processes) still keeps every core busy. Measured on 2 loaded cores, this is as
    /// fast as either split alone (notes/effnet.md).
    fn forward(&self, x: &[f32], b: usize, h: usize, w: usize, out: &mut [f32]) {
        let per_image = 3 * h * w;
        debug_assert_eq!(x.len(), b * per_image);
        x.par_chunks_exact(per_image)
            .zip(out.par_chunks_exact_mut(FEATURE_DIM))
            .for_each(|(img, o)| {
                let mut s = self.take_scratch();
                self.image(img, h, w, &mut s, o);
                self.return_scratch(s);
            });
    }

    fn take_scratch(&self) -> Scratch {
        // A poisoned pool only means another task panicked; its buffers are still buffers.
        let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }

    fn return_scratch(&self, s: Scratch) {
        let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(s);
    }

    /// One image, CHW in, pooled features out.
    fn image(&self, chw: &[f32], h: usize, w: usize, s: &mut Scratch, pooled: &mut [f32]) {
        // CHW -> HWC (the stem's input is small: 3 x h x w).
        let hw = h * w;
        let input = sized(&mut s.input, 3 * hw);
        for (p, px) in input.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = chw[c * hw + p];
            }
        }
        let g = Geometry::same(h, w, 3, 2);
        let (mut h, mut w) = (g.oh, g.ow);
        let x = sized(&mut s.x, h * w * STEM_CHANNELS);
        let rows = rows_per_task(g.ow * STEM_CHANNELS);
        nhwc::for_each_rows(x, g.ow * STEM_CHANNELS, rows, true, |oy0, o| {
            nhwc::dense(
                &s.input,
                3,
                &g,
                &self.stem,
                &self.stem_bias,
                Activation::Relu6,
                oy0,
                o,
            )
        });
        for blk in &self.blocks {
            let spec = blk.spec;
            let mid_in: &[f32] = match &blk.expand {
                Some(e) => {
                    let out = sized(&mut s.expanded, h * w * spec.mid);
                    run_pointwise(e, &s.x[..h * w * spec.cin], Activation::Relu6, None, out);
                    &s.expanded[..h * w * spec.mid]
                }
                None => &s.x[..h * w * spec.cin],
            };
            let g = Geometry::same(h, w, spec.kernel, spec.stride);
            let d = sized(&mut s.depthwise, g.oh * g.ow * spec.mid);
            let row_len = g.ow * spec.mid;
            nhwc::for_each_rows(d, row_len, rows_per_task(row_len), true, |oy0, o| {
                nhwc::depthwise(
                    mid_in,
                    spec.mid,
                    &g,
                    &blk.depthwise,
                    &blk.depthwise_bias,
                    Activation::Relu6,
                    oy0,
                    o,
                )
            });
            let y = sized(&mut s.y, g.oh * g.ow * spec.cout);
            let residual = spec.residual().then(|| &s.x[..h * w * spec.cin]);
            run_pointwise(
                &blk.project,
                &s.depthwise[..g.oh * g.ow * spec.mid],
                Activation::Identity,
                residual,
                y,
            );
            std::mem::swap(&mut s.x, &mut s.y);
            (h, w) = (g.oh, g.ow);
        }
        let n = h * w * FEATURE_DIM;
        let features = sized(&mut s.expanded, n);
        run_pointwise(
            &self.head,
            &s.x[..h * w * head_in()],
            Activation::Relu6,
            None,
            features,
        );
        // Global average pool, summed in f64 so large inputs lose nothing.
        let mut sum = vec![0.0f64; FEATURE_DIM];
        for px in s.expanded[..n].chunks_exact(FEATURE_DIM) {
            for (acc, v) in sum.iter_mut().zip(px) {
                *acc += f64::from(*v);
            }
        }
        let count = (h * w) as f64;
        for (o, v) in pooled.iter_mut().zip(sum) {
            *o = (v / count) as f32;
        }
    }
}

/// Output rows per task for a layer whose rows hold `row_len` values: about 16K values, so a
/// task is worth scheduling but an image still splits over a few threads.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// A convolution on candle's ops: explicit SAME padding, then an unpadded `conv2d`.
struct CandleConv {
    /// `[cout, cin / groups, k, k]`.
    weight: Tensor,
    /// `[1, cout, 1, 1]`.
    bias: Tensor,
    k: usize,
    stride: usize,
    groups: usize,
    relu6: bool,
}

impl CandleConv {
    fn new(
        c: &FoldedConv,
        stride: usize,
        groups: usize,
        relu6: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let weight = Tensor::from_slice(&c.weight, (c.cout, c.cin_per_group, c.k, c.k), device)?
            .to_dtype(dtype)?;
        let bias = Tensor::from_slice(&c.bias, (1, c.cout, 1, 1), device)?.to_dtype(dtype)?;
        Ok(Self {
            weight,
            bias,
            k: c.k,
            stride,
            groups,
            relu6,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let g = Geometry::same(h, w, self.k, self.stride);
        let (bottom, right) = g.pad_after();
        let x = if g.pad_top + bottom + g.pad_left + right > 0 {
            x.pad_with_zeros(2, g.pad_top, bottom)?
                .pad_with_zeros(3, g.pad_left, right)?
        } else {
            x.clone()
        };
        let y = x
            .conv2d(&self.weight, 0, self.stride, 1, self.groups)?
            .broadcast_add(&self.bias)?;
        Ok(if self.relu6 { y.clamp(0f32, 6f32)? } else { y })
    }
}

/// The candle engine (CUDA; also runs on the CPU, slowly, for tests).
struct CandleNet {
    stem: CandleConv,
    /// Per block: expand, depthwise, project, residual.
    blocks: Vec<(Option<CandleConv>, CandleConv, CandleConv, bool)>,
    head: CandleConv,
    dtype: DType,
}

impl CandleNet {
    fn new(p: &Params, device: &Device, dtype: DType) -> Result<Self> {
        let blocks = p
            .blocks
            .iter()
            .map(|(spec, e, d, pr)| {
                Ok((
                    e.as_ref()
                        .map(|e| CandleConv::new(e, 1, 1, true, device, dtype))
                        .transpose()?,
                    CandleConv::new(d, spec.stride, spec.mid, true, device, dtype)?,
                    CandleConv::new(pr, 1, 1, false, device, dtype)?,
                    spec.residual(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem: CandleConv::new(&p.stem, 2, 1, true, device, dtype)?,
            blocks,
            head: CandleConv::new(&p.head, 1, 1, true, device, dtype)?,
            dtype,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.stem.forward(&x.to_dtype(self.dtype)?)?;
        for (expand, depthwise, project, residual) in &self.blocks {
            let mid = match expand {
                Some(e) => e.forward(&x)?,
                None => x.clone(),
            };
            let y = project.forward(&depthwise.forward(&mid)?)?;
            x = if *residual { (y + &x)? } else { y };
        }
        Ok(self.head.forward(&x)?.mean((2, 3))?)
    }
}

enum Engine {
    Cpu(CpuNet),
    Candle(CandleNet),
}

/// EfficientNet-Lite0 with frozen, BatchNorm-folded weights.
pub struct EfficientNetLite0 {
    engine: Engine,
    /// `_fc.weight` transposed (`[1280, 1000]`) and `_fc.bias` (`[1000]`), on the engine's
    /// device, in f32; `None` when the file has no classifier (features only).
    classifier: Option<(Tensor, Tensor)>,
    /// The weights file, for the error when the classifier is asked for but absent.
    path: std::path::PathBuf,
}

impl EfficientNetLite0 {
    /// Loads the weights for `device`: the NHWC kernels on the CPU (f32), candle's ops in f32
    /// elsewhere. A missing tensor, a wrong shape, a non-finite value or a negative variance
    /// is an error naming the tensor.
    pub fn load(weights: &Weights, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            let params = Params::load(weights)?;
            Self::with_engine(weights, Engine::Cpu(CpuNet::new(&params)), &Device::Cpu)
        } else {
            Self::load_candle(weights, device, DType::F32)
        }
    }

    /// The candle-ops engine on any device and float dtype (the CUDA path; on the CPU it is a
    /// slow but independent check of the NHWC kernels).
    pub fn load_candle(weights: &Weights, device: &Device, dtype: DType) -> Result<Self> {
        let params = Params::load(weights)?;
        let net = CandleNet::new(&params, device, dtype)?;
        Self::with_engine(weights, Engine::Candle(net), device)
    }

    fn with_engine(weights: &Weights, engine: Engine, device: &Device) -> Result<Self> {
        let classifier = if weights.contains("_fc.weight") || weights.contains("_fc.bias") {
            let w = read(weights, "_fc.weight", &[CLASSES, FEATURE_DIM])?;
            let b = read(weights, "_fc.bias", &[CLASSES])?;
            Some((
                Tensor::from_vec(w, (CLASSES, FEATURE_DIM), device)?.t()?,
                Tensor::from_vec(b, CLASSES, device)?,
            ))
        } else {
            None
        };
        Ok(Self {
            engine,
            classifier,
            path: weights.path.clone(),
        })
    }

    /// Global-average-pooled features of a batch of preprocessed images, in f32 on the CPU
    /// engine (the candle engine's dtype elsewhere). Any input size works (SAME padding);
    /// 224 is what the weights were trained at.
    ///
    /// # Shapes
    /// `[b, 3, h, w]` -> `[b, 1280]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 3 || h == 0 || w == 0 {
            return Err(Error::Model {
                model: NAME.into(),
                message: format!("input of shape {:?}, expected [batch, 3, h, w]", x.dims()),
            });
        }
        match &self.engine {
            Engine::Cpu(net) => {
                let input = x
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let mut out = vec![0.0f32; b * FEATURE_DIM];
                net.forward(&input, b, h, w, &mut out);
                Ok(Tensor::from_vec(out, (b, FEATURE_DIM), &Device::Cpu)?)
            }
            Engine::Candle(net) => net.forward(x),
        }
    }

    /// ImageNet logits of a batch (the `_fc` classifier on [`Self::forward`]'s features), in
    /// f32. An error naming `_fc.weight` when the weights have no classifier.
    ///
    /// # Shapes
    /// `[b, 3, h, w]` -> `[b, 1000]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let features = self.forward(x)?;
        self.classify(&features)
    }

    /// The classifier on pooled features: `[b, 1280]` -> `[b, 1000]` logits.
    pub fn classify(&self, features: &Tensor) -> Result<Tensor> {
        let Some((w, b)) = &self.classifier else {
            return Err(Error::Weights {
                path: self.path.clone(),
                tensor: "_fc.weight".into(),
                message: "missing: these weights have no classifier, only features".into(),
            });
        };
        Ok(features.to_dtype(DType::F32)?.matmul(w)?.broadcast_add(b)?)
    }

    /// Length of the feature vector (1280 at every input size).
    pub fn feature_dim(_size: u32) -> usize {
        FEATURE_DIM
    }
}

/// The registry entry (`[backbone] name = "efficientnet_lite0"`): 1280 pooled features at any
/// input size. On the CPU the NHWC engine computes in f32 only; on CUDA candle's ops in the
/// configured arithmetic.
pub const SPEC: crate::features::backbone::BackboneSpec = crate::features::backbone::BackboneSpec {
    name: NAME,
    display: "EfficientNet-Lite0",
    feature_dim: EfficientNetLite0::feature_dim,
    load: |w, device, options| {
        use crate::config::ComputePrecision;
        let net = if device.is_cpu() {
            if options.compute != ComputePrecision::F32 {
                return Err(Error::InvalidValue {
                    key: "extract.compute".into(),
                    message: format!(
                        "`{}`: EfficientNet-Lite0's CPU engine computes in f32 only",
                        options.compute.name()
                    ),
                });
            }
            EfficientNetLite0::load(w, device)?
        } else {
            candle_core::cuda::set_gemm_reduced_precision_f32(
                options.compute == ComputePrecision::Tf32,
            );
            EfficientNetLite0::load_candle(w, device, options.compute.dtype())?
        };
        Ok(Box::new(net))
    },
};

impl crate::features::backbone::Backbone for EfficientNetLite0 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        EfficientNetLite0::forward(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_block_arguments_unroll_to_sixteen_blocks() {
        let b = blocks();
        assert_eq!(b.len(), 16);
        // The first block: no expansion, 32 -> 16, no skip (channels change).
        assert_eq!(
            b[0],
            BlockSpec {
                cin: 32,
                mid: 32,
                cout: 16,
                kernel: 3,
                stride: 1
            }
        );
        assert!(!b[0].has_expand() && !b[0].residual());
        // Stride-2 blocks open stages 2, 3, 4 and 6 (indices 1, 3, 5, 11).
        let strided: Vec<usize> = (0..16).filter(|&i| b[i].stride == 2).collect();
        assert_eq!(strided, [1, 3, 5, 11]);
        // Skips: every block that keeps stride 1 and its channel count.
        let skips: Vec<usize> = (0..16).filter(|&i| b[i].residual()).collect();
        assert_eq!(skips, [2, 4, 6, 7, 9, 10, 12, 13, 14]);
        assert_eq!(b[15].cout, 320);
        assert_eq!(b[15].mid, 1152);
        assert_eq!(head_in(), 320);
    }
}
