//! "Before" baselines for the end-to-end comparison in RESULTS.md: the study's two expensive
//! steps on candle 0.11's own CPU ops, the implementation the project started from, timed on
//! the machine at hand next to what the pipeline uses now.
//!
//! `bench_before extract [images] [weights.safetensors]`: VGG16 features of `images` random
//! 224x224 images (one batch) with candle's `conv2d` engine ([`Vgg16Features::load_candle`])
//! and with the default CPU engine (fastconv, Winograd F(2x2)); images/s of each.
//!
//! `bench_before cnn-step [batch]`: training steps of the study's CNN (two Conv3x3(4) + BN +
//! ReLU + MaxPool2 blocks, Linear(4*56*56 -> 2)) written with candle's `conv2d`, batch-norm
//! arithmetic, `relu` and `max_pool2d`, gradients by candle's autograd: forward and backward
//! seconds per step (best of 2), and the same for the pipeline's `Cnn`.
//!
//! Output: `key value` lines.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use pipeline::features::BackboneOptions;
use pipeline::models::{Cnn, CnnShape};
use pipeline::training::Rng;
use pipeline::training::{Model, Rows};
use pipeline::{Vgg16Features, Weights};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.uniform_f32()).collect()
}

fn extract(args: &[String]) -> Res<()> {
    let n: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let path = args.get(3).map_or(
        "../shared/weights/vgg16-oxford-imagenet-features.safetensors",
        String::as_str,
    );
    let weights = Weights::open(path.into())?;
    let x = Tensor::from_vec(random(n * 3 * 224 * 224, 1), (n, 3, 224, 224), &Device::Cpu)?;
    // A workspace as large as the whole batch's columns: candle's conv2d as it comes.
    let candle = Vgg16Features::load_candle(&weights, &Device::Cpu, DType::F32, usize::MAX)?;
    let fast = Vgg16Features::load(&weights, &Device::Cpu, &BackboneOptions::default())?;
    for (name, model) in [("candle_conv2d", &candle), ("fastconv_winograd2x2", &fast)] {
        let start = Instant::now();
        let _ = model.forward(&x)?;
        let secs = start.elapsed().as_secs_f64();
        println!("extract_{name}_images_per_s {:.3}", n as f64 / secs);
    }
    Ok(())
}

/// One block with candle ops: conv2d + bias, batch norm with the batch's statistics, ReLU,
/// 2x2 max-pool.
fn block(x: &Tensor, w: &Var, b: &Var, gamma: &Var, beta: &Var) -> Res<Tensor> {
    let c = b.dim(0)?;
    let y = x
        .conv2d(w.as_tensor(), 1, 1, 1, 1)?
        .broadcast_add(&b.as_tensor().reshape((1, c, 1, 1))?)?;
    let mean = y.mean_keepdim((0, 2, 3))?;
    let centred = y.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    let norm = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
    let out = norm
        .broadcast_mul(&gamma.as_tensor().reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.as_tensor().reshape((1, c, 1, 1))?)?;
    Ok(out.relu()?.max_pool2d(2)?)
}

fn cnn_step(args: &[String]) -> Res<()> {
    let batch: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let dev = Device::Cpu;
    let x = Tensor::from_vec(random(batch * 3 * 224 * 224, 1), (batch, 3, 224, 224), &dev)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 2).collect();
    let y = Tensor::from_vec(labels.clone(), batch, &dev)?;
    let var = |shape: &[usize], seed: u64, scale: f32| -> Res<Var> {
        let n = shape.iter().product();
        let v: Vec<f32> = random(n, seed).iter().map(|v| (v - 0.5) * scale).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)?)
    };
    let ones = |c: usize| Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?);
    let zeros = |c: usize| Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?);
    let (w1, b1, g1, be1) = (var(&[4, 3, 3, 3], 2, 0.5)?, zeros(4)?, ones(4)?, zeros(4)?);
    let (w2, b2, g2, be2) = (var(&[4, 4, 3, 3], 3, 0.5)?, zeros(4)?, ones(4)?, zeros(4)?);
    let (lw, lb) = (var(&[2, 4 * 56 * 56], 4, 0.01)?, zeros(2)?);
    time_steps("candle", &y, || {
        let h = block(&x, &w1, &b1, &g1, &be1)?;
        let h = block(&h, &w2, &b2, &g2, &be2)?.flatten_from(1)?;
        Ok(h.matmul(&lw.as_tensor().t()?)?
            .broadcast_add(lb.as_tensor())?)
    })?;

    // The pipeline's model on the same batch.
    let shape = CnnShape {
        channels: vec![4, 4],
        input_size: 224,
        classes: 2,
    };
    let model = Cnn::new(&shape, &mut Rng::new(2), DType::F32, &dev)?;
    let rows: Vec<usize> = (0..batch).collect();
    let batch = Rows {
        data: &x,
        rows: &rows,
    };
    time_steps("pipeline", &y, || Ok(model.forward_t(&batch, true)?))
}

/// Two training steps (`logits()`, cross-entropy against `y`, backward): prints the best
/// forward and backward seconds as `cnn_step_{name}_forward` / `_backward`.
fn time_steps(name: &str, y: &Tensor, mut logits: impl FnMut() -> Res<Tensor>) -> Res<()> {
    let (mut fwd, mut bwd) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        let t0 = Instant::now();
        let loss = candle_nn::loss::cross_entropy(&logits()?, y)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let _grads = loss.backward()?;
        let t2 = Instant::now();
        fwd = fwd.min((t1 - t0).as_secs_f64());
        bwd = bwd.min((t2 - t1).as_secs_f64());
    }
    println!("cnn_step_{name}_forward {fwd:.3}");
    println!("cnn_step_{name}_backward {bwd:.3}");
    Ok(())
}

fn main() -> Res<()> {
    pipeline::allocator::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("extract") => extract(&args),
        Some("cnn-step") => cnn_step(&args),
        _ => Err("usage: bench_before extract [images] [weights] | cnn-step [batch]".into()),
    }
}
