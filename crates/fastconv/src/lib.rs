//! Fast CPU 3x3 convolutions for VGG-style feature extraction, and [`Vgg16Cpu`] built on them.
//!
//! # Why
//! candle's CPU `conv2d` materialises an im2col copy of every layer's input (9x the activation
//! size) and works NCHW, so VGG16 spends most of its time copying. This crate keeps activations
//! NHWC in zero-padded buffers and computes each 3x3 conv as an implicit GEMM over *shifted,
//! overlapping views* of the padded input (no im2col copy at all; see [`conv`] for the
//! derivation), with bias, ReLU and the 2x2 max-pool fused into the pass that writes the next
//! layer's padded input.
//!
//! # Design
//! - **Algorithms** ([`Algorithm`], per layer): Winograd F(2x2,3x3) or F(4x4,3x3)
//!   ([`winograd`]: 2.25x / 4x fewer multiplications, transforms and bias/ReLU/pool fused
//!   around an AVX2+FMA batched-product kernel), or the direct sum of the 9 taps described
//!   below (the exact path, and the fallback for layers Winograd does not take: fewer than 8
//!   input channels, `cout % 16 != 0`, bf16 numerics, no AVX2).
//! - **Layout**: `[(h + 2) * (w + 2) + 2][c]` per image ([`conv::padded_len`]); borders are zero,
//!   so padding costs nothing at run time, and NHWC makes the 3 taps of a kernel row one
//!   contiguous run of `3 * c` floats.
//! - **Kernel** ([`direct`]): on CPUs with AVX2+FMA (detected at run time) and `cout % 16 == 0`,
//!   a register-blocked micro-kernel (6 positions x 16 channels, 12 ymm accumulators) sums all
//!   `9 * cin` terms of a tile in registers, reading the padded rows in place; input channels
//!   go 128 at a time so that the weights and inputs a pass touches stay in L2.
//! - **Fallback** ([`conv`]): three accumulated GEMMs over shifted views of the padded buffer
//!   (`acc += P[dy * (w + 2) ..] (M x 3c, row stride c) * W[dy] (3c x cout)`) on the `gemm`
//!   crate, candle's own GEMM, which itself picks AVX-512 / AVX2 / scalar at run time. So
//!   nothing needs `-C target-cpu`, and every CPU gets a correct path. The first layer
//!   (3 channels) uses a per-chunk im2col of 27 floats per position and one GEMM; it is 0.6%
//!   of the FLOPs.
//! - **Fusion and tiling**: output rows are processed in chunks of ~512 positions; bias, ReLU and
//!   the 2x2 max-pool are applied to a chunk while its accumulator is still in cache, writing
//!   straight into the next layer's padded buffer (border columns included).
//! - **Threads**: one image at a time, each layer's row chunks (at least 4 per thread) spread
//!   over the rayon pool, so a layer's input and output stay in L3 ([`Schedule`] also offers
//!   whole images per thread).
//! - **Memory**: two reused ping-pong buffers (13 MB each at 224x224) and no batch-sized
//!   activations, so peak RSS is the input, the output, the packed weights (one copy: 59 MB
//!   direct, 105 MB Winograd F(2x2), 236 MB F(4x4), whose `n²` transformed taps outnumber the 9)
//!   and ~30 MB (plus Winograd's 8 MB transformed-input block), whatever the batch.
//! - **Weights** are repacked once, at construction: `[dy][dx][cin][cout]`, for the direct
//!   kernel `[cout / 16][dy][dx][cin][16]`, for Winograd `[cout / 16][ξ][cin][16]`.
//! - **bf16** ([`Precision::Bf16`]): weights and activations are rounded to bf16 and products
//!   accumulated in f32, the numerics of AVX512_BF16's `vdpbf16ps` (features within ~4e-3 of
//!   f32 on the reference images). The arithmetic is still f32, so it is *not* faster: a
//!   `vdpbf16ps` micro-kernel is future work; the machine this was written on has neither
//!   AVX-512 nor AVX512_BF16, so such a kernel could not have been tested.
//!
//! # Use
//! ```no_run
//! # fn main() -> fastconv::Result<()> {
//! let bytes = std::fs::read("vgg16-features.safetensors").expect("weights file");
//! let net = fastconv::Vgg16Cpu::from_safetensors(&bytes, fastconv::Precision::F32)?;
//! let images = vec![0.0f32; 2 * 3 * 224 * 224]; // [2, 3, 224, 224], NCHW
//! let features = net.forward(&images, 2, 224)?; // [2, 25088], C,H,W order per image
//! assert_eq!(features.len(), 2 * fastconv::Vgg16Cpu::feature_dim(224));
//! # Ok(())
//! # }
//! ```
//!
//! # Accuracy
//! The direct f32 path only reorders the sums of a direct convolution: against an f64 reference
//! it is within ~1e-6 of `max|ref|` per layer (`tests/kernels.rs`), and the real VGG16 pool5
//! features match PyTorch's at `max|diff| / max|ref|` <= 1e-6, bound 1e-5 (`tests/parity.rs`).
//! Winograd, same tests: F(2x2) within ~1e-6 per random layer (bound 1e-5) and 5e-7 - 8e-7 on
//! the real features (bound 1e-5, the exact path's); F(4x4) within ~6e-6 per random layer
//! (bound 1e-4) and 4e-6 - 5e-6 on the real features (bound 1e-4).

pub mod bf16;
pub mod conv;
pub mod direct;
pub mod error;
pub mod reference;
pub mod vgg;
pub mod winograd;

pub use conv::{conv3x3_relu_nchw, Algorithm, Conv3x3};
pub use error::{Error, Result};
pub use vgg::{Precision, Schedule, Vgg16Cpu, VGG16_CHANNELS, VGG16_POOL_AFTER, VGG16_TORCH_INDEX};
pub use winograd::Tile;
