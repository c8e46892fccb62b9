//! The study's from-scratch baseline: blocks of Conv2d(3x3, padding 1) + BatchNorm2d + ReLU +
//! MaxPool(2x2), then one linear layer, trained on the raw images (pixels / 255). Owns the
//! model's layers, their PyTorch-like initialisation and batch-norm semantics, the max-pool
//! (written here because candle's `max_pool2d` backward is wrong), image loading for it, and
//! its file format. On the CPU a block runs as two custom ops with hand-written backward
//! passes ([`crate::models::ops`]: conv + bias, then BN + ReLU + pool fused), which is what makes
//! training fast; other devices use the same layers in plain candle ops.
//!
//! Saved names: `block{i}.conv.weight` `[out, in, 3, 3]`, `block{i}.conv.bias`,
//! `block{i}.bn.weight` (gamma), `block{i}.bn.bias` (beta), `block{i}.bn.running_mean`,
//! `block{i}.bn.running_var`, `fc.weight` `[classes, in]`, `fc.bias`; the shape is in the
//! metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::{ChannelOrder, ResizeMode};
use crate::data::dataset::InputLimits;
use crate::data::preprocess::Preprocessing;
use crate::error::{Error, Result};
use crate::models::ops::{self, BnStats};
use crate::models::params::{Params, SavedState};
use crate::training::fit::{Model, Rows};
use crate::training::rng::Rng;

/// PyTorch's BatchNorm2d defaults.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// Loads images for the CNN: squashed to `size` x `size`, RGB, pixels / 255, no
/// normalisation. Returns `[n, 3, size, size]` f32 on the CPU; an unreadable image, or one
/// beyond `limits`, is an error naming its file.
pub fn load_images(paths: &[&Path], size: u32, limits: &InputLimits) -> Result<Tensor> {
    let pre = Preprocessing {
        input_size: size,
        input_scale: 1.0,
        mean: [0.0; 3],
        std: [1.0; 3],
        channel_order: ChannelOrder::Rgb,
        resize: ResizeMode::Squash,
    };
    let mut data = Vec::with_capacity(paths.len() * pre.len());
    for image in pre.load_many_within(paths, limits) {
        data.extend(image?);
    }
    let s = size as usize;
    Ok(Tensor::from_vec(
        data,
        (paths.len(), 3, s, s),
        &Device::Cpu,
    )?)
}

