//! Block-5 fine-tuning speed, the Rust side of `scripts/bench_block5.sh` (the PyTorch side is
//! `scripts/bench_block5_torch.py`, which does the same work).
//!
//! `bench_block5 [images] [batch] [side]`: [`pipeline::models::Block5Head`] (VGG16's three
//! 512-channel block-5 convolutions + ReLU, 2x2 max-pool, linear head to 2 classes) trained
//! on `images` random block-4 activations (`[512, side, side]`, ReLU'd normal values, about
//! half zeros as real ones), batch `batch`, cross-entropy, backward, Adam (convolutions at 0.1x
//! the head's rate): one pass over the images after one warm-up step. Prints each measure as a
//! `key value` line: per-image forward / backward / optimizer seconds, and the epoch time of
//! the study's 1,316 training images scaled from them.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use pipeline::features::Weights;
use pipeline::models::{Block5Head, Block5Shape};
use pipeline::training::{Model, Rng, Rows};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Training images of the study's split (one epoch).
const STUDY_TRAIN_IMAGES: f64 = 1316.0;

fn arg(args: &[String], i: usize, default: usize) -> Res<usize> {
    match args.get(i) {
        Some(s) => Ok(s.parse()?),
        None => Ok(default),
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let (n, batch, side) = (arg(&args, 1, 256)?, arg(&args, 2, 128)?, arg(&args, 3, 14)?);
    let c = 512;
    let mut rng = Rng::new(5);
    // Random block-5 weights (speed does not depend on the values), He-like scale.
    let bound = (6.0 / (c as f32 * 9.0)).sqrt();
    let mut tensors = HashMap::new();
    for index in [24, 26, 28] {
        let w: Vec<f32> = (0..c * c * 9)
            .map(|_| (2.0 * rng.uniform_f32() - 1.0) * bound)
            .collect();
        tensors.insert(
            format!("features.{index}.weight"),
            Tensor::from_vec(w, (c, c, 3, 3), &Device::Cpu)?,
        );
        tensors.insert(
            format!("features.{index}.bias"),
            Tensor::zeros(c, DType::F32, &Device::Cpu)?,
        );
    }
    let path =
        std::env::temp_dir().join(format!("bench-block5-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&tensors, &path)?;
    let weights = Weights::open(path.clone())?;
    std::fs::remove_file(&path)?;
    let shape = Block5Shape {
        channels: c,
        side,
        classes: 2,
        conv_lr_scale: 0.1,
    };
    let model = Block5Head::new(&shape, &weights, &mut rng, DType::F32, &Device::Cpu)?;
    let x: Vec<f32> = (0..n * shape.input_dim())
        .map(|_| rng.normal_f32().max(0.0))
        .collect();
    let x = Tensor::from_vec(x, (n, shape.input_dim()), &Device::Cpu)?;
    let labels: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
    let mut groups: Vec<(f64, Vec<candle_core::Var>)> = Vec::new();
    for (name, var) in model.params().trainable()? {
        let scale = model.lr_scale(&name);
        match groups.iter_mut().find(|(s, _)| *s == scale) {
            Some((_, vars)) => vars.push(var),
            None => groups.push((scale, vec![var])),
        }
    }
    let mut opts = groups
        .into_iter()
        .map(|(scale, vars)| {
            AdamW::new(
                vars,
                ParamsAdamW {
                    lr: 5e-4 * scale,
                    weight_decay: 0.0,
                    ..Default::default()
                },
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let rows: Vec<usize> = (0..n).collect();
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    // One warm-up step (allocations, thread pool), then the measured pass.
    for (pass, chunks) in [
        (0, rows.chunks(batch).take(1).collect::<Vec<_>>()),
        (1, rows.chunks(batch).collect()),
    ] {
        for chunk in chunks {
            let t = Instant::now();
            let logits = model.forward_t(
                &Rows {
                    data: &x,
                    rows: chunk,
                },
                true,
            )?;
            let y = Tensor::from_vec(
                chunk.iter().map(|&r| labels[r]).collect::<Vec<_>>(),
                chunk.len(),
                &Device::Cpu,
            )?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            for o in &mut opts {
                o.step(&grads)?;
            }
            let t3 = Instant::now();
            if pass == 1 {
                fwd += (t1 - t).as_secs_f64();
                bwd += (t2 - t1).as_secs_f64();
                opt += (t3 - t2).as_secs_f64();
            }
        }
    }
    let per = |s: f64| s / n as f64;
    println!("block5_forward_per_image {:.5}", per(fwd));
    println!("block5_backward_per_image {:.5}", per(bwd));
    println!("block5_optimizer_per_image {:.5}", per(opt));
    println!(
        "block5_epoch_scaled {:.2}",
        per(fwd + bwd + opt) * STUDY_TRAIN_IMAGES
    );
    Ok(())
}
