//! The frozen feature extractor: VGG16's 13 conv layers, batched, returning the block-5 pool
//! output flattened in C,H,W order. Weights are plain tensors (not `Var`s), so no gradient graph
//! is ever kept.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::weights::Weights;

/// VGG16's `features` stack: channel counts, `None` for a 2x2 max-pool.
const VGG16: [Option<usize>; 18] = [
    Some(64),
    Some(64),
    None,
    Some(128),
    Some(128),
    None,
    Some(256),
    Some(256),
    Some(256),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
];

enum Layer {
    /// 3x3 conv, padding 1, then ReLU. Bias is stored as [1, c, 1, 1] for broadcasting.
    Conv {
        weight: Tensor,
        bias: Tensor,
    },
    Pool,
}

/// VGG16's convolutional base with frozen weights.
pub struct Vgg16Features {
    layers: Vec<Layer>,
}

impl Vgg16Features {
    /// Loads `features.{N}.weight` / `.bias` (torchvision / timm names) onto `device`, in `dtype`.
    pub fn load(weights: &Weights, device: &Device, dtype: DType) -> Result<Self> {
        let mut layers = Vec::with_capacity(VGG16.len());
        let mut in_c = 3;
        // In torchvision's numbering every conv and ReLU take one index each, a pool one.
        let mut index = 0;
        for spec in VGG16 {
            match spec {
                Some(out_c) => {
                    let name = format!("features.{index}");
                    let weight = weights
                        .tensor(&format!("{name}.weight"), &[out_c, in_c, 3, 3], device)?
                        .to_dtype(dtype)?;
                    let bias = weights
                        .tensor(&format!("{name}.bias"), &[out_c], device)?
                        .to_dtype(dtype)?
                        .reshape((1, out_c, 1, 1))?;
                    layers.push(Layer::Conv { weight, bias });
                    in_c = out_c;
                    index += 2;
                }
                None => {
                    layers.push(Layer::Pool);
                    index += 1;
                }
            }
        }
        Ok(Self { layers })
    }

    /// Features of a batch.
    ///
    /// # Shapes
    /// `[b, 3, s, s]` -> `[b, 512 * (s/32)^2]` (`[b, 25088]` at s = 224).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = match layer {
                Layer::Conv { weight, bias } => {
                    x.conv2d(weight, 1, 1, 1, 1)?.broadcast_add(bias)?.relu()?
                }
                Layer::Pool => x.max_pool2d(2)?,
            };
        }
        Ok(x.flatten_from(1)?)
    }

    /// Length of the feature vector for a square input of side `size`.
    pub fn feature_dim(size: u32) -> usize {
        512 * (size as usize / 32).pow(2)
    }
}
