//! The training library end to end through its public API: split a labelled set, train both
//! models with the shared loop, save, load and predict.

use candle_core::DType;
use candle_core::{Device, Tensor};
use pipeline::config::{HeadKind, Schedule, TrainSettings};
use pipeline::data::stratified_split;
use pipeline::models::{Cnn, CnnShape};
use pipeline::models::{Head, HeadShape};
use pipeline::training::Rng;
use pipeline::training::{fit, predict, probabilities, Labelled, TrainOptions};

fn opts(epochs: usize, lr: f64) -> TrainOptions {
    TrainOptions {
        settings: TrainSettings {
            schedule: Schedule::Cosine,
            early_stopping: Some(5),
            ..TrainSettings::new(lr, epochs, 16)
        },
        seed: 13,
    }
}

/// Three classes of 40 feature rows around different centres in 32 dimensions.
fn features() -> (Tensor, Vec<usize>) {
    let mut rng = Rng::new(1);
    let (n, dim) = (120, 32);
    let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let x: Vec<f32> = (0..n * dim)
        .map(|i| {
            let (row, col) = (i / dim, i % dim);
            let centre = if col % 3 == labels[row] { 1.5 } else { 0.0 };
            centre + rng.normal_f32()
        })
        .collect();
    let x = Tensor::from_vec(x, (n, dim), &Device::Cpu).expect("features");
    (x, labels)
}

#[test]
fn linear_head_learns_and_survives_a_round_trip() {
    let (x, labels) = features();
    let keys: Vec<String> = (0..labels.len()).map(|i| format!("file{i}")).collect();
    let split = stratified_split(&labels, Some(&keys), 0.25, 13).expect("split");
    assert_eq!(split.val.len(), 30);
    let mut rng = Rng::new(13);
    let shape = HeadShape::new(HeadKind::Linear, 32, 3, 0.5);
    let head = Head::new(&shape, None, &mut rng, DType::F32, &Device::Cpu).expect("head");
    let mut lines = Vec::new();
    let data = Labelled {
        inputs: &x,
        labels: &labels,
    };
    let history = fit(
        &head,
        &data,
        3,
        &split.train,
        &split.val,
        &opts(30, 0.01),
        |e| lines.push(serde_json::to_string(e).expect("json")),
    )
    .expect("fit");
    assert_eq!(lines.len(), history.epochs.len());
    let best = &history.epochs[history.best_epoch - 1];
    assert!(best.val_accuracy > 0.9, "{best:?}");

    let dir = std::env::temp_dir().join(format!("pipeline-train-it-{}", std::process::id()));
    let path = dir.join("head.safetensors");
    head.save(&path).expect("save");
    let loaded = Head::load(&path, &Device::Cpu).expect("load");
    let rows_probs = predict(&head, &x, &split.val, 7).expect("predict");
    let val_x = x
        .index_select(
            &Tensor::from_vec(
                split.val.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                split.val.len(),
                &Device::Cpu,
            )
            .expect("ids"),
            0,
        )
        .expect("select");
    let new_probs = probabilities(&loaded.logits(&val_x).expect("logits")).expect("p");
    assert_eq!(rows_probs, new_probs);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cnn_trains_on_the_same_loop() {
    // Bright versus dark 16x16 images: learnable in a few epochs.
    let mut rng = Rng::new(2);
    let n = 32;
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let px: Vec<f32> = (0..n * 3 * 16 * 16)
        .map(|i| {
            let base = if labels[i / (3 * 256)] == 1 { 0.7 } else { 0.3 };
            base + 0.2 * (rng.uniform_f32() - 0.5)
        })
        .collect();
    let images = Tensor::from_vec(px, (n, 3, 16, 16), &Device::Cpu).expect("images");
    let split = stratified_split(&labels, None, 0.25, 13).expect("split");
    let shape = CnnShape {
        channels: vec![4, 4],
        input_size: 16,
        classes: 2,
    };
    let cnn = Cnn::new(&shape, &mut Rng::new(13), DType::F32, &Device::Cpu).expect("cnn");
    let mut o = opts(15, 0.01);
    o.settings.batch_size = 8;
    let data = Labelled {
        inputs: &images,
        labels: &labels,
    };
    let h = fit(&cnn, &data, 2, &split.train, &split.val, &o, |_| {}).expect("fit");
    let first = &h.epochs[0];
    let best = &h.epochs[h.best_epoch - 1];
    assert!(best.val_loss < first.val_loss, "{first:?} {best:?}");
    assert!(h.epochs.last().map(|e| e.train_loss) < Some(first.train_loss));
}
