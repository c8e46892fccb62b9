//! The frozen feature extractor: VGG16's 13 conv layers, batched, returning the block-5 pool
//! output flattened in C,H,W order. Weights are plain tensors (not `Var`s), so no gradient graph
//! is ever kept.
//!
//! Two engines compute the same function:
//! - on the CPU, `fastconv` (NHWC, no im2col, bias/ReLU/pool fused, Winograd or direct 3x3
//!   kernels; several times faster than candle's conv2d and a fraction of its memory), in f32 or
//!   with bf16 rounding;
//! - on CUDA, candle's ops in f32 (TF32 GEMMs only when asked), f16 or bf16, with GPU memory
//!   bounded whatever the batch (see [`CandleVgg`]).
//!
//! Both match the reference features to 1e-5 relative in f32 (tests/extract.rs).

use candle_core::{DType, Device, Tensor};

use crate::config::{ComputePrecision, ConvAlgorithm, ExtractConfig};
use crate::error::{Error, Result};
use crate::features::store::Layer;
use crate::features::weights::Weights;

/// A frozen feature extractor: preprocessed images in, one feature row per image out.
pub trait Backbone: Send + Sync {
    /// `[b, 3, s, s]` -> `[b, dim]`, in the engine's compute dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// What the pipeline knows of an architecture. Adding a backbone is its own file (the
/// network and its `SPEC`) plus one entry in [`REGISTRY`]; the cache key records `name`, and
/// the preprocessing comes from the weights file's metadata (or the table of known hub
/// weights in `data::preprocess`).
///
/// How the next two would be added (their parity needs a reference from timm, which needs
/// PyTorch; not done here):
///
/// | `name` | weights | features | preprocessing (timm `default_cfg`) |
/// | --- | --- | --- | --- |
/// | `resnet50` | `hf:timm/resnet50.a1_in1k` | 2048 (global average pool of layer4) | x/255, ImageNet mean/std, RGB, 224, bicubic, crop_pct 0.95 |
/// | `convnext_tiny` | `hf:timm/convnext_tiny.fb_in22k_ft_in1k` | 768 (pool, then `head.norm`) | x/255, ImageNet mean/std, RGB, 224, bicubic, crop_pct 0.875 |
///
/// Both need a bicubic resize and a `crop_pct` in `Preprocessing`, and kernels the NHWC module
/// (`features::nhwc`) mostly has (ConvNeXt's 7x7 depthwise is tested there already).
pub struct BackboneSpec {
    /// `[backbone] name` and the cache key's `backbone`.
    pub name: &'static str,
    /// Human name for reports ("VGG16").
    pub display: &'static str,
    /// Feature length for a square input of side `size`.
    pub feature_dim: fn(u32) -> usize,
    /// The network from its weights, on `device`, computing as `options` say.
    pub load: fn(&Weights, &Device, &BackboneOptions) -> Result<Box<dyn Backbone>>,
}

/// VGG16's convolutional base: 512 x (s/32)^2 features (25088 at 224).
pub const VGG16_SPEC: BackboneSpec = BackboneSpec {
    name: "vgg16",
    display: "VGG16",
    feature_dim: Vgg16Features::feature_dim,
    load: |w, device, options| Ok(Box::new(Vgg16Features::load(w, device, options)?)),
};

/// The network computing `layer` of backbone `name`: the registry's network for its output;
/// VGG16 cut after block 4's pool for [`Layer::Pool4`] (the input of a fine-tuned block 5).
pub fn load_layer(
    name: &str,
    layer: Layer,
    weights: &Weights,
    device: &Device,
    options: &BackboneOptions,
) -> Result<Box<dyn Backbone>> {
    match layer {
        Layer::Output => (spec(name)?.load)(weights, device, options),
        Layer::Pool4 if name == VGG16_SPEC.name => Ok(Box::new(
            Vgg16Features::load(weights, device, options)?.through_block4()?,
        )),
        Layer::Pool4 => Err(Error::InvalidValue {
            key: "head.unfreeze".into(),
            message: format!("block-4 activations exist for vgg16 only, not `{name}`"),
        }),
    }
}

/// Every backbone the pipeline runs.
pub const REGISTRY: [&BackboneSpec; 2] = [&VGG16_SPEC, &crate::features::efficientnet::SPEC];

/// The registry entry named `name`; an unknown name is an error listing the known ones.
pub fn spec(name: &str) -> Result<&'static BackboneSpec> {
    REGISTRY
        .iter()
        .copied()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::InvalidValue {
            key: "backbone.name".into(),
            message: format!(
                "unknown backbone `{name}`; known: {}",
                REGISTRY.map(|s| s.name).join(", ")
            ),
        })
}

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

