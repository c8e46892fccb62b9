//! The study's training steps as the binaries run them: the shared split, `train-head` on the
//! feature store, `train-cnn` on the images, and the per-run outputs (resolved config, weights,
//! `metrics.json` rewritten after every epoch, plots, and the comparison report).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cnn::{load_images, Cnn};
use crate::config::{Config, HeadKind, OnBadImage};
use crate::dataset::{hex, Dataset};
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::extract::{hash_samples, load_features, Plan};
use crate::head::Head;
use crate::metrics::{argmax_rows, ConfusionMatrix, Metrics};
use crate::plot::{confusion_matrix_png, line_chart, Series};
use crate::report::{markdown_table, terminal_table, winner, ModelRow};
use crate::rng::Rng;
use crate::runs::{latest, RunDir, METRICS_FILE};
use crate::split::{stratified_split, Split};
use crate::train::{fit, predict, EpochRecord, History, TrainOptions, Trainable};

/// Sub-stream of the seed that initialises model weights.
const INIT_STREAM: u64 = 0x494e_4954; // "INIT"

/// The split every model of a study uses, with the ids of each side's images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudySplit {
    #[serde(flatten)]
    pub split: Split,
    /// SHA-256 over the ids on each side: equal fingerprints mean comparable runs.
    pub fingerprint: String,
    pub seed: u64,
    pub val_fraction: f64,
    pub group_duplicates: bool,
}

/// Splits the dataset's rows as `[split]` says; duplicates grouped by file content.
pub fn split_dataset(
    config: &Config,
    dataset: &Dataset,
    hashes: &[Option<String>],
) -> Result<StudySplit> {
    let s = &config.split;
    let groups: Vec<String> = hashes
        .iter()
        .enumerate()
        .map(|(i, h)| h.clone().unwrap_or_else(|| format!("unreadable-{i}")))
        .collect();
    let split = stratified_split(
        &dataset.labels(),
        s.group_duplicates.then_some(groups.as_slice()),
        s.val_fraction,
        s.seed,
    )?;
    let mut digest = Sha256::new();
    for (side, rows) in [("train", &split.train), ("val", &split.val)] {
        for &r in rows {
            digest.update(format!("{side}\t{}\n", dataset.samples[r].id));
        }
    }
    eprintln!(
        "split: {} training, {} validation images (seed {}); {} duplicate groups ({} files), {} with conflicting labels{}",
        split.train.len(),
        split.val.len(),
        s.seed,
        split.duplicate_groups,
        split.duplicate_files,
        split.conflicting_groups,
        if s.group_duplicates { ", each kept on one side" } else { " (not grouped: copies may leak into validation)" }
    );
    Ok(StudySplit {
        split,
        fingerprint: hex(&digest.finalize())[..16].to_string(),
        seed: s.seed,
        val_fraction: s.val_fraction,
        group_duplicates: s.group_duplicates,
    })
}

/// `metrics.json` of a run. The fixed keys (`model`, `train_accuracy`, `val_accuracy`,
/// `history`, `confusion_matrix`, `classes`) are what scripts rely on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMetrics {
    /// "head" or "cnn".
    pub model: String,
    /// Human name: "VGG16 + linear head", "CNN baseline [4, 4]".
    pub name: String,
    pub classes: Vec<String>,
    /// Evaluation-mode accuracy over the training rows with the final weights.
    pub train_accuracy: f64,
    pub val_accuracy: f64,
    /// Validation confusion matrix (rows: true class, columns: predicted).
    pub confusion_matrix: Vec<Vec<usize>>,
    pub train: Option<Metrics>,
    pub val: Option<Metrics>,
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub stopped_early: bool,
    /// Wall-clock training time (all epochs, validation included).
    pub train_seconds: f64,
    /// Training images processed per second (epochs x training rows / seconds).
    pub images_per_second: f64,
    pub split: StudySplit,
    /// False while training is under way (the file is rewritten after every epoch).
    pub finished: bool,
}

/// What a training run produced.
pub struct RunOutcome {
    pub dir: PathBuf,
    pub metrics: RunMetrics,
    /// The comparison table (terminal form).
    pub table: String,
}