/// 2x2 max-pooling with stride 2: `[b, c, h, w]` -> `[b, c, h / 2, w / 2]`.
///
/// Odd sizes follow PyTorch's floor semantics: the last row and/or column is dropped (and gets
/// zero gradient). The gradient is exactly the output gradient at each window's maximum and 0
/// elsewhere. On ties (common: a flat image region gives equal activations) only the first
/// maximum in row-major order gets it, as in PyTorch; a plain `max` reduction would hand the
/// full gradient to every tied element and so over-count flat regions.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    if h2 == 0 || w2 == 0 {
        return Err(Error::Model {
            model: "cnn".into(),
            message: format!("cannot max-pool a {h}x{w} map with a 2x2 window"),
        });
    }
    let x = if h % 2 == 1 || w % 2 == 1 {
        x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?
    } else {
        x.clone()
    };
    // [b, c, h2, 2, w2, 2] -> [b, c, h2, w2, 4]: each window's 4 values, row-major.
    let windows = x
        .reshape((b, c, h2, 2, w2, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((b, c, h2, w2, 4))?;
    // One-hot of the first maximum: a constant (no gradient), so the product's gradient flows
    // to that one element only.
    let first_max = windows.argmax_keepdim(4)?;
    let slots = Tensor::arange(0u32, 4, x.device())?.reshape((1, 1, 1, 1, 4))?;
    let one_hot = first_max.broadcast_eq(&slots)?.to_dtype(x.dtype())?;
    Ok((windows * one_hot)?.sum(4)?)
}

/// 3x3 convolution, stride 1, zero padding 1: `[b, in, h, w]` with weight `[out, in, 3, 3]`
/// -> `[b, out, h, w]` (no bias), in plain candle ops: the path for devices other than the
/// CPU (training on the CPU uses [`ops::conv3x3`], whose backward is hand-written).
///
/// Written as im2col + one batched matmul instead of candle's `conv2d`, whose CPU backward is
/// what made training slow: it always computes the input's gradient with `conv_transpose2d`
/// (24 s of a 33 s backward for 128 images of 224x224, wasted on the first block, whose input
/// is the images) and the kernel's with a 224x224-kernel convolution (10 s). Here both are
/// plain matmuls (that block's backward measured ~4 s). candle's matmul backward still
/// computes a gradient for the columns even when nothing needs it, and the columns cost
/// `9 * in` times the input's memory (0.7 GB for 128 RGB images of 224x224 in f32). The whole
/// model is checked against finite differences in the tests.
pub fn conv3x3(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if (wcin, kh, kw) != (cin, 3, 3) {
        return Err(Error::Model {
            model: "cnn".into(),
            message: format!(
                "3x3 convolution of {cin} channels with a weight of shape {:?}",
                weight.dims()
            ),
        });
    }
    // Each image zero-padded to (h + 2) x (w + 2), flattened, plus 2 trailing zeros. Output
    // (i, j) is computed on the padded width (j in 0..w + 2; the last 2 columns are garbage,
    // dropped below), so that tap (dy, dx) reads the flat input at
    // (i * (w + 2) + j) + (dy * (w + 2) + dx): one contiguous run per tap and channel, copied
    // with memcpy-like block copies instead of element by element.
    let pw = w + 2;
    let padded = x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .reshape((b, cin, (h + 2) * pw))?
        .pad_with_zeros(2, 0, 2)?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            taps.push(padded.narrow(2, dy * pw + dx, h * pw)?);
        }
    }
    // Columns ordered (channel, dy, dx): the order of the weight's flattened rows.
    let cols = Tensor::stack(&taps, 2)?.reshape((b, cin * 9, h * pw))?;
    let kernel = weight
        .reshape((1, cout, cin * 9))?
        .broadcast_as((b, cout, cin * 9))?;
    Ok(kernel
        .matmul(&cols)?
        .reshape((b, cout, h, pw))?
        .narrow(3, 0, w)?)
}

/// Conv2d(3x3, padding 1) + BatchNorm2d + ReLU + MaxPool(2x2).
struct Block {
    /// `[out, in, 3, 3]`.
    conv_weight: Var,
    /// `[out]`.
    conv_bias: Var,
    /// BN scale (gamma) and shift (beta), `[out]`.
    bn_weight: Var,
    bn_bias: Var,
    /// Not trained: updated in training mode, used in evaluation mode.
    running_mean: Var,
    running_var: Var,
}

impl Block {
    /// Block `i`, registered in `params` as `block{i}.*`. PyTorch's defaults: conv weight then
    /// bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in * 9; gamma 1, beta 0,
    /// running mean 0, running variance 1.
    fn new(
        params: &Params,
        i: usize,
        inputs: usize,
        outputs: usize,
        rng: &mut Rng,
    ) -> Result<Self> {
        let bound = 1.0 / ((inputs * 9) as f32).sqrt();
        let name = |n: &str| format!("block{i}.{n}");
        Ok(Self {
            conv_weight: params.uniform(
                &name("conv.weight"),
                (outputs, inputs, 3, 3),
                bound,
                rng,
            )?,
            conv_bias: params.uniform(&name("conv.bias"), outputs, bound, rng)?,
            bn_weight: params.constant(&name("bn.weight"), outputs, 1.0)?,
            bn_bias: params.constant(&name("bn.bias"), outputs, 0.0)?,
            running_mean: params.buffer(&name("bn.running_mean"), outputs, 0.0)?,
            running_var: params.buffer(&name("bn.running_var"), outputs, 1.0)?,
        })
    }

