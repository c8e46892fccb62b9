//! VGG16's 13-conv feature stack on [`Conv3x3`] layers: NCHW in, pool5 features (C,H,W order) out.
//!
//! # Scheduling and memory
//! By default ([`Schedule::Rows`]) images go one at a time and each layer's row chunks are spread
//! over the rayon threads, through two ping-pong padded buffers (the largest is
//! `226 * 226 * 64` floats, 13 MB, at 224x224). One layer's input and output then fit a 32 MB
//! L3; two images in flight ([`Schedule::Images`], whole images per thread with buffers each)
//! do not, and measured slower on the 2-core machine this was tuned on. Either way nothing
//! batch-sized is allocated besides the output, so peak memory is the input, the output, the
//! packed weights (59 MB) and ~30 MB of buffers per image in flight, whatever the batch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bf16::round_slice_bf16;
use crate::conv::{nchw_to_padded, output_hw, padded_len, padded_to_nchw, Algorithm, Conv3x3};
use crate::error::{check_len, Error, Result};

/// Arithmetic of the fast path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 everywhere; matches candle's / PyTorch's f32 features to ~1e-6 relative.
    #[default]
    F32,
    /// Weights and activations rounded to bf16, products accumulated in f32 (the numerics of
    /// AVX512_BF16 dot products). Features within ~1e-2 relative of f32. On this crate's current
    /// kernels it runs at f32 speed: see the crate docs.
    Bf16,
}

/// Output channels of VGG16's 13 convs.
pub const VGG16_CHANNELS: [usize; 13] = [
    64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
];
/// Whether a 2x2 max-pool follows each conv.
pub const VGG16_POOL_AFTER: [bool; 13] = [
    false, true, false, true, false, false, true, false, false, true, false, false, true,
];
/// torchvision's `features.{N}` index of each conv (ReLUs and pools take indices too).
pub const VGG16_TORCH_INDEX: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];

/// VGG16's convolutional base on the CPU fast path.
pub struct Vgg16Cpu {
    layers: Vec<Conv3x3>,
    precision: Precision,
    schedule: Schedule,
}

/// How a batch is spread over the rayon threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Currently [`Schedule::Rows`] for every batch size: at 224x224 a layer's input and output
    /// (26 MB at most) fit a 32 MB L3 while two images in flight (52 MB) do not, and on the
    /// 2-core machine it was tuned on rows measured faster (see BENCHMARKS.md).
    #[default]
    Auto,
    /// One image at a time, each layer's row chunks spread over the threads.
    Rows,
    /// Whole images per thread, each with its own buffers.
    Images,
}

/// Per-thread activation buffers, allocated once and reused for every image and layer.
struct Workspace {
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Vgg16Cpu {
    /// Builds the network from 13 `(weight [out, in, 3, 3], bias [out])` pairs in layer order,
    /// as flat row-major f32 slices (what `Tensor::flatten_all()?.to_vec1::<f32>()` gives).
    pub fn new<W, B>(params: &[(W, B)], precision: Precision) -> Result<Self>
    where
        W: AsRef<[f32]>,
        B: AsRef<[f32]>,
    {
        Self::new_with(params, precision, Algorithm::Direct)
    }

    /// Like [`Self::new`] with a choice of convolution algorithm (layers it cannot run, such as
    /// the 3-channel first one under Winograd, use the direct one).
    pub fn new_with<W, B>(
        params: &[(W, B)],
        precision: Precision,
        algorithm: Algorithm,
    ) -> Result<Self>
    where
        W: AsRef<[f32]>,
        B: AsRef<[f32]>,
    {
        Self::build(params.len(), precision, algorithm, |i| {
            Ok((params[i].0.as_ref().into(), params[i].1.as_ref().into()))
        })
    }

    /// Builds the layers one at a time from `get(i) -> (weight, bias)`, so that at most one
    /// layer's unpacked weights exist besides the packed ones.
    fn build<'a>(
        count: usize,
        precision: Precision,
        algorithm: Algorithm,
        get: impl Fn(usize) -> Result<(std::borrow::Cow<'a, [f32]>, std::borrow::Cow<'a, [f32]>)>,
    ) -> Result<Self> {
        if count != VGG16_CHANNELS.len() {
            return Err(Error::Shape(format!(
                "VGG16 has 13 convs, got {count} weight pairs"
            )));
        }
        let mut cin = 3;
        let mut layers = Vec::with_capacity(13);
        for (i, &cout) in VGG16_CHANNELS.iter().enumerate() {
            let (weight, bias) = get(i)?;
            layers.push(Conv3x3::with_algorithm(
                &weight,
                &bias,
                cin,
                cout,
                precision == Precision::Bf16,
                algorithm,
            )?);
            cin = cout;
        }
        Ok(Self {
            layers,
            precision,
            schedule: Schedule::Auto,
        })
    }

