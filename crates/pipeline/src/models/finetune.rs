//! Fine-tuning VGG16's last block (`[head] unfreeze = "block5"`): the three block-5
//! convolutions (512 -> 512, 3x3, padding 1, ReLU) and their 2x2 max-pool, started from the
//! pretrained weights, trained together with a linear head on cached block-4 pooled
//! activations (`[512, s/16, s/16]` per image: 14x14 at 224).
//!
//! Why cache block 4: the first ten convolutions stay frozen, so they run once per image (at
//! extraction), and an epoch costs only block 5 and the head: ~2.8 GFLOP forward and twice that
//! backward per 224x224 image, against ~31 GFLOP for the whole stack.
//!
//! On the CPU the convolutions are [`crate::models::gemm_conv::conv3x3_gemm`] (im2col + GEMM per
//! image with a hand-written backward; the first conv computes no gradient for its cached
//! input); on other devices [`crate::models::cnn::conv3x3`] (plain candle ops). The pool is
//! [`crate::models::cnn::max_pool2x2`] (candle's own max-pool backward is wrong). Gradients are
//! checked against finite differences and PyTorch in the tests. The convolutions learn at
//! `lr * conv_lr_scale` (lower than the head's), so the pretrained filters move slowly: the
//! head starts from scratch and its early gradients are large and noisy, and at the head's
//! rate they would wreck the pretrained filters before the head settles (the reason fastai's
//! `fine_tune` trains the head alone first and discriminative learning rates exist).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::features::weights::Weights;
use crate::models::cnn::{conv3x3, max_pool2x2};
use crate::models::gemm_conv::conv3x3_gemm;
use crate::models::params::{Params, SavedState};
use crate::training::fit::{Model, Rows};
use crate::training::rng::Rng;

/// torchvision's `features.{N}` index of the three block-5 convolutions.
const BLOCK5: [usize; 3] = [24, 26, 28];

/// What a fine-tuned block 5 + head is (recorded in its file's metadata).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Block5Shape {
    /// Channels in and out of every convolution (VGG16: 512; tests use fewer).
    pub channels: usize,
    /// Side of the block-4 activation map (14 at 224x224 input).
    pub side: usize,
    pub classes: usize,
    /// The convolutions' learning rate relative to the head's.
    pub conv_lr_scale: f64,
}

impl Block5Shape {
    /// Length of one image's block-4 activations.
    pub fn input_dim(&self) -> usize {
        self.channels * self.side * self.side
    }

    /// Length of the head's input (block 5's pooled output).
    pub fn feature_dim(&self) -> usize {
        self.channels * (self.side / 2) * (self.side / 2)
    }

    fn check(&self) -> Result<()> {
        if self.channels == 0
            || self.side < 2
            || self.classes == 0
            || self.conv_lr_scale.is_nan()
            || self.conv_lr_scale <= 0.0
        {
            return Err(Error::Model {
                model: "block5".into(),
                message: format!(
                    "{} channels, side {}, {} classes, conv_lr_scale {}: needs channels, a side \
                     of 2+, 1+ classes and a positive scale",
                    self.channels, self.side, self.classes, self.conv_lr_scale
                ),
            });
        }
        Ok(())
    }
}

struct Conv {
    /// `[c, c, 3, 3]`.
    weight: Var,
    /// `[c]`.
    bias: Var,
}

/// VGG16's block 5 and a linear head, on block-4 activations.
pub struct Block5Head {
    shape: Block5Shape,
    params: Params,
    convs: Vec<Conv>,
    fc_weight: Var,
    fc_bias: Var,
}

impl Block5Head {
    /// Block 5 from `weights` (`features.24/26/28.*`), the head drawn from `rng` like PyTorch's
    /// `nn.Linear` (weight then bias from U(-1/sqrt(in), 1/sqrt(in))).
    pub fn new(
        shape: &Block5Shape,
        weights: &Weights,
        rng: &mut Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        shape.check()?;
        let params = Params::new(dtype, device);
        let c = shape.channels;
        let mut convs = Vec::with_capacity(3);
        for (i, index) in BLOCK5.iter().enumerate() {
            let name = format!("features.{index}");
            let w = weights.tensor(&format!("{name}.weight"), &[c, c, 3, 3], device)?;
            let b = weights.tensor(&format!("{name}.bias"), &[c], device)?;
            convs.push(Conv {
                weight: params.tensor(&format!("block5.conv{i}.weight"), &w)?,
                bias: params.tensor(&format!("block5.conv{i}.bias"), &b)?,
            });
        }
        let dim = shape.feature_dim();
        let bound = 1.0 / (dim as f32).sqrt();
        let fc_weight = params.uniform("fc.weight", (shape.classes, dim), bound, rng)?;
        let fc_bias = params.uniform("fc.bias", shape.classes, bound, rng)?;
        Ok(Self {
            shape: *shape,
            params,
            convs,
            fc_weight,
            fc_bias,
        })
    }