    /// `[b, in, h, w]` -> `[b, out, h / 2, w / 2]`: the custom ops of [`crate::models::ops`]
    /// (conv + bias, then BN + ReLU + pool fused), whose backward passes are hand-written.
    /// Training mode normalises with the batch's statistics (and updates the running ones, see
    /// [`Block::update_running`]); evaluation mode with the running statistics.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return self.forward_candle(x, train);
        }
        let y = ops::conv3x3(x, &self.conv_weight, &self.conv_bias)?;
        let stats = if train {
            let (mean, var) = ops::channel_stats(&y)?;
            let (b, _, h, w) = y.dims4()?;
            self.update_running(&mean, &var, b * h * w)?;
            BnStats {
                mean,
                var,
                batch: true,
            }
        } else {
            let f64s = |v: &Var| -> Result<Vec<f64>> {
                Ok(v.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?)
            };
            BnStats {
                mean: f64s(&self.running_mean)?,
                var: f64s(&self.running_var)?,
                batch: false,
            }
        };
        ops::bn_relu_pool(&y, &self.bn_weight, &self.bn_bias, &stats, BN_EPS)
    }

    /// [`Block::forward`] in plain candle ops, for devices the custom ops do not run on (their
    /// kernels are CPU-only): [`conv3x3`], BatchNorm2d, ReLU, [`max_pool2x2`].
    fn forward_candle(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = (x.dim(0)?, self.conv_bias.dim(0)?, x.dim(2)?, x.dim(3)?);
        let shape = (1, c, 1, 1);
        let y = conv3x3(x, &self.conv_weight)?.broadcast_add(&self.conv_bias.reshape(shape)?)?;
        let (mean, var) = if train {
            let mean = y.mean_keepdim((0, 2, 3))?;
            let var = y.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
            let f64s = |t: &Tensor| -> Result<Vec<f64>> {
                Ok(t.detach()
                    .flatten_all()?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?)
            };
            self.update_running(&f64s(&mean)?, &f64s(&var)?, b * h * w)?;
            (mean, var)
        } else {
            (
                self.running_mean.reshape(shape)?,
                self.running_var.reshape(shape)?,
            )
        };
        let y = y
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?
            .broadcast_mul(&self.bn_weight.reshape(shape)?)?
            .broadcast_add(&self.bn_bias.reshape(shape)?)?
            .relu()?;
        max_pool2x2(&y)
    }

    /// BatchNorm2d's running estimates move towards the batch's mean and unbiased variance
    /// (`n` values per channel) by `BN_MOMENTUM`, as PyTorch.
    fn update_running(&self, mean: &[f64], var: &[f64], n: usize) -> Result<()> {
        let m = BN_MOMENTUM;
        let n = n as f64;
        let unbiased = |v: f64| if n > 1.0 { v * n / (n - 1.0) } else { v };
        let blend = |running: &Var, batch: Vec<f64>| -> Result<()> {
            let old = running.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let new: Vec<f64> = old
                .iter()
                .zip(&batch)
                .map(|(o, b)| (1.0 - m) * o + m * b)
                .collect();
            let t = Tensor::from_vec(new, old.len(), running.device())?;
            running.set(&t.to_dtype(running.dtype())?)?;
            Ok(())
        };
        blend(&self.running_mean, mean.to_vec())?;
        blend(
            &self.running_var,
            var.iter().map(|&v| unbiased(v)).collect(),
        )
    }
}

/// What a CNN is: everything but its parameter values (recorded in its file's metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnnShape {
    /// Output channels of each block; the length is the depth.
    pub channels: Vec<usize>,
    /// Side of the square input, divisible by `2^depth`.
    pub input_size: usize,
    pub classes: usize,
}

