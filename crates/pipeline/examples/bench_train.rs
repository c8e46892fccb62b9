//! Training-speed benchmark, the Rust side of `scripts/bench_train.sh` (the PyTorch side is
//! `scripts/bench_train_torch.py`, which does the same work).
//!
//! `bench_train cnn [images] [size] [batch] [epochs]`: the study's CNN (two Conv3x3(4) + BN +
//! ReLU + MaxPool blocks, then Linear) on random `images` x 3 x `size` x `size` pixels in
//! [0, 1), Adam, a seeded shuffle each epoch; prints each step's forward (logits and loss),
//! backward and optimizer times and each epoch's time.
//!
//! `bench_train head [rows] [dim] [batch] [epochs]`: the linear head trained with
//! [`pipeline::training::fit`] on random features (all rows train; the first fifth also
//! validate, every epoch); prints the total time.
//!
//! Output: one `key value` line per measure, for the shell script to collect.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use pipeline::config::{HeadKind, TrainSettings};
use pipeline::models::{Cnn, CnnShape};
use pipeline::models::{Head, HeadShape};
use pipeline::training::Rng;
use pipeline::training::{fit, Labelled, Model, Rows, TrainOptions};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], i: usize, default: usize) -> Res<usize> {
    match args.get(i) {
        Some(s) => Ok(s.parse()?),
        None => Ok(default),
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.uniform_f32()).collect()
}

fn cnn(args: &[String]) -> Res<()> {
    let n = arg(args, 2, 1481)?;
    let size = arg(args, 3, 224)?;
    let batch = arg(args, 4, 128)?;
    let epochs = arg(args, 5, 1)?;
    let images = Tensor::from_vec(
        random(n * 3 * size * size, 1),
        (n, 3, size, size),
        &Device::Cpu,
    )?;
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let shape = CnnShape {
        channels: vec![4, 4],
        input_size: size,
        classes: 2,
    };
    let model = Cnn::new(&shape, &mut Rng::new(2), DType::F32, &Device::Cpu)?;
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let vars = model
        .params()
        .trainable()?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut opt = AdamW::new(vars, params)?;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(3);
    let (mut fwd, mut bwd, mut upd, mut steps) = (0.0, 0.0, 0.0, 0usize);
    let mut best_epoch = f64::INFINITY;
    for epoch in 0..epochs {
        rng.shuffle(&mut order);
        let start = Instant::now();
        for rows in order.chunks(batch) {
            let t0 = Instant::now();
            let logits = model.forward_t(
                &Rows {
                    data: &images,
                    rows,
                },
                true,
            )?;
            let y: Vec<u32> = rows.iter().map(|&r| labels[r] as u32).collect();
            let y = Tensor::from_vec(y, rows.len(), &Device::Cpu)?;
            let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &y)?;
            let _ = loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads)?;
            let t3 = Instant::now();
            // Full batches only, as the PyTorch side.
            if rows.len() == batch {
                fwd += (t1 - t0).as_secs_f64();
                bwd += (t2 - t1).as_secs_f64();
                upd += (t3 - t2).as_secs_f64();
                steps += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!("cnn_epoch{} {secs:.3}", epoch + 1);
        best_epoch = best_epoch.min(secs);
    }
    let s = steps.max(1) as f64;
    println!("cnn_epoch_best {best_epoch:.3}");
    println!("cnn_step_forward {:.4}", fwd / s);
    println!("cnn_step_backward {:.4}", bwd / s);
    println!("cnn_step_optimizer {:.4}", upd / s);
    Ok(())
}

fn head(args: &[String]) -> Res<()> {
    let n = arg(args, 2, 1481)?;
    let dim = arg(args, 3, 25088)?;
    let batch = arg(args, 4, 128)?;
    let epochs = arg(args, 5, 30)?;
    let x = Tensor::from_vec(random(n * dim, 4), (n, dim), &Device::Cpu)?;
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let shape = HeadShape::new(HeadKind::Linear, dim, 2, 0.0);
    let head = Head::new(&shape, None, &mut Rng::new(5), DType::F32, &Device::Cpu)?;
    let opts = TrainOptions {
        settings: TrainSettings::new(1e-3, epochs, batch),
        seed: 6,
    };
    let rows: Vec<usize> = (0..n).collect();
    let data = Labelled {
        inputs: &x,
        labels: &labels,
    };
    let start = Instant::now();
    fit(&head, &data, 2, &rows, &rows[..n / 5], &opts, |_| {})?;
    println!("head_total {:.3}", start.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> Res<()> {
    // As the pipeline's binaries do (`cli::main`); `BENCH_DEFAULT_MALLOC=1` skips it to show
    // the difference.
    if std::env::var_os("BENCH_DEFAULT_MALLOC").is_none() {
        pipeline::allocator::keep_freed_memory();
    }
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("cnn") => cnn(&args),
        Some("head") => head(&args),
        _ => Err("usage: bench_train cnn|head [sizes...]".into()),
    }
}
