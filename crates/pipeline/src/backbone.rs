//! The frozen feature extractor: VGG16's 13 conv layers, batched, returning the block-5 pool
//! output flattened in C,H,W order. Weights are plain tensors (not `Var`s), so no gradient graph
//! is ever kept.
//!
//! Two engines compute the same function: on the CPU in f32, `fastconv` (NHWC, no im2col,
//! bias/ReLU/pool fused, Winograd or direct 3x3 kernels; several times faster than candle's
//! conv2d and a fraction of its memory); elsewhere (CUDA, reduced precision) candle's conv2d.
//! Both match the reference features to 1e-5 relative (tests/extract.rs).

use candle_core::{DType, Device, Tensor};

use crate::config::ConvAlgorithm;
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

enum Engine {
    /// candle ops on any device and dtype.
    Candle(Vec<Layer>),
    /// The CPU f32 fast path.
    Fast(fastconv::Vgg16Cpu),
}

/// VGG16's convolutional base with frozen weights.
pub struct Vgg16Features {
    engine: Engine,
}

impl Vgg16Features {
    /// Loads `features.{N}.weight` / `.bias` (torchvision / timm names) for `device` and
    /// `dtype`: the fast path on the CPU in f32 (with `conv`'s algorithm), candle's ops
    /// otherwise.
    pub fn load(
        weights: &Weights,
        device: &Device,
        dtype: DType,
        conv: ConvAlgorithm,
    ) -> Result<Self> {
        if device.is_cpu() && dtype == DType::F32 {
            return Self::load_fast(weights, conv);
        }
        Self::load_candle(weights, device, dtype)
    }

    /// The candle-ops engine (any device and dtype).
    pub fn load_candle(weights: &Weights, device: &Device, dtype: DType) -> Result<Self> {
        let layers = Self::read_layers(weights, device)?
            .into_iter()
            .map(|l| match l {
                Some((w, b)) => {
                    let c = b.dim(0)?;
                    Ok(Layer::Conv {
                        weight: w.to_dtype(dtype)?,
                        bias: b.to_dtype(dtype)?.reshape((1, c, 1, 1))?,
                    })
                }
                None => Ok(Layer::Pool),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            engine: Engine::Candle(layers),
        })
    }

    /// The CPU f32 fast path.
    pub fn load_fast(weights: &Weights, conv: ConvAlgorithm) -> Result<Self> {
        let params = Self::read_layers(weights, &Device::Cpu)?
            .into_iter()
            .flatten()
            .map(|(w, b)| Ok((w.flatten_all()?.to_vec1::<f32>()?, b.to_vec1::<f32>()?)))
            .collect::<Result<Vec<_>>>()?;
        let net =
            fastconv::Vgg16Cpu::new_with(&params, fastconv::Precision::F32, conv.to_fastconv())?;
        Ok(Self {
            engine: Engine::Fast(net),
        })
    }

    /// The conv layers' (weight, bias) in f32 (`None` for pools), shapes checked by name.
    fn read_layers(weights: &Weights, device: &Device) -> Result<Vec<Option<(Tensor, Tensor)>>> {
        let mut layers = Vec::with_capacity(VGG16.len());
        let mut in_c = 3;
        // In torchvision's numbering every conv and ReLU take one index each, a pool one.
        let mut index = 0;
        for spec in VGG16 {
            match spec {
                Some(out_c) => {
                    let name = format!("features.{index}");
                    let w =
                        weights.tensor(&format!("{name}.weight"), &[out_c, in_c, 3, 3], device)?;
                    let b = weights.tensor(&format!("{name}.bias"), &[out_c], device)?;
                    layers.push(Some((w, b)));
                    in_c = out_c;
                    index += 2;
                }
                None => {
                    layers.push(None);
                    index += 1;
                }
            }
        }
        Ok(layers)
    }

    /// Features of a batch.
    ///
    /// # Shapes
    /// `[b, 3, s, s]` -> `[b, 512 * (s/32)^2]` (`[b, 25088]` at s = 224).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.engine {
            Engine::Fast(net) => {
                let (b, _, s, _) = x.dims4()?;
                let input = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let features = net.forward(&input, b, s)?;
                let dim = fastconv::Vgg16Cpu::feature_dim(s);
                Ok(Tensor::from_vec(features, (b, dim), &Device::Cpu)?)
            }
            Engine::Candle(layers) => {
                let mut x = x.clone();
                for layer in layers {
                    x = match layer {
                        Layer::Conv { weight, bias } => {
                            x.conv2d(weight, 1, 1, 1, 1)?.broadcast_add(bias)?.relu()?
                        }
                        Layer::Pool => x.max_pool2d(2)?,
                    };
                }
                Ok(x.flatten_from(1)?)
            }
        }
    }

    /// Length of the feature vector for a square input of side `size`.
    pub fn feature_dim(size: u32) -> usize {
        512 * (size as usize / 32).pow(2)
    }
}