impl CnnShape {
    /// Side of the last block's output map; an error when the shape cannot be built.
    fn final_side(&self) -> Result<usize> {
        let depth = self.channels.len();
        let bad = |message: String| {
            Err(Error::Model {
                model: "cnn".into(),
                message,
            })
        };
        if depth == 0 || self.channels.contains(&0) || self.classes == 0 {
            return bad(format!(
                "a CNN needs 1+ blocks of 1+ channels and 1+ classes (channels {:?}, classes {})",
                self.channels, self.classes
            ));
        }
        let pools = 1usize << depth.min(usize::BITS as usize - 1);
        let side = self.input_size / pools;
        if side == 0 || side * pools != self.input_size {
            return bad(format!(
                "input size {} is not divisible by {pools} (one 2x2 pool per block)",
                self.input_size
            ));
        }
        Ok(side)
    }
}

/// The baseline CNN: parameters only; the trainer passes the images.
pub struct Cnn {
    shape: CnnShape,
    params: Params,
    blocks: Vec<Block>,
    /// `[classes, c_last * (s / 2^depth)^2]`.
    fc_weight: Var,
    fc_bias: Var,
}

impl Cnn {
    /// A new model whose parameters take `dtype` and live on `device`, drawn from `rng` block
    /// by block (conv weight, conv bias), then the linear layer (weight, bias), like
    /// PyTorch's defaults.
    pub fn new(shape: &CnnShape, rng: &mut Rng, dtype: DType, device: &Device) -> Result<Self> {
        let side = shape.final_side()?;
        let params = Params::new(dtype, device);
        let mut blocks = Vec::with_capacity(shape.channels.len());
        let mut inputs = 3;
        for (i, &outputs) in shape.channels.iter().enumerate() {
            blocks.push(Block::new(&params, i, inputs, outputs, rng)?);
            inputs = outputs;
        }
        let fan_in = inputs * side * side;
        let bound = 1.0 / (fan_in as f32).sqrt();
        let fc_weight = params.uniform("fc.weight", (shape.classes, fan_in), bound, rng)?;
        let fc_bias = params.uniform("fc.bias", shape.classes, bound, rng)?;
        Ok(Self {
            shape: shape.clone(),
            params,
            blocks,
            fc_weight,
            fc_bias,
        })
    }

    pub fn shape(&self) -> &CnnShape {
        &self.shape
    }

    /// `[b, 3, s, s]` (the model's dtype and device) -> logits `[b, classes]`.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let s = self.shape.input_size;
        if x.dims().len() != 4 || x.dims()[1..] != [3, s, s] || x.dtype() != self.params.dtype() {
            return Err(Error::Model {
                model: "cnn".into(),
                message: format!(
                    "images {:?} of {:?} for a CNN over [n, 3, {s}, {s}] of {:?}",
                    x.dims(),
                    x.dtype(),
                    self.params.dtype()
                ),
            });
        }
        let mut x = x.clone();
        for block in &self.blocks {
            x = block.forward(&x, train)?;
        }
        // Flattened in C, H, W order, as PyTorch's `flatten(1)`.
        let x = x.flatten_from(1)?;
        Ok(x.matmul(&self.fc_weight.as_tensor().t()?)?
            .broadcast_add(self.fc_bias.as_tensor())?)
    }

    /// Evaluation-mode logits `[b, classes]` of new images `[b, 3, s, s]` (pixels / 255, as
    /// [`load_images`] gives; converted to the model's dtype and device).
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        let x = images
            .to_dtype(self.params.dtype())?
            .to_device(self.params.device())?;
        self.forward(&x, false)
    }

    /// Writes the model (parameters and running statistics as f32, shape as metadata) to a
    /// safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let s = &self.shape;
        let meta: HashMap<String, String> = [
            (
                "channels",
                serde_json::to_string(&s.channels).unwrap_or_default(),
            ),
            ("input_size", s.input_size.to_string()),
            ("classes", s.classes.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        self.params.save(path, meta)
    }

    /// A model saved by [`Cnn::save`], in f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let saved = SavedState::open(path)?;
        let shape = CnnShape {
            channels: saved.field("channels")?,
            input_size: saved.field("input_size")?,
            classes: saved.field("classes")?,
        };
        // The random values are overwritten by the file's.
        let cnn = Self::new(&shape, &mut Rng::new(0), DType::F32, device)?;
        cnn.params.load(&saved)?;
        Ok(cnn)
    }
}

