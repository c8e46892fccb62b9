//! The one training loop, shared by the feature head ([`crate::head`]) and the from-scratch CNN
//! ([`crate::cnn`]): Adam without weight decay, cross-entropy, a seeded shuffle every epoch, a
//! learning-rate schedule, early stopping on the validation loss, and prediction. Also the
//! safetensors save/load of a model's state, which both models use.
//!
//! A model is anything [`Trainable`]: it holds its own data (feature rows or images) and
//! labels, and answers logits for a list of row indices.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::config::Schedule;
use crate::error::{Error, IoContext, Result};
use crate::rng::Rng;

/// Sub-stream of the seed that shuffles the training rows (the models draw their initial
/// weights from other streams).
pub const SHUFFLE_STREAM: u64 = 0x5348_5546; // "SHUF"

/// A model the loop can train. It holds its data and labels; rows are indices into them.
pub trait Trainable {
    /// The parameters Adam updates.
    fn vars(&self) -> Vec<Var>;
    /// Every tensor defining the model, parameters and buffers (e.g. batch-norm running
    /// statistics), by name: what is saved, and what early stopping snapshots and restores.
    fn state(&self) -> Vec<(String, Var)>;
    /// Logits `[rows.len(), classes]` in training mode (dropout on, batch-norm on batch
    /// statistics and updating its running statistics), hence `&mut`.
    fn train_logits(&mut self, rows: &[usize]) -> Result<Tensor>;
    /// Logits `[rows.len(), classes]` in evaluation mode (deterministic, no state change).
    fn eval_logits(&self, rows: &[usize]) -> Result<Tensor>;
    /// Class index of every row.
    fn labels(&self) -> &[usize];
    /// Where the model's tensors live.
    fn device(&self) -> &Device;
}

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// Epochs between decays of the step schedule.
    pub step_size: usize,
    /// Factor of the step schedule.
    pub gamma: f64,
    /// Stop after this many epochs without a lower validation loss, then restore the weights
    /// of the best epoch. `None`: train every epoch and keep the last weights.
    pub early_stopping: Option<usize>,
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
pub fn learning_rate(opts: &TrainOptions, epoch: usize) -> f64 {
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

/// Trains `model` on `train_rows`, validating on `val_rows` after every epoch, and calls
/// `on_epoch` with each epoch's record (for progress and logs).
///
/// Errors: no training or validation rows, a batch size or epoch count of 0, and a NaN or
/// infinite loss (which names the epoch and step).
pub fn fit(
    model: &mut impl Trainable,
    train_rows: &[usize],
    val_rows: &[usize],
    opts: &TrainOptions,
    mut on_epoch: impl FnMut(&EpochRecord),
) -> Result<History> {
    if train_rows.is_empty() || val_rows.is_empty() {
        return Err(Error::Training(format!(
            "{} training and {} validation rows: both sides need at least one",
            train_rows.len(),
            val_rows.len()
        )));
    }
    if opts.batch_size == 0 || opts.epochs == 0 {
        return Err(Error::Training(
            "batch size and epochs must be at least 1".into(),
        ));
    }
    let n_labels = model.labels().len();
    if let Some(&r) = train_rows.iter().chain(val_rows).find(|&&r| r >= n_labels) {
        return Err(Error::Training(format!(
            "row {r} is out of range: the model holds {n_labels} rows"
        )));
    }
    let params = ParamsAdamW {
        lr: opts.lr,
        // candle's AdamW decays by default; the study's optimiser is plain Adam.
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(model.vars(), params)?;
    let mut shuffler = Rng::new(opts.seed).fork(SHUFFLE_STREAM);
    let mut order = train_rows.to_vec();
    let mut history = History {
        epochs: Vec::new(),
        best_epoch: 0,
        stopped_early: false,
    };
    let mut best_loss = f64::INFINITY;
    let mut best_state: Option<Vec<Tensor>> = None;

    for epoch in 0..opts.epochs {
        let start = Instant::now();
        let lr = learning_rate(opts, epoch);
        opt.set_learning_rate(lr);
        shuffler.shuffle(&mut order);
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for (step, batch) in order.chunks(opts.batch_size).enumerate() {
            let logits = model.train_logits(batch)?;
            let targets = label_tensor(model, batch)?;
            let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(Error::Training(format!(
                    "the loss is {value} at epoch {}, step {} (learning rate {lr:e}): \
                     try a lower learning rate",
                    epoch + 1,
                    step + 1
                )));
            }
            opt.backward_step(&loss)?;
            loss_sum += value * batch.len() as f64;
            correct += count_correct(&logits, &model.labels_of(batch))?;
        }
        let (val_loss, val_accuracy) = evaluate(model, val_rows, opts.batch_size)?;
        if !val_loss.is_finite() {
            return Err(Error::Training(format!(
                "the validation loss is {val_loss} after epoch {} (learning rate {lr:e}): \
                 try a lower learning rate",
                epoch + 1
            )));
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
            if opts.early_stopping.is_some() {
                best_state = Some(snapshot(model)?);
            }
        }
        if let Some(patience) = opts.early_stopping {
            if epoch + 1 - history.best_epoch >= patience && epoch + 1 < opts.epochs {
                history.stopped_early = true;
                break;
            }
        }
    }
    if let Some(state) = best_state {
        restore(model, &state)?;
    }
    Ok(history)
}

/// Loss and accuracy of `rows` in evaluation mode, in batches.
pub fn evaluate(model: &impl Trainable, rows: &[usize], batch_size: usize) -> Result<(f64, f64)> {
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for batch in rows.chunks(batch_size.max(1)) {
        let logits = model.eval_logits(batch)?;
        let targets = label_tensor(model, batch)?;
        let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
        correct += count_correct(&logits, &model.labels_of(batch))?;
    }
    let n = rows.len().max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}

/// Softmax probabilities `[rows.len()][classes]` in evaluation mode, in batches.
pub fn predict(model: &impl Trainable, rows: &[usize], batch_size: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(rows.len());
    for batch in rows.chunks(batch_size.max(1)) {
        let logits = model.eval_logits(batch)?;
        out.extend(probabilities(&logits)?);
    }
    Ok(out)
}

/// Softmax over the last dimension of `[n, classes]` logits, as rows of f32.
pub fn probabilities(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let p = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    Ok(p.to_vec2::<f32>()?)
}

/// Labels of some rows.
trait LabelsOf {
    fn labels_of(&self, rows: &[usize]) -> Vec<usize>;
}

impl<T: Trainable + ?Sized> LabelsOf for T {
    fn labels_of(&self, rows: &[usize]) -> Vec<usize> {
        let labels = self.labels();
        rows.iter().map(|&r| labels[r]).collect()
    }
}

/// The labels of `rows` as a u32 tensor on the model's device (cross-entropy's targets).
fn label_tensor(model: &impl Trainable, rows: &[usize]) -> Result<Tensor> {
    let labels: Vec<u32> = model.labels_of(rows).iter().map(|&l| l as u32).collect();
    Ok(Tensor::from_vec(labels, rows.len(), model.device())?)
}

/// Rows whose highest logit is at their label.
fn count_correct(logits: &Tensor, labels: &[usize]) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p as usize == **l)
        .count())
}