    /// Builds the network from a safetensors file's bytes holding f32
    /// `features.{0,2,5,...,28}.{weight,bias}` (torchvision / timm names).
    pub fn from_safetensors(bytes: &[u8], precision: Precision) -> Result<Self> {
        Self::from_safetensors_with(bytes, precision, Algorithm::Direct)
    }

    /// Like [`Self::from_safetensors`] with a choice of convolution algorithm.
    pub fn from_safetensors_with(
        bytes: &[u8],
        precision: Precision,
        algorithm: Algorithm,
    ) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Weights {
            tensor: String::new(),
            message: e.to_string(),
        })?;
        let load = |name: String| -> Result<std::borrow::Cow<'static, [f32]>> {
            let err = |message: String| Error::Weights {
                tensor: name.clone(),
                message,
            };
            let view = st.tensor(&name).map_err(|e| err(e.to_string()))?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(err(format!("dtype {:?}, expected F32", view.dtype())));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>()
                .into())
        };
        Self::build(VGG16_TORCH_INDEX.len(), precision, algorithm, |i| {
            let index = VGG16_TORCH_INDEX[i];
            Ok((
                load(format!("features.{index}.weight"))?,
                load(format!("features.{index}.bias"))?,
            ))
        })
    }

    /// Forces the `gemm` crate path in every layer, even where the direct AVX2 kernel would run
    /// (for comparisons; see [`Conv3x3::gemm_only`]).
    pub fn gemm_only(mut self) -> Self {
        self.layers = self.layers.into_iter().map(Conv3x3::gemm_only).collect();
        self
    }

    /// Sets how batches are spread over threads. Default: [`Schedule::Auto`].
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// The precision the network was built with.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Length of one image's feature vector for a square input of side `size` (25088 at 224).
    pub fn feature_dim(size: usize) -> usize {
        let (h, w) = Self::final_hw(size, size);
        512 * h * w
    }

    fn final_hw(h: usize, w: usize) -> (usize, usize) {
        Self::hw_after(VGG16_POOL_AFTER.len(), h, w)
    }

    /// Spatial size after the first `convs` layers (and their pools).
    fn hw_after(convs: usize, mut h: usize, mut w: usize) -> (usize, usize) {
        for &pool in &VGG16_POOL_AFTER[..convs] {
            (h, w) = output_hw(h, w, pool);
        }
        (h, w)
    }

    /// The network cut after its first `convs` convolutions (each with its pool, if any): 10
    /// gives block 4's pooled output (`[512, s/16, s/16]`), which a fine-tuned block 5 reads.
    pub fn truncated(mut self, convs: usize) -> Result<Self> {
        if convs == 0 || convs > self.layers.len() {
            return Err(Error::Shape(format!(
                "cannot keep {convs} of VGG16's {} convolutions",
                self.layers.len()
            )));
        }
        self.layers.truncate(convs);
        Ok(self)
    }

    /// Length of one image's output for a square input of side `size`: 25088 at 224 for the
    /// whole network, 100352 when cut after block 4.
    pub fn output_dim(&self, size: usize) -> usize {
        let (h, w) = Self::hw_after(self.layers.len(), size, size);
        self.layers.last().map_or(3, |l| l.cout()) * h * w
    }

    /// Pool5 features of a batch of square images.
    ///
    /// # Shapes
    /// `input_nchw`: `[batch, 3, size, size]` -> `[batch, 512 * (size / 32)^2]`, each image's
    /// features in C,H,W order (exactly candle's / PyTorch's `features(x).flatten(1)`).
    pub fn forward(&self, input_nchw: &[f32], batch: usize, size: usize) -> Result<Vec<f32>> {
        self.forward_impl(input_nchw, batch, size, None)
    }

    /// Like [`Self::forward`], also returning each layer's wall time summed over the batch.
    /// Images then go one at a time with each layer spread over the threads (the batch-1
    /// schedule), so that a layer's time is wall time.
    pub fn forward_profiled(
        &self,
        input_nchw: &[f32],
        batch: usize,
        size: usize,
    ) -> Result<(Vec<f32>, Vec<Duration>)> {
        let mut times = vec![Duration::ZERO; self.layers.len()];
        let out = self.forward_impl(input_nchw, batch, size, Some(&mut times))?;
        Ok((out, times))
    }

    /// FLOPs (2 per multiply-add) of each conv for a square input of side `size`.
    pub fn layer_flops(&self, size: usize) -> Vec<f64> {
        let (mut h, mut w) = (size, size);
        let mut flops = Vec::with_capacity(self.layers.len());
        for (layer, &pool) in self.layers.iter().zip(&VGG16_POOL_AFTER) {
            flops.push(2.0 * 9.0 * (layer.cin() * layer.cout() * h * w) as f64);
            (h, w) = output_hw(h, w, pool);
        }
        flops
    }

    fn forward_impl(
        &self,
        input: &[f32],
        batch: usize,
        size: usize,
        mut times: Option<&mut [Duration]>,
    ) -> Result<Vec<f32>> {
        check_len(
            "VGG16 input [batch, 3, size, size]",
            batch * 3 * size * size,
            input.len(),
        )?;
        let (fh, fw) = Self::hw_after(self.layers.len(), size, size);
        if fh == 0 || fw == 0 {
            return Err(Error::Shape(format!(
                "input side {size} is too small for {} VGG16 layers",
                self.layers.len()
            )));
        }
        let dim = self.output_dim(size);
        let mut output = vec![0.0f32; batch * dim];
        let image_len = 3 * size * size;
        let threads = rayon::current_num_threads();
        let rows = match self.schedule {
            Schedule::Rows => true,
            Schedule::Images => false,
            Schedule::Auto => true,
        };
        if times.is_some() || rows {
            let mut ws = self.workspace(size);
            for (image, out) in input
                .chunks_exact(image_len)
                .zip(output.chunks_exact_mut(dim))
            {
                self.image(image, size, &mut ws, true, out, times.as_deref_mut());
            }
            return Ok(output);
        }
        // Whole images per thread: a shared counter hands out image indices; each finished
        // image's features go to its slot through a short-held lock.
        let next = AtomicUsize::new(0);
        let slots = Mutex::new(&mut output);
        rayon::scope(|s| {
            for _ in 0..threads.min(batch) {
                s.spawn(|_| {
                    let mut ws = self.workspace(size);
                    let mut features = vec![0.0f32; dim];
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= batch {
                            break;
                        }
                        let image = &input[n * image_len..(n + 1) * image_len];
                        self.image(image, size, &mut ws, false, &mut features, None);
                        // A poisoned lock only means another worker panicked; that panic
                        // propagates out of the scope anyway.
                        let mut out = slots.lock().unwrap_or_else(|p| p.into_inner());
                        out[n * dim..(n + 1) * dim].copy_from_slice(&features);
                    }
                });
            }
        });
        Ok(output)
    }

    fn workspace(&self, size: usize) -> Workspace {
        let (mut h, mut w, mut c) = (size, size, 3);
        let mut max = padded_len(h, w, c);
        for (layer, &pool) in self.layers.iter().zip(&VGG16_POOL_AFTER) {
            (h, w) = output_hw(h, w, pool);
            c = layer.cout();
            max = max.max(padded_len(h, w, c));
        }
        Workspace {
            a: vec![0.0; max],
            b: vec![0.0; max],
        }
    }

    /// One image through the 13 layers; `out` gets its C,H,W features.
    fn image(
        &self,
        image: &[f32],
        size: usize,
        ws: &mut Workspace,
        parallel: bool,
        out: &mut [f32],
        mut times: Option<&mut [Duration]>,
    ) {
        let (mut h, mut w, mut c) = (size, size, 3);
        let Workspace { a, b } = ws;
        let (mut cur, mut nxt) = (a, b);
        nchw_to_padded(image, c, h, w, &mut cur[..padded_len(h, w, c)]);
        if self.precision == Precision::Bf16 {
            round_slice_bf16(&mut cur[..padded_len(h, w, c)]);
        }
        for (i, (layer, &pool)) in self.layers.iter().zip(&VGG16_POOL_AFTER).enumerate() {
            let start = Instant::now();
            let (ho, wo) = output_hw(h, w, pool);
            let in_len = padded_len(h, w, c);
            let out_len = padded_len(ho, wo, layer.cout());
            layer.forward_padded(&cur[..in_len], h, w, pool, &mut nxt[..out_len], parallel);
            std::mem::swap(&mut cur, &mut nxt);
            (h, w, c) = (ho, wo, layer.cout());
            if let Some(t) = times.as_deref_mut() {
                t[i] += start.elapsed();
            }
        }
        padded_to_nchw(&cur[..padded_len(h, w, c)], c, h, w, out);
    }
}
