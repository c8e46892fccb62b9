//! The one training loop, shared by the feature head ([`crate::models::head`]) and the from-scratch CNN
//! ([`crate::models::cnn`]): Adam without weight decay, cross-entropy, a seeded shuffle every epoch, a
//! learning-rate schedule, early stopping on the validation loss, and prediction.
//!
//! Models hold parameters, not data: a [`Model`] registers its tensors in [`Params`] and
//! answers logits for a batch ([`Model::forward_t`]); the loop owns the data ([`Labelled`]) and
//! passes each batch's rows ([`Rows`]).

use std::time::Instant;

use candle_core::{DType, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::config::{Schedule, TrainSettings};
use crate::error::{Error, Result};
use crate::models::params::Params;
use crate::training::rng::Rng;

/// Sub-stream of the seed that shuffles the training rows (the models draw their initial
/// weights from other streams).
pub const SHUFFLE_STREAM: u64 = 0x5348_5546; // "SHUF"

/// A batch: rows of a data tensor (`[n, ...]`), on the model's device. Models that can read
/// rows in place (the linear head) take them as they are; others copy them out with
/// [`Rows::gather`].
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a Tensor,
    pub rows: &'a [usize],
}

impl Rows<'_> {
    /// The selected rows as one tensor `[rows.len(), ...]`.
    pub fn gather(&self) -> Result<Tensor> {
        select_rows(self.data, self.rows)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A model the loop can train.
pub trait Model {
    /// Every tensor of the model, registered by name.
    fn params(&self) -> &Params;
    /// Logits `[x.len(), classes]`. `train`: training mode (dropout on, batch-norm on the
    /// batch's statistics, updating its running statistics); otherwise deterministic.
    fn forward_t(&self, x: &Rows, train: bool) -> Result<Tensor>;
    /// The learning rate of parameter `name` relative to the schedule's. Default: 1.
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
}

/// Inputs and their class indices: what the loop trains on.
#[derive(Clone, Copy)]
pub struct Labelled<'a> {
    /// `[n, ...]`, on the model's device and in its dtype.
    pub inputs: &'a Tensor,
    /// Class index of each input row.
    pub labels: &'a [usize],
}

impl Labelled<'_> {
    fn rows<'r>(&'r self, rows: &'r [usize]) -> Rows<'r> {
        Rows {
            data: self.inputs,
            rows,
        }
    }

    /// The labels of `rows` as a u32 tensor on the inputs' device (cross-entropy's targets).
    fn targets(&self, rows: &[usize]) -> Result<Tensor> {
        let labels: Vec<u32> = rows.iter().map(|&r| self.labels[r] as u32).collect();
        Ok(Tensor::from_vec(labels, rows.len(), self.inputs.device())?)
    }

    /// Checks that every row and label is in range.
    fn check(&self, rows: &[usize], classes: usize) -> Result<()> {
        let n = self.inputs.dim(0)?;
        if self.labels.len() != n {
            return Err(Error::Model {
                model: "training data".into(),
                message: format!("{n} input rows but {} labels", self.labels.len()),
            });
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            return Err(Error::Model {
                model: "training data".into(),
                message: format!("row {r} is out of range: the data holds {n} rows"),
            });
        }
        if let Some((row, &l)) = self.labels.iter().enumerate().find(|(_, &l)| l >= classes) {
            return Err(Error::Model {
                model: "training data".into(),
                message: format!("row {row} has label {l}, but the model has {classes} classes"),
            });
        }
        Ok(())
    }
}

/// How to train: the `[head]` / `[cnn]` training settings and the seed of the shuffles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub settings: TrainSettings,
    /// Seed of the shuffles.
    pub seed: u64,
}

/// What one epoch measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Learning rate used during the epoch.
    pub lr: f64,
    /// Mean training-mode loss over the epoch's training rows (each batch's loss weighted by
    /// its size), measured before each step.
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// Evaluation-mode loss over the validation rows, after the epoch.
    pub val_loss: f64,
    pub val_accuracy: f64,
    /// Wall-clock time of the epoch, validation included.
    pub seconds: f64,
}

/// The epochs trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub epochs: Vec<EpochRecord>,
    /// 1-based epoch with the lowest validation loss (the weights the model ends with when
    /// early stopping is on).
    pub best_epoch: usize,
    pub stopped_early: bool,
}

