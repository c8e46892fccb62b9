//! Time of one CNN epoch at the study's size (128 random 224x224 images, channels [4, 4],
//! batch 128). Ignored by default; run with
//! `cargo test --release -p pipeline --test train_cnn_timing -- --ignored --nocapture`.

use candle_core::{Device, Tensor};
use pipeline::cnn::Cnn;
use pipeline::config::Schedule;
use pipeline::rng::Rng;
use pipeline::train::{fit, TrainOptions};

#[test]
#[ignore = "a timing measurement, not a check"]
fn cnn_epoch_time_at_224() {
    let (n, s) = (128, 224);
    let mut rng = Rng::new(1);
    let px: Vec<f32> = (0..n * 3 * s * s).map(|_| rng.uniform_f32()).collect();
    let images = Tensor::from_vec(px, (n, 3, s, s), &Device::Cpu).expect("images");
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let mut cnn = Cnn::new(&[4, 4], s, 2, images, labels, &mut Rng::new(13)).expect("cnn");
    let opts = TrainOptions {
        epochs: 2,
        batch_size: 128,
        lr: 1e-4,
        schedule: Schedule::Constant,
        step_size: 10,
        gamma: 0.1,
        early_stopping: None,
        seed: 13,
    };
    let rows: Vec<usize> = (0..n).collect();
    // Every row trains (one step of 128) and the same 128 validate.
    fit(&mut cnn, &rows, &rows, &opts, |e| {
        println!(
            "epoch {}: {:.2} s (train loss {:.4})",
            e.epoch, e.seconds, e.train_loss
        )
    })
    .expect("fit");
}