/// `train-head`: trains the configured head on the cached features.
pub fn train_head(config: &Config) -> Result<RunOutcome> {
    let plan = Plan::new(config)?;
    let set = load_features(config, &plan)?;
    let split = split_dataset(config, &plan.dataset, &plan.hashes)?;
    // Feature rows on each side (rows of skipped images are simply absent).
    let side = |rows: &[usize]| -> Vec<usize> {
        let mut on = vec![false; plan.dataset.samples.len()];
        rows.iter().for_each(|&r| on[r] = true);
        (0..set.rows.len()).filter(|&i| on[set.rows[i]]).collect()
    };
    let (train_rows, val_rows) = (side(&split.split.train), side(&split.split.val));
    let device = training_device(config)?;
    let h = &config.head;
    let mut rng = Rng::new(config.split.seed).fork(INIT_STREAM);
    let dim = set.key.dim;
    let classes = plan.dataset.classes.clone();
    let features = set.features.to_device(&device)?;
    let mut head = Head::new(
        h.kind,
        dim,
        classes.len(),
        h.dropout,
        features,
        set.labels.clone(),
        Some(&plan.weights),
        &mut rng,
    )?;
    let kind = match h.kind {
        HeadKind::Linear => "linear",
        HeadKind::Mlp => "mlp",
    };
    let run = RunDir::create(&config.output.runs, &format!("head-{kind}"))?;
    run.write_config(config)?;
    run.write_json("cache_key.json", &set.key)?;
    let opts = TrainOptions {
        epochs: h.epochs,
        batch_size: h.batch_size,
        lr: h.lr,
        schedule: h.schedule,
        step_size: h.step_size,
        gamma: h.gamma,
        early_stopping: h.early_stopping,
        seed: config.split.seed,
    };
    let name = format!("VGG16 + {kind} head");
    let outcome = train_and_record(
        &mut head,
        &run,
        "head",
        &name,
        classes,
        split,
        &train_rows,
        &val_rows,
        &opts,
    )?;
    head.save(&run.file("head.safetensors"))?;
    finish_run(config, &run, outcome)
}

/// `train-cnn`: trains the from-scratch CNN baseline on the images of the same split.
pub fn train_cnn(config: &Config) -> Result<RunOutcome> {
    let dataset = Dataset::load(&config.data)?;
    let hashes = hash_samples(&dataset, config.data.on_bad_image)?;
    let split = split_dataset(config, &dataset, &hashes)?;
    let c = &config.cnn;
    let start = Instant::now();
    let paths: Vec<&Path> = dataset.samples.iter().map(|s| s.path.as_path()).collect();
    // Unreadable images (skip mode) are left out of both sides.
    let keep: Vec<usize> = match config.data.on_bad_image {
        OnBadImage::Error => (0..paths.len()).collect(),
        OnBadImage::Skip => (0..paths.len()).filter(|&i| hashes[i].is_some()).collect(),
    };
    let kept_paths: Vec<&Path> = keep.iter().map(|&i| paths[i]).collect();
    let images = load_images(&kept_paths, c.input_size).map_err(|e| match e {
        Error::BadImage { .. } if config.data.on_bad_image == OnBadImage::Skip => Error::Training(
            format!("{e} (on_bad_image = \"skip\" leaves out only files that cannot be read)"),
        ),
        e => e,
    })?;
    eprintln!(
        "train-cnn: loaded {} images at {}x{} in {:.1} s",
        keep.len(),
        c.input_size,
        c.input_size,
        start.elapsed().as_secs_f64()
    );
    let mut position = vec![usize::MAX; dataset.samples.len()];
    keep.iter().enumerate().for_each(|(i, &r)| position[r] = i);
    let side = |rows: &[usize]| -> Vec<usize> {
        rows.iter()
            .map(|&r| position[r])
            .filter(|&p| p != usize::MAX)
            .collect()
    };
    let (train_rows, val_rows) = (side(&split.split.train), side(&split.split.val));
    let labels: Vec<usize> = keep
        .iter()
        .map(|&r| dataset.samples[r].label.unwrap_or(0))
        .collect();
    let device = training_device(config)?;
    let mut rng = Rng::new(config.split.seed).fork(INIT_STREAM);
    let mut cnn = Cnn::new(
        &c.channels,
        c.input_size as usize,
        dataset.classes.len(),
        images.to_device(&device)?,
        labels,
        &mut rng,
    )?;
    let run = RunDir::create(&config.output.runs, "cnn")?;
    run.write_config(config)?;
    let opts = TrainOptions {
        epochs: c.epochs,
        batch_size: c.batch_size,
        lr: c.lr,
        schedule: crate::config::Schedule::Constant,
        step_size: 1,
        gamma: 1.0,
        early_stopping: c.early_stopping,
        seed: config.split.seed,
    };
    let name = format!("CNN baseline {:?}", c.channels);
    let outcome = train_and_record(
        &mut cnn,
        &run,
        "cnn",
        &name,
        dataset.classes.clone(),
        split,
        &train_rows,
        &val_rows,
        &opts,
    )?;
    cnn.save(&run.file("cnn.safetensors"))?;
    finish_run(config, &run, outcome)
}