/// The learning rate of 0-based `epoch`: constant; step (`lr * gamma^(epoch / step_size)`,
/// as PyTorch's StepLR); or cosine from `lr` to 0 over `epochs` (PyTorch's CosineAnnealingLR
/// with `T_max = epochs`, `eta_min = 0`: `lr * (1 + cos(pi * epoch / epochs)) / 2`).
pub fn learning_rate(opts: &TrainSettings, epoch: usize) -> f64 {
    match opts.schedule {
        Schedule::Constant => opts.lr,
        Schedule::Step => {
            let steps = epoch / opts.step_size.max(1);
            opts.lr * opts.gamma.powi(steps.min(i32::MAX as usize) as i32)
        }
        Schedule::Cosine => {
            let t = epoch as f64 / opts.epochs.max(1) as f64;
            opts.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

/// Trains `model` on rows `train_rows` of `data`, validating on `val_rows` after every
/// epoch, and calls `on_epoch` with each epoch's record (for progress and logs).
///
/// Errors: no training or validation rows, a batch size or epoch count of 0, rows or labels
/// out of range, and a NaN or infinite loss (which names the epoch and step).
pub fn fit(
    model: &impl Model,
    data: &Labelled,
    classes: usize,
    train_rows: &[usize],
    val_rows: &[usize],
    opts: &TrainOptions,
    mut on_epoch: impl FnMut(&EpochRecord),
) -> Result<History> {
    let settings = &opts.settings;
    if train_rows.is_empty() || val_rows.is_empty() {
        return Err(Error::EmptySplit {
            train: train_rows.len(),
            val: val_rows.len(),
        });
    }
    if settings.batch_size == 0 || settings.epochs == 0 {
        return Err(Error::InvalidValue {
            key: "batch_size / epochs".into(),
            message: "must be at least 1".into(),
        });
    }
    data.check(train_rows, classes)?;
    data.check(val_rows, classes)?;
    // One Adam per learning-rate scale (parameter group), stepped on the same gradients.
    let mut groups: Vec<(f64, Vec<candle_core::Var>)> = Vec::new();
    for (name, var) in model.params().trainable()? {
        let scale = model.lr_scale(&name);
        match groups.iter_mut().find(|(s, _)| *s == scale) {
            Some((_, vars)) => vars.push(var),
            None => groups.push((scale, vec![var])),
        }
    }
    let mut optimisers = groups
        .into_iter()
        .map(|(scale, vars)| {
            let params = ParamsAdamW {
                lr: settings.lr * scale,
                // candle's AdamW decays by default (0.01); the study's optimiser is plain
                // Adam, so the decay is only what `weight_decay` asks for.
                weight_decay: settings.weight_decay,
                ..Default::default()
            };
            Ok((scale, AdamW::new(vars, params)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut shuffler = Rng::new(opts.seed).fork(SHUFFLE_STREAM);
    let mut order = train_rows.to_vec();
    let mut history = History {
        epochs: Vec::new(),
        best_epoch: 0,
        stopped_early: false,
    };
    let mut best_loss = f64::INFINITY;
    let mut best_state = None;

    for epoch in 0..settings.epochs {
        let start = Instant::now();
        let lr = learning_rate(settings, epoch);
        for (scale, opt) in &mut optimisers {
            opt.set_learning_rate(lr * *scale);
        }
        shuffler.shuffle(&mut order);
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for (step, batch) in order.chunks(settings.batch_size).enumerate() {
            let logits = model.forward_t(&data.rows(batch), true)?;
            let targets = data.targets(batch)?;
            let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(Error::Diverged {
                    epoch: epoch + 1,
                    step: Some(step + 1),
                    loss: value,
                    lr,
                });
            }
            let grads = loss.backward()?;
            for (_, opt) in &mut optimisers {
                opt.step(&grads)?;
            }
            loss_sum += value * batch.len() as f64;
            correct += count_correct(&logits, data, batch)?;
        }
        let (val_loss, val_accuracy) = evaluate(model, data, val_rows, settings.batch_size)?;
        if !val_loss.is_finite() {
            return Err(Error::Diverged {
                epoch: epoch + 1,
                step: None,
                loss: val_loss,
                lr,
            });
        }
        let record = EpochRecord {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / order.len() as f64,
            train_accuracy: correct as f64 / order.len() as f64,
            val_loss,
            val_accuracy,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_epoch(&record);
        history.epochs.push(record);
        if val_loss < best_loss {
            best_loss = val_loss;
            history.best_epoch = epoch + 1;
            if settings.early_stopping.is_some() {
                best_state = Some(model.params().snapshot()?);
            }
        }
        if let Some(patience) = settings.early_stopping {
            if epoch + 1 - history.best_epoch >= patience && epoch + 1 < settings.epochs {
                history.stopped_early = true;
                break;
            }
        }
    }
    if let Some(state) = best_state {
        model.params().restore(&state)?;
    }
    Ok(history)
}

/// Loss and accuracy of rows `rows` of `data` in evaluation mode, in batches.
pub fn evaluate(
    model: &impl Model,
    data: &Labelled,
    rows: &[usize],
    batch_size: usize,
) -> Result<(f64, f64)> {
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for batch in rows.chunks(batch_size.max(1)) {
        let logits = model.forward_t(&data.rows(batch), false)?;
        let targets = data.targets(batch)?;
        let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
        correct += count_correct(&logits, data, batch)?;
    }
    let n = rows.len().max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}

/// Softmax probabilities `[rows.len()][classes]` of rows `rows` of `inputs` in evaluation
/// mode, in batches.
pub fn predict(
    model: &impl Model,
    inputs: &Tensor,
    rows: &[usize],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(rows.len());
    for batch in rows.chunks(batch_size.max(1)) {
        let logits = model.forward_t(
            &Rows {
                data: inputs,
                rows: batch,
            },
            false,
        )?;
        out.extend(probabilities(&logits)?);
    }
    Ok(out)
}

/// Softmax over the last dimension of `[n, classes]` logits, as rows of f32.
pub fn probabilities(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let p = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    Ok(p.to_vec2::<f32>()?)
}

/// Rows whose highest logit is at their label.
fn count_correct(logits: &Tensor, data: &Labelled, rows: &[usize]) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred
        .iter()
        .zip(rows)
        .filter(|(p, &r)| **p as usize == data.labels[r])
        .count())
}

/// The rows of `data` (`[n, ...]`) at `rows`, on `data`'s device.
pub(crate) fn select_rows(data: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let ids = Tensor::from_vec(ids, rows.len(), data.device())?;
    Ok(data.index_select(&ids, 0)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A linear softmax classifier, for testing the loop alone.
    pub struct Toy {
        pub params: Params,
        pub w: Var,
        pub b: Var,
    }

    impl Toy {
        pub fn new(rng: &mut Rng) -> Self {
            let params = Params::new(DType::F32, &Device::Cpu);
            let w = params.uniform("w", (2, 2), 0.7, rng).expect("w");
            let b = params.constant("b", 2, 0.0).expect("b");
            Self { params, w, b }
        }
    }

    impl Model for Toy {
        fn params(&self) -> &Params {
            &self.params
        }
        fn forward_t(&self, x: &Rows, _train: bool) -> Result<Tensor> {
            Ok(x.gather()?
                .matmul(&self.w.as_tensor().t()?)?
                .broadcast_add(self.b.as_tensor())?)
        }
    }

    /// Two Gaussian blobs in 2-D, separable, `n` rows each, and a fresh model.
    pub fn blobs(n: usize, seed: u64) -> (Tensor, Vec<usize>, Toy) {
        let mut rng = Rng::new(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..2 * n {
            let c = i % 2;
            let centre = if c == 0 { -2.0 } else { 2.0 };
            x.push(centre + 0.5 * rng.normal_f32());
            x.push(centre + 0.5 * rng.normal_f32());
            y.push(c);
        }
        let x = Tensor::from_vec(x, (2 * n, 2), &Device::Cpu).expect("x");
        let toy = Toy::new(&mut rng);
        (x, y, toy)
    }

    pub fn opts(epochs: usize, lr: f64) -> TrainOptions {
        TrainOptions {
            settings: TrainSettings::new(lr, epochs, 8),
            seed: 13,
        }
    }

    fn train(
        toy: &Toy,
        x: &Tensor,
        y: &[usize],
        rows: &[usize],
        val: &[usize],
        o: &TrainOptions,
    ) -> Result<History> {
        let data = Labelled {
            inputs: x,
            labels: y,
        };
        fit(toy, &data, 2, rows, val, o, |_| {})
    }

    #[test]
    fn loss_decreases_on_a_separable_problem() {
        let (x, y, toy) = blobs(40, 1);
        let (train_rows, val): (Vec<usize>, Vec<usize>) = (0..80).partition(|r| r % 5 != 0);
        let mut seen = 0;
        let data = Labelled {
            inputs: &x,
            labels: &y,
        };
        let h = fit(&toy, &data, 2, &train_rows, &val, &opts(20, 0.05), |_| {
            seen += 1
        })
        .expect("fit");
        assert_eq!(seen, 20);
        assert_eq!(h.epochs.len(), 20);
        let first = &h.epochs[0];
        let last = &h.epochs[19];
        assert!(
            last.train_loss < 0.5 * first.train_loss,
            "{first:?} {last:?}"
        );
        assert!(last.val_loss < first.val_loss);
        assert_eq!(last.val_accuracy, 1.0);
        assert!(!h.stopped_early);
        let p = predict(&toy, &x, &val, 3).expect("predict");
        assert_eq!(p.len(), val.len());
        for (row, probs) in val.iter().zip(&p) {
            assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(probs[y[*row]] > 0.5);
        }
    }

    #[test]
    fn same_seed_same_history_other_seed_other_order() {
        let run = |seed| {
            let (x, y, toy) = blobs(20, 1);
            let mut o = opts(3, 0.05);
            o.seed = seed;
            let rows: Vec<usize> = (0..30).collect();
            let h = train(&toy, &x, &y, &rows, &[30, 31, 32], &o).expect("fit");
            h.epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn schedules() {
        let mut o = opts(10, 0.1);
        let s = &mut o.settings;
        assert_eq!(learning_rate(s, 7), 0.1);
        s.schedule = Schedule::Step;
        s.step_size = 3;
        s.gamma = 0.5;
        let step: Vec<f64> = (0..7).map(|e| learning_rate(s, e)).collect();
        assert_eq!(step, [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]);
        s.schedule = Schedule::Cosine;
        assert_eq!(learning_rate(s, 0), 0.1);
        assert!((learning_rate(s, 5) - 0.05).abs() < 1e-15);
        let expected = 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * 0.9).cos());
        assert!((learning_rate(s, 9) - expected).abs() < 1e-15);
        assert!(learning_rate(s, 10).abs() < 1e-15);
        // The loop uses and records them.
        let (x, y, toy) = blobs(8, 1);
        let h = train(&toy, &x, &y, &[0, 1, 2, 3], &[4, 5], &o).expect("fit");
        let lrs: Vec<f64> = h.epochs.iter().map(|e| e.lr).collect();
        let want: Vec<f64> = (0..10).map(|e| learning_rate(&o.settings, e)).collect();
        assert_eq!(lrs, want);
    }

    #[test]
    fn a_diverging_loss_is_an_error_naming_the_step() {
        // Separable data only drives the loss to 0 however large the steps; with some labels
        // flipped, Adam's steps of ~lr overflow the logits to infinity.
        let (x, mut y, toy) = blobs(20, 1);
        for label in y.iter_mut().take(4) {
            *label = 1 - *label;
        }
        let rows: Vec<usize> = (0..30).collect();
        let err = train(&toy, &x, &y, &rows, &[30, 31], &opts(5, 1e38)).expect_err("inf");
        let msg = err.to_string();
        assert!(
            msg.contains("epoch") && msg.contains("lower learning rate"),
            "{msg}"
        );
        assert!(matches!(err, Error::Diverged { .. }), "{err:?}");

        let (x, y, toy) = blobs(20, 1);
        let x = (x * f64::NAN).expect("nan features");
        let err = train(&toy, &x, &y, &rows, &[30, 31], &opts(5, 0.01)).expect_err("nan");
        assert!(err.to_string().contains("epoch 1, step 1"), "{err}");
    }

    #[test]
    fn early_stopping_restores_the_best_epoch() {
        // Validation rows labelled against the pattern: the validation loss rises as training
        // fits, so the best epoch is the first and training stops after `patience` more.
        let (x, mut y, toy) = blobs(20, 1);
        let rows: Vec<usize> = (0..30).collect();
        y[30] = 1 - y[30];
        y[31] = 1 - y[31];
        let mut o = opts(50, 0.05);
        o.settings.early_stopping = Some(3);
        let h = train(&toy, &x, &y, &rows, &[30, 31], &o).expect("fit");
        assert!(h.stopped_early);
        assert_eq!(h.epochs.len(), h.best_epoch + 3);
        let best = &h.epochs[h.best_epoch - 1];
        let data = Labelled {
            inputs: &x,
            labels: &y,
        };
        let (val_loss, _) = evaluate(&toy, &data, &[30, 31], 8).expect("eval");
        assert!(
            (val_loss - best.val_loss).abs() < 1e-6,
            "{val_loss} vs {best:?}"
        );
        assert!(h.epochs.last().map(|e| e.val_loss) > Some(best.val_loss));
    }

    #[test]
    fn empty_sides_and_bad_rows_are_errors() {
        let (x, mut y, toy) = blobs(4, 1);
        let o = opts(1, 0.1);
        let err = train(&toy, &x, &y, &[], &[1], &o).expect_err("no training rows");
        assert!(
            matches!(err, Error::EmptySplit { train: 0, val: 1 }),
            "{err:?}"
        );
        assert!(train(&toy, &x, &y, &[0], &[], &o).is_err());
        let err = train(&toy, &x, &y, &[0, 99], &[1], &o).expect_err("row 99");
        assert!(err.to_string().contains("row 99"), "{err}");
        y[2] = 5;
        let err = train(&toy, &x, &y, &[0, 1], &[3], &o).expect_err("label 5");
        assert!(err.to_string().contains("label 5"), "{err}");
    }
}
