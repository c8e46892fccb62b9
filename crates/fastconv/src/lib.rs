//! Fast CPU 3x3 convolutions for VGG-style feature extraction, and [`Vgg16Cpu`] built on them.
//!
//! # Why
//! candle's CPU `conv2d` materialises an im2col copy of every layer's input (9x the activation
//! size) and works NCHW, so VGG16 spends most of its time copying. This crate keeps activations
//! NHWC in zero-padded buffers and turns each 3x3 conv into three GEMMs over *shifted, overlapping
//! views* of the padded input (no copy at all; see [`conv`] for the derivation), with bias, ReLU
//! and the 2x2 max-pool fused into the pass that writes the next layer's padded input.
//!
//! # Design
//! - **Layout**: `[(h + 2) * (w + 2) + 2][c]` per image ([`conv::padded_len`]); borders are zero,
//!   so padding costs nothing at run time.
//! - **Kernel**: for each kernel row `dy`, `acc += P[dy * (w + 2) ..] (M x 3c, row stride c) *
//!   W[dy] (3c x cout)` via the `gemm` crate (candle's own GEMM, AVX-512 / AVX2+FMA / scalar
//!   chosen at run time, so no `-C target-cpu` is needed and any x86-64 or other CPU works).
//!   The first layer (3 channels) goes through the same path with `K = 9`; it is 0.3% of
//!   the FLOPs.
//! - **Tiling**: output rows are processed in chunks of ~512 positions so the accumulator stays
//!   in L2 across the three GEMMs and the fused output pass.
//! - **Threads**: whole images per thread when the batch has at least one image per thread (no
//!   synchronisation between layers, buffers stay in each core's cache), row chunks of one image
//!   across threads otherwise (batch 1).
//! - **Memory**: two reused ping-pong buffers per thread (13 MB each at 224x224); activations of
//!   only one layer per image are alive, so peak RSS does not grow with the batch beyond the
//!   input and output themselves.
//! - **Weights** are repacked once, at construction, to `[dy][dx][cin][cout]`.
//! - **bf16** ([`Precision::Bf16`]): weights and activations are rounded to bf16 and products
//!   accumulated in f32. This gives the numerics of AVX512_BF16 dot products, but the GEMM is
//!   still f32, so it is not faster; a `vdpbf16ps` micro-kernel is future work (the machine this
//!   was written on has no AVX-512 at all, so it could not be tested).
//!
//! # Accuracy
//! The f32 path only reorders the sums of a direct convolution: against an f64 reference it is
//! within ~1e-6 of `max|ref|` per layer, and the real VGG16 pool5 features match PyTorch's at
//! `max|diff| / max|ref| <= 1e-5` (test `tests/parity.rs`).

pub mod bf16;
pub mod conv;
pub mod error;
pub mod reference;
pub mod vgg;

pub use conv::{conv3x3_relu_nchw, Conv3x3};
pub use error::{Error, Result};
pub use vgg::{Precision, Vgg16Cpu, VGG16_CHANNELS, VGG16_POOL_AFTER, VGG16_TORCH_INDEX};