    pub fn shape(&self) -> &Block5Shape {
        &self.shape
    }

    /// `[b, c, side, side]` -> block 5's pooled output, flattened `[b, feature_dim]`.
    fn block5(&self, x: &Tensor) -> Result<Tensor> {
        let (c, s) = (self.shape.channels, self.shape.side);
        if x.dims() != [x.dim(0)?, c, s, s] || x.dtype() != self.params.dtype() {
            return Err(Error::Model {
                model: "block5".into(),
                message: format!(
                    "activations {:?} of {:?} for block 5 over [n, {c}, {s}, {s}] of {:?}",
                    x.dims(),
                    x.dtype(),
                    self.params.dtype()
                ),
            });
        }
        let mut h = x.clone();
        for conv in &self.convs {
            let (w, b) = (conv.weight.as_tensor(), conv.bias.as_tensor());
            h = if h.device().is_cpu() {
                conv3x3_gemm(&h, w, b)?
            } else {
                conv3x3(&h, w)?.broadcast_add(&b.reshape((1, c, 1, 1))?)?
            }
            .relu()?;
        }
        Ok(max_pool2x2(&h)?.flatten_from(1)?)
    }

    /// `[b, c, side, side]` -> logits `[b, classes]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block5(x)?;
        Ok(h.matmul(&self.fc_weight.as_tensor().t()?)?
            .broadcast_add(self.fc_bias.as_tensor())?)
    }

    /// Block 5's pooled output of block-4 activations (`[n, c * side * side]` rows), with the
    /// current convolution weights and no gradient graph: the features the head is warmed up on
    /// while block 5 is frozen.
    pub fn block5_features(&self, activations: &Tensor) -> Result<Tensor> {
        let n = activations.dim(0)?;
        let (c, s) = (self.shape.channels, self.shape.side);
        let x = activations
            .to_dtype(self.params.dtype())?
            .to_device(self.params.device())?
            .reshape((n, c, s, s))?;
        Ok(self.block5(&x)?.detach())
    }

    /// Replaces the head's weights (`[classes, feature_dim]`, `[classes]`), e.g. by a head
    /// trained on [`Self::block5_features`].
    pub fn set_head(&self, weight: &Tensor, bias: &Tensor) -> Result<()> {
        let dtype = self.params.dtype();
        self.fc_weight.set(&weight.to_dtype(dtype)?)?;
        self.fc_bias.set(&bias.to_dtype(dtype)?)?;
        Ok(())
    }

    /// Evaluation-mode logits of new block-4 activations (`[n, c, side, side]` or flattened
    /// `[n, c * side * side]`; any dtype and device).
    pub fn logits(&self, activations: &Tensor) -> Result<Tensor> {
        let n = activations.dim(0)?;
        let (c, s) = (self.shape.channels, self.shape.side);
        let x = activations
            .to_dtype(self.params.dtype())?
            .to_device(self.params.device())?
            .reshape((n, c, s, s))?;
        self.forward(&x)
    }

    /// Writes block 5 and the head (f32) with the shape as metadata, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let s = &self.shape;
        let meta: HashMap<String, String> = [
            ("kind", "\"block5\"".to_string()),
            ("channels", s.channels.to_string()),
            ("side", s.side.to_string()),
            ("classes", s.classes.to_string()),
            ("conv_lr_scale", s.conv_lr_scale.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        self.params.save(path, meta)
    }

    /// A model saved by [`Block5Head::save`], in f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let saved = SavedState::open(path)?;
        let shape = Block5Shape {
            channels: saved.field("channels")?,
            side: saved.field("side")?,
            classes: saved.field("classes")?,
            conv_lr_scale: saved.field("conv_lr_scale")?,
        };
        shape.check()?;
        let params = Params::new(DType::F32, device);
        let zeros = |name: &str, dims: &[usize]| params.constant(name, dims, 0.0);
        let c = shape.channels;
        let convs = (0..3)
            .map(|i| {
                Ok(Conv {
                    weight: zeros(&format!("block5.conv{i}.weight"), &[c, c, 3, 3])?,
                    bias: zeros(&format!("block5.conv{i}.bias"), &[c])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let fc_weight = zeros("fc.weight", &[shape.classes, shape.feature_dim()])?;
        let fc_bias = zeros("fc.bias", &[shape.classes])?;
        params.load(&saved)?;
        Ok(Self {
            shape,
            params,
            convs,
            fc_weight,
            fc_bias,
        })
    }
}

impl Model for Block5Head {
    fn params(&self) -> &Params {
        &self.params
    }

    /// Rows of flattened block-4 activations (`[n, c * side * side]`).
    fn forward_t(&self, x: &Rows, _train: bool) -> Result<Tensor> {
        let (c, s) = (self.shape.channels, self.shape.side);
        let batch = x.gather()?.reshape((x.len(), c, s, s))?;
        self.forward(&batch)
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if name.starts_with("block5.") {
            self.shape.conv_lr_scale
        } else {
            1.0
        }
    }
}
