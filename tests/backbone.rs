//! The backbone's engines and options on the CPU: the memory-bounded candle forward (the one CUDA
//! runs) gives the same features as the unbounded one and as the fast CPU engine, and the
//! compute-precision options are accepted or refused as documented.
//!
//! Seeded random VGG16 weights at small inputs, so these run in seconds without `../shared`.

use candle_core::{DType, Device, Tensor};
use pipeline::config::ComputePrecision;
use pipeline::features::{BackboneOptions, CandleVgg};
use pipeline::{Vgg16Features, Weights};

use crate::common::random_weights;

/// A seeded batch of `b` images of side `s`, values in the range of Oxford-preprocessed pixels.
fn batch(b: usize, s: usize) -> Tensor {
    let mut state = 7u64;
    let values: Vec<f32> = (0..b * 3 * s * s)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 255.0 - 120.0
        })
        .collect();
    Tensor::from_vec(values, (b, 3, s, s), &Device::Cpu).expect("batch")
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32)
        .expect("f32")
        .to_vec2()
        .expect("rows")
}

/// max |a - b| / max |b| over whole batches.
fn relative(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let a: Vec<f32> = a.concat();
    let b: Vec<f32> = b.concat();
    testkit::max_relative_error(&a, &b)
}

fn weights() -> Weights {
    Weights::open(random_weights().to_path_buf()).expect("weights")
}

#[test]
fn bounded_candle_forward_equals_the_unbounded_one() {
    let w = weights();
    // 5 images at 32x32: the first conv's columns are 32*32*27*4 = 110,592 bytes per image.
    let x = batch(5, 32);
    let whole = Vgg16Features::load_candle(&w, &Device::Cpu, DType::F32, usize::MAX)
        .expect("load")
        .forward(&x)
        .expect("forward");
    let whole = rows(&whole);
    assert_eq!(whole.len(), 5);
    assert_eq!(whole[0].len(), 512);
    for images_per_slice in [1, 2, 3] {
        // The workspace that makes conv2 (64 channels at 32x32) take this many images.
        let workspace = images_per_slice * 32 * 32 * 9 * 64 * 4;
        assert_eq!(
            CandleVgg::slice_len(workspace, 64, 32, 32, DType::F32),
            images_per_slice
        );
        let sliced = Vgg16Features::load_candle(&w, &Device::Cpu, DType::F32, workspace)
            .expect("load")
            .forward(&x)
            .expect("forward");
        let err = relative(&rows(&sliced), &whole);
        eprintln!("slices of {images_per_slice}: max relative difference {err:.2e}");
        assert!(err <= 1e-6, "slices of {images_per_slice}: {err:e}");
    }
    // A workspace smaller than one image's columns still runs, one image at a time.
    let one = Vgg16Features::load_candle(&w, &Device::Cpu, DType::F32, 1)
        .expect("load")
        .forward(&x)
        .expect("forward");
    assert!(relative(&rows(&one), &whole) <= 1e-6);
}

#[test]
fn candle_engine_matches_the_fast_cpu_engine() {
    let w = weights();
    let x = batch(3, 64);
    let fast = Vgg16Features::load(&w, &Device::Cpu, &BackboneOptions::default())
        .expect("load")
        .forward(&x)
        .expect("forward");
    let candle = Vgg16Features::load_candle(&w, &Device::Cpu, DType::F32, 1 << 20)
        .expect("load")
        .forward(&x)
        .expect("forward");
    assert_eq!(fast.dims(), &[3, 512 * 4]);
    let err = relative(&rows(&candle), &rows(&fast));
    eprintln!("candle vs fastconv: max relative difference {err:.2e}");
    assert!(err <= 1e-5, "{err:e}");
}

#[test]
fn gpu_only_arithmetic_is_refused_on_the_cpu_naming_the_key() {
    let w = weights();
    for compute in [ComputePrecision::F16, ComputePrecision::Tf32] {
        let options = BackboneOptions {
            compute,
            ..BackboneOptions::default()
        };
        let err = match Vgg16Features::load(&w, &Device::Cpu, &options) {
            Ok(_) => panic!("{compute:?} must be refused on the CPU"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("extract.compute"), "{err}");
        assert!(err.contains(compute.name()), "{err}");
        assert!(err.contains("CUDA"), "{err}");
    }
}

#[test]
fn bf16_on_the_cpu_stays_close_to_f32() {
    let w = weights();
    let x = batch(2, 32);
    let load = |compute| {
        let options = BackboneOptions {
            compute,
            ..BackboneOptions::default()
        };
        Vgg16Features::load(&w, &Device::Cpu, &options).expect("load")
    };
    let f32 = rows(&load(ComputePrecision::F32).forward(&x).expect("f32"));
    let bf16 = rows(&load(ComputePrecision::Bf16).forward(&x).expect("bf16"));
    for (a, b) in bf16.iter().zip(&f32) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE);
        eprintln!("bf16 vs f32 cosine {cosine:.6}");
        assert!(cosine >= 0.999, "cosine {cosine}");
        assert_ne!(a, b, "bf16 rounding must change something");
    }
}