/// How the backbone computes: arithmetic, CPU conv algorithm, GPU memory bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackboneOptions {
    /// Arithmetic of the forward pass. Default: f32.
    pub compute: ComputePrecision,
    /// The CPU engine's 3x3 algorithm. Default: Winograd F(2x2,3x3).
    pub conv: ConvAlgorithm,
    /// Largest im2col buffer one convolution of the candle engine may allocate. Default: 1 GiB.
    pub workspace_bytes: usize,
}

impl Default for BackboneOptions {
    fn default() -> Self {
        Self::from_config(&ExtractConfig::default())
    }
}

impl BackboneOptions {
    /// The options `[extract]` asks for.
    pub fn from_config(c: &ExtractConfig) -> Self {
        Self {
            compute: c.compute,
            conv: c.conv,
            workspace_bytes: c.conv_workspace_mb.saturating_mul(1 << 20),
        }
    }
}

/// One 3x3 conv (padding 1) + bias + ReLU, optionally followed by a 2x2 max-pool.
struct ConvLayer {
    /// `[cout, cin, 3, 3]`.
    weight: Tensor,
    /// `[1, cout, 1, 1]`, for broadcasting.
    bias: Tensor,
    pool_after: bool,
}

impl ConvLayer {
    /// The layer on a whole (slice of a) batch.
    ///
    /// # Shapes
    /// `[b, cin, h, w]` -> `[b, cout, h, w]`, or `[b, cout, h/2, w/2]` with the pool.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x
            .conv2d(&self.weight, 1, 1, 1, 1)?
            .broadcast_add(&self.bias)?
            .relu()?;
        Ok(if self.pool_after { y.max_pool2d(2)? } else { y })
    }

    fn in_channels(&self) -> Result<usize> {
        Ok(self.weight.dim(1)?)
    }

    fn out_channels(&self) -> Result<usize> {
        Ok(self.weight.dim(0)?)
    }
}

/// VGG16 on candle's ops, with its memory bounded.
///
/// Without cuDNN, candle's conv2d is im2col + GEMM over the whole batch: VGG16's second conv at
/// batch 128 would build a 128 x 224 x 224 x 576 column buffer (14.8 GB in f32). So each conv
/// runs over slices of the batch whose column buffer fits `workspace_bytes`, the pool that
/// follows it runs on the slice too (the full-size pre-pool activation never exists), and each
/// slice's result is written into the layer's preallocated output. Peak memory is then the
/// layer's input, its output and one slice's temporaries: about 3 GB at batch 128, 224x224,
/// f32, with the default 1 GiB workspace. Each image's result does not depend on the slicing.
pub struct CandleVgg {
    layers: Vec<ConvLayer>,
    workspace_bytes: usize,
    dtype: DType,
}

impl CandleVgg {
    /// Images per slice for a conv over `[_, cin, h, w]`: as many as keep the column buffer
    /// (`h * w` rows of `9 * cin` values per image) within the workspace; at least one.
    pub fn slice_len(
        workspace_bytes: usize,
        cin: usize,
        h: usize,
        w: usize,
        dtype: DType,
    ) -> usize {
        let per_image = h * w * 9 * cin * dtype.size_in_bytes();
        (workspace_bytes / per_image.max(1)).max(1)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.to_dtype(self.dtype)?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x)?;
        }
        Ok(x.flatten_from(1)?)
    }

    /// One layer over the batch, slice by slice when the whole batch would not fit.
    fn layer_forward(&self, layer: &ConvLayer, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let slice = Self::slice_len(self.workspace_bytes, layer.in_channels()?, h, w, self.dtype);
        if slice >= b {
            return layer.forward(x);
        }
        let (oh, ow) = if layer.pool_after {
            (h / 2, w / 2)
        } else {
            (h, w)
        };
        let out = Tensor::zeros((b, layer.out_channels()?, oh, ow), self.dtype, x.device())?;
        for start in (0..b).step_by(slice) {
            let len = slice.min(b - start);
            let part = layer.forward(&x.narrow(0, start, len)?)?;
            out.slice_set(&part, 0, start)?;
        }
        Ok(out)
    }
}

enum Engine {
    /// candle ops on any device and dtype (CUDA; tests on the CPU).
    Candle(CandleVgg),
    /// The CPU fast path.
    Fast(fastconv::Vgg16Cpu),
}

/// VGG16's convolutional base with frozen weights.
pub struct Vgg16Features {
    engine: Engine,
}