/// Trains with per-epoch log lines and `metrics.json` rewritten after every epoch, then
/// measures the final model on both sides.
#[allow(clippy::too_many_arguments)]
fn train_and_record(
    model: &mut impl Trainable,
    run: &RunDir,
    kind: &str,
    name: &str,
    classes: Vec<String>,
    split: StudySplit,
    train_rows: &[usize],
    val_rows: &[usize],
    opts: &TrainOptions,
) -> Result<RunMetrics> {
    let mut metrics = RunMetrics {
        model: kind.into(),
        name: name.into(),
        classes,
        train_accuracy: f64::NAN,
        val_accuracy: f64::NAN,
        confusion_matrix: Vec::new(),
        train: None,
        val: None,
        history: Vec::new(),
        best_epoch: 0,
        stopped_early: false,
        train_seconds: 0.0,
        images_per_second: 0.0,
        split,
        finished: false,
    };
    eprintln!(
        "{name}: training on {} rows, validating on {}; run {}",
        train_rows.len(),
        val_rows.len(),
        run.path.display()
    );
    let start = Instant::now();
    let mut write_error = None;
    let history: History = fit(model, train_rows, val_rows, opts, |r| {
        println!(
            "epoch {:>3}/{}  lr {:.2e}  train loss {:.4}  train acc {:.2}%  val loss {:.4}  val acc {:.2}%  ({:.1} s)",
            r.epoch,
            opts.epochs,
            r.lr,
            r.train_loss,
            100.0 * r.train_accuracy,
            r.val_loss,
            100.0 * r.val_accuracy,
            r.seconds
        );
        metrics.history.push(r.clone());
        if let Err(e) = run.write_json(METRICS_FILE, &metrics) {
            write_error.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_error {
        return Err(e);
    }
    metrics.train_seconds = start.elapsed().as_secs_f64();
    let seen: usize = history.epochs.len() * train_rows.len();
    metrics.images_per_second = seen as f64 / metrics.train_seconds.max(1e-9);
    metrics.best_epoch = history.best_epoch;
    metrics.stopped_early = history.stopped_early;
    let n = metrics.classes.len();
    let measure = |rows: &[usize]| -> Result<Metrics> {
        let probs = predict(model, rows, opts.batch_size)?;
        let flat: Vec<f32> = probs.into_iter().flatten().collect();
        let labels = model.labels();
        let mut cm = ConfusionMatrix::new(n);
        cm.update(
            &argmax_rows(&flat, n),
            &rows.iter().map(|&r| labels[r]).collect::<Vec<_>>(),
        );
        Ok(cm.compute())
    };
    let (train, val) = (measure(train_rows)?, measure(val_rows)?);
    metrics.train_accuracy = train.accuracy;
    metrics.val_accuracy = val.accuracy;
    metrics.confusion_matrix = val.confusion_matrix.clone();
    metrics.train = Some(train);
    metrics.val = Some(val);
    metrics.finished = true;
    Ok(metrics)
}

/// Writes metrics, plots and the comparison report of a finished run.
fn finish_run(config: &Config, run: &RunDir, metrics: RunMetrics) -> Result<RunOutcome> {
    run.write_json(METRICS_FILE, &metrics)?;
    write_plots(run, &metrics)?;
    let table = write_report(config, &run.path)?;
    Ok(RunOutcome {
        dir: run.path.clone(),
        metrics,
        table,
    })
}

fn write_plots(run: &RunDir, m: &RunMetrics) -> Result<()> {
    let series = |name: &str, f: fn(&EpochRecord) -> f64| Series {
        name: name.into(),
        values: m.history.iter().map(f).collect(),
    };
    line_chart(
        &run.file("loss.png"),
        &format!("{} loss", m.name),
        "epoch",
        &[
            series("train", |r| r.train_loss),
            series("validation", |r| r.val_loss),
        ],
    )?;
    line_chart(
        &run.file("accuracy.png"),
        &format!("{} accuracy", m.name),
        "epoch",
        &[
            series("train", |r| r.train_accuracy),
            series("validation", |r| r.val_accuracy),
        ],
    )?;
    confusion_matrix_png(
        &run.file("confusion_matrix.png"),
        &format!("{} validation", m.name),
        &m.classes,
        &m.confusion_matrix,
    )
}

/// The latest finished run of each model kind under `[output] runs`.
pub fn latest_runs(runs: &Path) -> Result<Vec<(PathBuf, RunMetrics)>> {
    let mut out = Vec::new();
    for prefix in ["cnn-", "head-linear-", "head-mlp-"] {
        if let Some(dir) = latest(runs, prefix)? {
            let path = dir.join(METRICS_FILE);
            let text = std::fs::read(&path).map_err(|e| Error::Io {
                path: path.clone(),
                source: e,
            })?;
            let m: RunMetrics = serde_json::from_slice(&text).map_err(|e| Error::Io {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            if m.finished {
                out.push((dir, m));
            }
        }
    }
    Ok(out)
}

/// Writes `report.md` in `run` comparing it with the latest run of every other model trained
/// on the same split; returns the terminal table.
pub fn write_report(config: &Config, run: &Path) -> Result<String> {
    let all = latest_runs(&config.output.runs)?;
    let this = all
        .iter()
        .find(|(d, _)| d == run)
        .map(|(_, m)| m.split.fingerprint.clone())
        .unwrap_or_default();
    let (same, other): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(_, m)| m.split.fingerprint == this);
    let rows: Vec<ModelRow> = same
        .iter()
        .map(|(_, m)| ModelRow {
            model: m.name.clone(),
            train_accuracy: m.train_accuracy,
            val_accuracy: m.val_accuracy,
            val_macro_f1: m.val.as_ref().map_or(f64::NAN, |v| v.macro_f1),
            train_seconds: m.train_seconds,
            images_per_second: m.images_per_second,
        })
        .collect();
    let mut md = String::from("# Which approach won\n\n");
    if let Some((_, m)) = same.first() {
        let s = &m.split;
        md.push_str(&format!(
            "Same split for every row: {} training / {} validation images, seed {}, validation fraction {}, \
             duplicates {} ({} groups of byte-identical files, {} with conflicting labels).\n\n",
            s.split.train.len(),
            s.split.val.len(),
            s.seed,
            s.val_fraction,
            if s.group_duplicates { "kept on one side" } else { "not grouped" },
            s.split.duplicate_groups,
            s.split.conflicting_groups
        ));
    }
    md.push_str(&markdown_table(&rows));
    if let Some(w) = winner(&rows) {
        md.push_str(&format!(
            "\n**Winner: {}** ({:.2}% validation accuracy).\n",
            w.model,
            100.0 * w.val_accuracy
        ));
    }
    md.push_str("\nImages/s: training images processed per second (feature rows for heads: extraction is separate).\n");
    md.push_str("\n## Runs\n\n");
    for (dir, m) in &same {
        let rel = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        md.push_str(&format!(
            "### {}\n\n`{rel}`: best epoch {} of {}{}.\n\n![loss](../{rel}/loss.png) ![accuracy](../{rel}/accuracy.png) ![confusion](../{rel}/confusion_matrix.png)\n\n",
            m.name,
            m.best_epoch,
            m.history.len(),
            if m.stopped_early { " (stopped early)" } else { "" }
        ));
    }
    if !other.is_empty() {
        md.push_str("Left out (trained on another split): ");
        let names: Vec<String> = other.iter().map(|(d, _)| d.display().to_string()).collect();
        md.push_str(&names.join(", "));
        md.push('\n');
    }
    crate::store::atomic_write(&run.join("report.md"), md.as_bytes())?;
    Ok(terminal_table(&rows))
}

/// Training runs where extraction runs: `[extract] device`.
fn training_device(config: &Config) -> Result<Device> {
    DeviceChoice::parse(&config.extract.device)?.open_logged("train")
}

/// Probabilities of a head on new feature rows, batched.
pub fn head_probabilities(head: &Head, features: &Tensor) -> Result<Vec<Vec<f32>>> {
    let logits = head.logits_for(&features.to_dtype(DType::F32)?)?;
    crate::train::probabilities(&logits)
}