/// A deep copy of the model's state (not sharing storage with its vars).
pub fn snapshot(model: &impl Trainable) -> Result<Vec<Tensor>> {
    model
        .state()
        .iter()
        .map(|(_, v)| Ok(v.as_tensor().copy()?))
        .collect()
}

/// Writes a snapshot back into the model's vars, in [`Trainable::state`] order.
pub fn restore(model: &impl Trainable, state: &[Tensor]) -> Result<()> {
    let vars = model.state();
    if vars.len() != state.len() {
        return Err(Error::Training(format!(
            "snapshot of {} tensors for a model of {}",
            state.len(),
            vars.len()
        )));
    }
    for ((_, v), t) in vars.iter().zip(state) {
        v.set(t)?;
    }
    Ok(())
}

/// Saves the model's state as safetensors (f32 on disk), with `metadata`, atomically.
pub fn save_state(
    model: &impl Trainable,
    path: &Path,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let tensors = model
        .state()
        .into_iter()
        .map(|(name, v)| {
            Ok((
                name,
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| Error::Training(format!("serialising {}: {e}", path.display())))?;
    crate::store::atomic_write(path, &bytes)
}

/// A saved state file: its metadata, and its tensors by name.
pub struct SavedState {
    pub path: std::path::PathBuf,
    pub metadata: HashMap<String, String>,
    bytes: Vec<u8>,
}

impl SavedState {
    /// Reads a file written by [`save_state`].
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::WeightsSource {
            source_name: path.display().to_string(),
            message: format!("not a safetensors file: {e}"),
        })?;
        Ok(Self {
            path: path.to_owned(),
            metadata: header.metadata().clone().unwrap_or_default(),
            bytes,
        })
    }

    /// Metadata field `key` parsed as JSON; an error names the file and the key.
    pub fn field<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let err = |message: String| Error::Weights {
            path: self.path.clone(),
            tensor: format!("metadata `{key}`"),
            message,
        };
        let raw = self
            .metadata
            .get(key)
            .ok_or_else(|| err("missing".into()))?;
        serde_json::from_str(raw).map_err(|e| err(e.to_string()))
    }

    /// Copies every tensor of the model's state from the file (checking names and shapes),
    /// converted to each var's dtype.
    pub fn load_into(&self, model: &impl Trainable) -> Result<()> {
        use candle_core::safetensors::Load;
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| Error::WeightsSource {
            source_name: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        for (name, var) in model.state() {
            let err = |message: String| Error::Weights {
                path: self.path.clone(),
                tensor: name.clone(),
                message,
            };
            let view = st.tensor(&name).map_err(|_| err("missing".into()))?;
            if view.shape() != var.dims() {
                return Err(err(format!(
                    "shape {:?}, expected {:?}",
                    view.shape(),
                    var.dims()
                )));
            }
            let t = view.load(var.device()).map_err(|e| err(e.to_string()))?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// The rows of `data` (`[n, ...]`) at `rows`, on `data`'s device.
pub(crate) fn select_rows(data: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let ids = Tensor::from_vec(ids, rows.len(), data.device())?;
    Ok(data.index_select(&ids, 0)?)
}

/// Draws `len` values from U(-bound, bound): PyTorch's default init of linear and conv layers
/// uses `bound = 1 / sqrt(fan_in)` for both weight and bias.
pub(crate) fn uniform(rng: &mut Rng, len: usize, bound: f32) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.uniform_f32() * 2.0 - 1.0) * bound)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A linear softmax classifier over fixed rows, for testing the loop alone.
    pub struct Toy {
        pub x: Tensor,
        pub w: Var,
        pub b: Var,
        pub y: Vec<usize>,
    }

    impl Toy {
        /// Two Gaussian blobs in 2-D, separable, `n` rows each.
        pub fn blobs(n: usize, seed: u64) -> Self {
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
            let dev = Device::Cpu;
            let x = Tensor::from_vec(x, (2 * n, 2), &dev).expect("x");
            let w = Var::from_vec(uniform(&mut rng, 4, 0.7), (2, 2), &dev).expect("w");
            let b = Var::zeros(2, DType::F32, &dev).expect("b");
            Self { x, w, b, y }
        }
    }

    impl Trainable for Toy {
        fn vars(&self) -> Vec<Var> {
            vec![self.w.clone(), self.b.clone()]
        }
        fn state(&self) -> Vec<(String, Var)> {
            vec![("w".into(), self.w.clone()), ("b".into(), self.b.clone())]
        }
        fn train_logits(&mut self, rows: &[usize]) -> Result<Tensor> {
            self.eval_logits(rows)
        }
        fn eval_logits(&self, rows: &[usize]) -> Result<Tensor> {
            let x = select_rows(&self.x, rows)?;
            Ok(x.matmul(&self.w.as_tensor().t()?)?
                .broadcast_add(self.b.as_tensor())?)
        }
        fn labels(&self) -> &[usize] {
            &self.y
        }
        fn device(&self) -> &Device {
            self.x.device()
        }
    }

    pub fn opts(epochs: usize, lr: f64) -> TrainOptions {
        TrainOptions {
            epochs,
            batch_size: 8,
            lr,
            schedule: Schedule::Constant,
            step_size: 10,
            gamma: 0.1,
            early_stopping: None,
            seed: 13,
        }
    }

    #[test]
    fn loss_decreases_on_a_separable_problem() {
        let mut toy = Toy::blobs(40, 1);
        let (train, val): (Vec<usize>, Vec<usize>) = (0..80).partition(|r| r % 5 != 0);
        let mut seen = 0;
        let h = fit(&mut toy, &train, &val, &opts(20, 0.05), |_| seen += 1).expect("fit");
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
        let p = predict(&toy, &val, 3).expect("predict");
        assert_eq!(p.len(), val.len());
        for (row, probs) in val.iter().zip(&p) {
            assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(probs[toy.y[*row]] > 0.5);
        }
    }

    #[test]
    fn same_seed_same_history_other_seed_other_order() {
        let run = |seed| {
            let mut toy = Toy::blobs(20, 1);
            let mut o = opts(3, 0.05);
            o.seed = seed;
            let train: Vec<usize> = (0..30).collect();
            let h = fit(&mut toy, &train, &[30, 31, 32], &o, |_| {}).expect("fit");
            h.epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn schedules() {
        let mut o = opts(10, 0.1);
        assert_eq!(learning_rate(&o, 7), 0.1);
        o.schedule = Schedule::Step;
        o.step_size = 3;
        o.gamma = 0.5;
        let step: Vec<f64> = (0..7).map(|e| learning_rate(&o, e)).collect();
        assert_eq!(step, [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]);
        o.schedule = Schedule::Cosine;
        assert_eq!(learning_rate(&o, 0), 0.1);
        assert!((learning_rate(&o, 5) - 0.05).abs() < 1e-15);
        let expected = 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * 0.9).cos());
        assert!((learning_rate(&o, 9) - expected).abs() < 1e-15);
        assert!(learning_rate(&o, 10).abs() < 1e-15);
        // The loop uses and records them.
        let mut toy = Toy::blobs(8, 1);
        let h = fit(&mut toy, &[0, 1, 2, 3], &[4, 5], &o, |_| {}).expect("fit");
        let lrs: Vec<f64> = h.epochs.iter().map(|e| e.lr).collect();
        let want: Vec<f64> = (0..10).map(|e| learning_rate(&o, e)).collect();
        assert_eq!(lrs, want);
    }

    #[test]
    fn a_diverging_loss_is_an_error_naming_the_step() {
        // Separable data only drives the loss to 0 however large the steps; with some labels
        // flipped, Adam's steps of ~lr overflow the logits to infinity.
        let mut toy = Toy::blobs(20, 1);
        for r in 0..4 {
            toy.y[r] = 1 - toy.y[r];
        }
        let train: Vec<usize> = (0..30).collect();
        let err = fit(&mut toy, &train, &[30, 31], &opts(5, 1e38), |_| {}).expect_err("inf");
        let msg = err.to_string();
        assert!(
            msg.contains("epoch") && msg.contains("lower learning rate"),
            "{msg}"
        );

        let mut toy = Toy::blobs(20, 1);
        toy.x = (toy.x.clone() * f64::NAN).expect("nan features");
        let err = fit(&mut toy, &train, &[30, 31], &opts(5, 0.01), |_| {}).expect_err("nan");
        assert!(err.to_string().contains("epoch 1, step 1"), "{err}");
    }

    #[test]
    fn early_stopping_restores_the_best_epoch() {
        // Validation rows labelled against the pattern: the validation loss rises as training
        // fits, so the best epoch is the first and training stops after `patience` more.
        let mut toy = Toy::blobs(20, 1);
        let train: Vec<usize> = (0..30).collect();
        toy.y[30] = 1 - toy.y[30];
        toy.y[31] = 1 - toy.y[31];
        let mut o = opts(50, 0.05);
        o.early_stopping = Some(3);
        let h = fit(&mut toy, &train, &[30, 31], &o, |_| {}).expect("fit");
        assert!(h.stopped_early);
        assert_eq!(h.epochs.len(), h.best_epoch + 3);
        let best = &h.epochs[h.best_epoch - 1];
        let (val_loss, _) = evaluate(&toy, &[30, 31], 8).expect("eval");
        assert!(
            (val_loss - best.val_loss).abs() < 1e-6,
            "{val_loss} vs {best:?}"
        );
        assert!(h.epochs.last().map(|e| e.val_loss) > Some(best.val_loss));
    }

    #[test]
    fn empty_sides_and_bad_rows_are_errors() {
        let mut toy = Toy::blobs(4, 1);
        assert!(fit(&mut toy, &[], &[1], &opts(1, 0.1), |_| {}).is_err());
        assert!(fit(&mut toy, &[0], &[], &opts(1, 0.1), |_| {}).is_err());
        assert!(fit(&mut toy, &[0, 99], &[1], &opts(1, 0.1), |_| {}).is_err());
    }
}