impl Model for Cnn {
    fn params(&self) -> &Params {
        &self.params
    }

    fn forward_t(&self, x: &Rows, train: bool) -> Result<Tensor> {
        self.forward(&x.gather()?, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainSettings;
    use crate::training::fit::{fit, Labelled, TrainOptions};

    fn random_images(n: usize, s: usize, dtype: DType, seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let v: Vec<f32> = (0..n * 3 * s * s).map(|_| rng.uniform_f32()).collect();
        Tensor::from_vec(v, (n, 3, s, s), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("images")
    }

    fn grad_of_sum(x: &Tensor) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let var = Var::from_tensor(x).expect("var");
        let y = max_pool2x2(&var).expect("pool");
        let grads = y.sum_all().and_then(|s| s.backward()).expect("backward");
        let g = grads.get(&var).expect("grad");
        (
            y.squeeze(0)
                .and_then(|t| t.squeeze(0))
                .and_then(|t| t.to_vec2())
                .expect("y"),
            g.squeeze(0)
                .and_then(|t| t.squeeze(0))
                .and_then(|t| t.to_vec2())
                .expect("g"),
        )
    }

    #[test]
    fn conv3x3_matches_candles_conv2d() {
        let x = random_images(2, 5, DType::F64, 7);
        let w = random_images(4, 3, DType::F64, 8);
        let ours = conv3x3(&x, &w).expect("ours");
        let theirs = x.conv2d(&w, 1, 1, 1, 1).expect("candle");
        let diff = (ours - theirs)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f64>())
            .expect("diff");
        assert!(diff < 1e-12, "{diff}");
        let wrong = random_images(4, 5, DType::F64, 8);
        assert!(conv3x3(&x, &wrong).is_err());
    }

    #[test]
    fn max_pool_gradient_is_one_at_each_maximum() {
        // 4x4, distinct values; maxima at (0,1), (1,3), (3,0), (2,2).
        #[rustfmt::skip]
        let x = [
            1.0, 9.0, 2.0, 3.0,
            4.0, 5.0, 6.0, 8.0,
            0.5, 7.0, 9.5, 1.5,
            7.5, 2.5, 3.5, 4.5f32,
        ];
        let x = Tensor::from_vec(x.to_vec(), (1, 1, 4, 4), &Device::Cpu).expect("x");
        let (y, g) = grad_of_sum(&x);
        assert_eq!(y, [[9.0, 8.0], [7.5, 9.5]]);
        #[rustfmt::skip]
        let want = [
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 1.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
        ];
        assert_eq!(g, want);
    }

    #[test]
    fn max_pool_drops_the_last_row_and_column_of_odd_sizes() {
        // 5x5 with the largest values in the dropped last row and column.
        let v: Vec<f32> = (0..25)
            .map(|i| {
                if i % 5 == 4 || i / 5 == 4 {
                    100.0 + i as f32
                } else {
                    i as f32
                }
            })
            .collect();
        let x = Tensor::from_vec(v, (1, 1, 5, 5), &Device::Cpu).expect("x");
        let (y, g) = grad_of_sum(&x);
        // Windows of the top-left 4x4; each maximum is its bottom-right element.
        assert_eq!(y, [[6.0, 8.0], [16.0, 18.0]]);
        let mut want = vec![vec![0.0f32; 5]; 5];
        for (r, c) in [(1, 1), (1, 3), (3, 1), (3, 3)] {
            want[r][c] = 1.0;
        }
        assert_eq!(g, want);
    }

    #[test]
    fn max_pool_gives_a_tie_one_gradient() {
        let x = Tensor::from_vec(
            vec![3.0f32, 3.0, 0.0, 2.0, 1.0, 3.0, 2.0, 2.0],
            (1, 1, 2, 4),
            &Device::Cpu,
        )
        .expect("x");
        let (y, g) = grad_of_sum(&x);
        assert_eq!(y, [[3.0, 2.0]]);
        // The first maximum in row-major order of each window, as PyTorch.
        // Left window 3, 3 / 1, 3: the top-left 3. Right window 0, 2 / 2, 2: the top-right 2.
        assert_eq!(g, [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]);
    }

    fn cnn(channels: &[usize], size: usize, classes: usize, seed: u64, dtype: DType) -> Cnn {
        let shape = CnnShape {
            channels: channels.to_vec(),
            input_size: size,
            classes,
        };
        Cnn::new(&shape, &mut Rng::new(seed), dtype, &Device::Cpu).expect("cnn")
    }

    /// Loss of the model's training-mode logits on `rows` of `x`, in f64.
    fn loss(cnn: &Cnn, x: &Tensor, labels: &[usize], rows: &[usize]) -> Tensor {
        let logits = cnn
            .forward_t(&Rows { data: x, rows }, true)
            .expect("logits");
        let y: Vec<u32> = rows.iter().map(|&r| labels[r] as u32).collect();
        let y = Tensor::from_vec(y, rows.len(), &Device::Cpu).expect("labels");
        candle_nn::loss::cross_entropy(&logits, &y).expect("loss")
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        let images = random_images(3, 8, DType::F64, 21);
        let labels = [0, 1, 1];
        let cnn = cnn(&[2, 3], 8, 2, 22, DType::F64);
        // Non-trivial BN affine parameters, so their gradients are exercised away from 1/0.
        let mut rng = Rng::new(23);
        for b in &cnn.blocks {
            for v in [&b.bn_weight, &b.bn_bias] {
                let n = v.elem_count();
                let vals: Vec<f64> = (0..n).map(|_| 0.5 + rng.uniform_f32() as f64).collect();
                v.set(&Tensor::from_vec(vals, n, &Device::Cpu).expect("t"))
                    .expect("set");
            }
        }
        let rows = [0, 1, 2];
        let grads = loss(&cnn, &images, &labels, &rows)
            .backward()
            .expect("backward");
        let h = 1e-6;
        let mut checked = 0;
        for (name, var) in cnn.params().sorted().expect("params") {
            if name.contains("running") {
                continue;
            }
            let analytic = grads
                .get(&var)
                .expect("every parameter has a gradient")
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .expect("grad");
            let base = var
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .expect("values");
            for i in 0..base.len() {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).expect("t");
                    var.set(&t).expect("set");
                    loss(&cnn, &images, &labels, &rows)
                        .to_scalar::<f64>()
                        .expect("loss")
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                let a = analytic[i];
                let tol = 1e-7 + 1e-6 * a.abs().max(numeric.abs());
                assert!(
                    (a - numeric).abs() <= tol,
                    "{name}[{i}]: analytic {a}, numeric {numeric}"
                );
                checked += 1;
            }
            var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).expect("t"))
                .expect("reset");
        }
        // conv 2*3*9+2 + 3*2*9+3, bn 2*2 + 2*3, fc 2*12+2.
        assert_eq!(checked, 56 + 57 + 4 + 6 + 26);
    }

    /// The block written with plain candle ops (the fused ops' reference): conv2d + bias,
    /// BatchNorm2d on the given statistics, ReLU, [`max_pool2x2`].
    fn reference_block(block: &Block, x: &Tensor, mean: &Tensor, var: &Tensor) -> Tensor {
        let c = block.conv_bias.dim(0).expect("c");
        let shape = (1, c, 1, 1);
        let conv = x
            .conv2d(&block.conv_weight, 1, 1, 1, 1)
            .and_then(|y| y.broadcast_add(&block.conv_bias.reshape(shape)?))
            .expect("conv");
        let y = conv
            .broadcast_sub(&mean.reshape(shape).expect("m"))
            .and_then(|d| d.broadcast_div(&(var.reshape(shape)? + BN_EPS)?.sqrt()?))
            .and_then(|d| d.broadcast_mul(&block.bn_weight.reshape(shape)?))
            .and_then(|d| d.broadcast_add(&block.bn_bias.reshape(shape)?))
            .and_then(|d| d.relu())
            .expect("bn");
        max_pool2x2(&y).expect("pool")
    }

    #[test]
    fn batch_norm_train_and_eval_modes() {
        let images = random_images(4, 4, DType::F64, 1);
        let cnn = cnn(&[3], 4, 2, 2, DType::F64);
        let block = &cnn.blocks[0];
        // Non-trivial affine parameters.
        block
            .bn_weight
            .set(&Tensor::new(&[0.5f64, 1.5, -0.7], &Device::Cpu).expect("g"))
            .expect("set");
        block
            .bn_bias
            .set(&Tensor::new(&[0.1f64, -0.2, 0.3], &Device::Cpu).expect("b"))
            .expect("set");
        let c = block.conv_weight.as_tensor().clone();
        let conv = images
            .conv2d(&c, 1, 1, 1, 1)
            .and_then(|y| y.broadcast_add(&block.conv_bias.reshape((1, 3, 1, 1))?))
            .expect("conv");
        let mean = conv.mean_keepdim((0, 2, 3)).expect("mean");
        let biased = conv
            .broadcast_sub(&mean)
            .and_then(|d| d.sqr()?.mean_keepdim((0, 2, 3)))
            .expect("var");
        let vec = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .expect("vec")
        };
        let close = |a: &[f64], b: &[f64]| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-12, "{x} vs {y}");
            }
        };

        // Training mode: batch statistics.
        let out = vec(&block.forward(&images, true).expect("train"));
        close(&out, &vec(&reference_block(block, &images, &mean, &biased)));
        // Running statistics moved 10% towards the batch's mean and unbiased variance (n = 64).
        let n = 4.0 * 16.0;
        let rm = vec(&block.running_mean);
        let rv = vec(&block.running_var);
        for ch in 0..3 {
            assert!((rm[ch] - 0.1 * vec(&mean)[ch]).abs() < 1e-12);
            let unbiased = vec(&biased)[ch] * n / (n - 1.0);
            assert!((rv[ch] - (0.9 + 0.1 * unbiased)).abs() < 1e-12);
        }

        // Evaluation mode: running statistics, no update, deterministic.
        let e1 = vec(&block.forward(&images, false).expect("eval"));
        assert_eq!(vec(&block.running_mean), rm);
        let by_hand = reference_block(
            block,
            &images,
            block.running_mean.as_tensor(),
            block.running_var.as_tensor(),
        );
        close(&e1, &vec(&by_hand));
        // With the running statistics equal to the batch's (biased) ones, both modes agree.
        block
            .running_mean
            .set(&mean.flatten_all().expect("m"))
            .expect("set");
        block
            .running_var
            .set(&biased.flatten_all().expect("v"))
            .expect("set");
        let e2 = vec(&block.forward(&images, false).expect("eval"));
        let t2 = vec(&block.forward(&images, true).expect("train"));
        close(&e2, &t2);
    }

    fn opts() -> TrainOptions {
        TrainOptions {
            settings: TrainSettings::new(0.01, 2, 4),
            seed: 9,
        }
    }

    #[test]
    fn same_seed_gives_bit_identical_training() {
        let run = || {
            let images = random_images(12, 16, DType::F32, 4);
            let labels: Vec<usize> = (0..12).map(|i| i % 2).collect();
            let model = cnn(&[4, 4], 16, 2, 13, DType::F32);
            let rows: Vec<usize> = (0..12).collect();
            let data = Labelled {
                inputs: &images,
                labels: &labels,
            };
            let h = fit(&model, &data, 2, &rows[..9], &rows[9..], &opts(), |_| {}).expect("fit");
            h.epochs
                .iter()
                .flat_map(|e| [e.train_loss.to_bits(), e.val_loss.to_bits()])
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn save_and_load_keep_running_statistics() {
        let images = random_images(8, 8, DType::F32, 5);
        let labels: Vec<usize> = (0..8).map(|i| i % 2).collect();
        let cnn = cnn(&[2, 2], 8, 2, 6, DType::F32);
        let rows: Vec<usize> = (0..8).collect();
        let data = Labelled {
            inputs: &images,
            labels: &labels,
        };
        fit(&cnn, &data, 2, &rows[..6], &rows[6..], &opts(), |_| {}).expect("fit");
        let dir = std::env::temp_dir().join(format!("pipeline-cnn-{}", std::process::id()));
        let path = dir.join("cnn.safetensors");
        cnn.save(&path).expect("save");
        let loaded = Cnn::load(&path, &Device::Cpu).expect("load");
        assert_eq!(loaded.shape(), cnn.shape());
        let rm = |c: &Cnn| c.blocks[1].running_mean.to_vec1::<f32>().expect("rm");
        assert_eq!(rm(&loaded), rm(&cnn));
        assert_ne!(
            rm(&loaded),
            vec![0.0; 2],
            "trained statistics, not the initial ones"
        );
        let a = cnn
            .logits(&images)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("a");
        let b = loaded
            .logits(&images)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("b");
        assert_eq!(a, b);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn shapes_and_bad_inputs() {
        let images = random_images(2, 8, DType::F32, 1);
        let model = cnn(&[4, 4], 8, 3, 1, DType::F32);
        let x = Rows {
            data: &images,
            rows: &[0, 1],
        };
        assert_eq!(model.forward_t(&x, true).expect("logits").dims(), [2, 3]);
        assert_eq!(model.fc_weight.dims(), [3, 4 * 2 * 2]);
        let build = |channels: &[usize], size: usize, classes: usize| {
            let shape = CnnShape {
                channels: channels.to_vec(),
                input_size: size,
                classes,
            };
            Cnn::new(&shape, &mut Rng::new(1), DType::F32, &Device::Cpu)
        };
        assert!(build(&[4, 4], 6, 3).is_err(), "6 is not divisible by 4");
        assert!(build(&[], 8, 3).is_err(), "no block");
        assert!(build(&[4, 0], 8, 3).is_err(), "a block of no channels");
        assert!(build(&[4], 8, 0).is_err(), "no class");
        // Images of another size are an error naming the expected shape, not a panic.
        let small = cnn(&[4], 16, 3, 1, DType::F32);
        let err = small
            .forward_t(&x, false)
            .expect_err("8x8 images for a 16x16 CNN");
        assert!(err.to_string().contains("[n, 3, 16, 16]"), "{err}");
    }

    #[test]
    fn load_images_names_the_bad_file() {
        let dir = std::env::temp_dir().join(format!("pipeline-cnn-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("a.png");
        image::RgbImage::from_pixel(5, 3, image::Rgb([255, 0, 51]))
            .save(&good)
            .expect("png");
        let bad = dir.join("b.png");
        std::fs::write(&bad, b"not an image").expect("write");
        let t = load_images(&[good.as_path()], 4, &InputLimits::default()).expect("load");
        assert_eq!(t.dims(), [1, 3, 4, 4]);
        let px = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("px");
        assert_eq!((px[0], px[16]), (1.0, 0.0));
        assert!((px[32] - 0.2).abs() < 1e-6, "{}", px[32]);
        let err = load_images(&[good.as_path(), bad.as_path()], 4, &InputLimits::default())
            .expect_err("bad");
        assert!(err.to_string().contains("b.png"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