impl Vgg16Features {
    /// Loads `features.{N}.weight` / `.bias` (torchvision / timm names) for `device`: the fast
    /// path on the CPU (f32, or bf16 rounding), candle's ops on CUDA. f16 and TF32 are GPU
    /// arithmetic: asking for them on the CPU is an error naming `extract.compute`.
    pub fn load(weights: &Weights, device: &Device, options: &BackboneOptions) -> Result<Self> {
        if device.is_cpu() {
            let precision = match options.compute {
                ComputePrecision::F32 => fastconv::Precision::F32,
                ComputePrecision::Bf16 => fastconv::Precision::Bf16,
                other => {
                    return Err(Error::InvalidValue {
                        key: "extract.compute".into(),
                        message: format!(
                            "`{}` runs on CUDA only and this run is on the CPU; use \"f32\" or \
                             \"bf16\" (or a CUDA device)",
                            other.name()
                        ),
                    })
                }
            };
            return Self::load_fast(weights, precision, options.conv);
        }
        // TF32 is a process-wide cuBLAS setting in candle: set it both ways, so one run's
        // choice never leaks into the next load.
        candle_core::cuda::set_gemm_reduced_precision_f32(
            options.compute == ComputePrecision::Tf32,
        );
        Self::load_candle(
            weights,
            device,
            options.compute.dtype(),
            options.workspace_bytes,
        )
    }

    /// The candle-ops engine (any device and dtype), with its per-conv column buffer bounded
    /// by `workspace_bytes`.
    pub fn load_candle(
        weights: &Weights,
        device: &Device,
        dtype: DType,
        workspace_bytes: usize,
    ) -> Result<Self> {
        let mut convs = Self::read_layers(weights, device)?.into_iter().peekable();
        let mut layers = Vec::new();
        while let Some(layer) = convs.next() {
            let Some((w, b)) = layer else { continue };
            let pool_after = matches!(convs.peek(), Some(None));
            let c = b.dim(0)?;
            layers.push(ConvLayer {
                weight: w.to_dtype(dtype)?,
                bias: b.to_dtype(dtype)?.reshape((1, c, 1, 1))?,
                pool_after,
            });
        }
        Ok(Self {
            engine: Engine::Candle(CandleVgg {
                layers,
                workspace_bytes,
                dtype,
            }),
        })
    }

    /// The CPU fast path.
    pub fn load_fast(
        weights: &Weights,
        precision: fastconv::Precision,
        conv: ConvAlgorithm,
    ) -> Result<Self> {
        let params = Self::read_layers(weights, &Device::Cpu)?
            .into_iter()
            .flatten()
            .map(|(w, b)| Ok((w.flatten_all()?.to_vec1::<f32>()?, b.to_vec1::<f32>()?)))
            .collect::<Result<Vec<_>>>()?;
        let net = fastconv::Vgg16Cpu::new_with(&params, precision, conv.to_fastconv())?;
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

    /// The network cut after block 4's max-pool (its first ten convolutions): each image's
    /// `[512, s/16, s/16]` activations, flattened in C,H,W order.
    pub fn through_block4(self) -> Result<Self> {
        const CONVS: usize = 10;
        let engine = match self.engine {
            Engine::Fast(net) => Engine::Fast(net.truncated(CONVS)?),
            Engine::Candle(mut net) => {
                net.layers.truncate(CONVS);
                if net.layers.len() != CONVS || !net.layers[CONVS - 1].pool_after {
                    return Err(Error::Model {
                        model: "vgg16".into(),
                        message: "block 4 does not end in a pool".into(),
                    });
                }
                Engine::Candle(net)
            }
        };
        Ok(Self { engine })
    }

    /// Features of a batch, in the engine's compute dtype (f32 on the CPU). The input may be
    /// of any float dtype; it is converted first.
    ///
    /// # Shapes
    /// `[b, 3, s, s]` -> `[b, 512 * (s/32)^2]` (`[b, 25088]` at s = 224); cut after block 4
    /// ([`Self::through_block4`]): `[b, 512 * (s/16)^2]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.engine {
            Engine::Fast(net) => {
                let (b, _, s, _) = x.dims4()?;
                let input = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let features = net.forward(&input, b, s)?;
                let dim = net.output_dim(s);
                Ok(Tensor::from_vec(features, (b, dim), &Device::Cpu)?)
            }
            Engine::Candle(net) => net.forward(x),
        }
    }

    /// Length of the feature vector for a square input of side `size`.
    pub fn feature_dim(size: u32) -> usize {
        512 * (size as usize / 32).pow(2)
    }
}

impl Backbone for Vgg16Features {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Vgg16Features::forward(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_fit_the_workspace() {
        // VGG16's conv2 at 224x224 in f32: 115.6 MB of columns per image.
        let per_image = 224 * 224 * 9 * 64 * 4;
        assert_eq!(
            CandleVgg::slice_len(1 << 30, 64, 224, 224, DType::F32),
            (1 << 30) / per_image
        );
        assert_eq!(CandleVgg::slice_len(1 << 30, 64, 224, 224, DType::F32), 9);
        // Half the bytes per value: twice the images.
        assert_eq!(CandleVgg::slice_len(1 << 30, 64, 224, 224, DType::F16), 18);
        // Never zero, even when one image alone exceeds the budget.
        assert_eq!(CandleVgg::slice_len(1, 512, 14, 14, DType::F32), 1);
    }
}
