//! The study's training steps as the binaries run them: the shared split, `train-head` on the
//! feature cache, `train-cnn` on the images, and the per-run outputs (resolved config, weights,
//! `metrics.json` rewritten after every epoch, plots, and the comparison report).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, HeadKind, OnBadImage, Unfreeze, ValViews};
use crate::data::dataset::{hex, Dataset};
use crate::data::split::{stratified_split, Split};
use crate::error::{Error, Result};
use crate::features::extract::{hash_samples, load_features, Plan};
use crate::features::store::FeatureSet;
use crate::features::views::{self, expand_rows, mean_over_views};
use crate::models::cnn::{load_images, Cnn, CnnShape};
use crate::models::finetune::{Block5Head, Block5Shape};
use crate::models::head::{Head, HeadShape};
use crate::models::scaling::Scaler;
use crate::reporting::plot::{confusion_matrix_png, line_chart, Series};
use crate::reporting::report::{markdown_table, terminal_table, winner, ModelRow};
use crate::reporting::runs::{latest_finished, RunDir, RunStatus, METRICS_FILE};
use crate::training::fit::{
    evaluate, fit, predict, EpochRecord, History, Labelled, Model, TrainOptions,
};
use crate::training::metrics::{argmax_rows, ConfusionMatrix, Metrics};
use crate::training::rng::Rng;

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

/// The feature rows of each side of an image split when the features hold `views` views of
/// `kept` images, view-major ([`crate::features::FeatureSet`]): training takes every view of
/// each training image; validation the original view of each validation image (its other views
/// are rows `v * kept + i`, averaged when `[head] val_views = "mean"`). Whatever the split, an
/// image's views are all on its side.
pub fn view_rows(
    train_images: &[usize],
    val_images: Vec<usize>,
    kept: usize,
    views: usize,
) -> (Vec<usize>, Vec<usize>) {
    (expand_rows(train_images, kept, views), val_images)
}

/// `metrics.json` of a run. The fixed keys (`model`, `status`, `train_accuracy`,
/// `val_accuracy`, `history`, `confusion_matrix`, `classes`) are what scripts rely on.
///
/// While training, `status` is "running" and the final numbers are `null` (NaN here, shown as
/// `-` in tables); read files with [`read_metrics`], which also understands older files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMetrics {
    /// "head" or "cnn".
    pub model: String,
    /// Human name: "VGG16 + linear head", "CNN baseline [4, 4]".
    pub name: String,
    /// "running" while the file is rewritten after every epoch, "finished" at the end.
    pub status: RunStatus,
    pub classes: Vec<String>,
    /// Evaluation-mode accuracy over the training rows with the final weights.
    #[serde(deserialize_with = "nan_if_null")]
    pub train_accuracy: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub val_accuracy: f64,
    /// Validation confusion matrix (rows: true class, columns: predicted).
    pub confusion_matrix: Vec<Vec<usize>>,
    pub train: Option<Metrics>,
    pub val: Option<Metrics>,
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub stopped_early: bool,
    /// Wall-clock training time (all epochs, validation included).
    #[serde(deserialize_with = "nan_if_null")]
    pub train_seconds: f64,
    /// Training images processed per second (epochs x training rows / seconds).
    #[serde(deserialize_with = "nan_if_null")]
    pub images_per_second: f64,
    pub split: StudySplit,
    /// The augmented views of each image the model was trained on (`[extract] views`; the
    /// CNN and runs from before views: the original alone).
    #[serde(default = "views::original_only")]
    pub views: Vec<String>,
    /// How the final validation metrics score an image: "original" (its original view) or
    /// "mean" (its class probabilities averaged over `views`). Per-epoch `history` always
    /// scores the original view.
    #[serde(default = "original_name")]
    pub val_views: String,
}

fn original_name() -> String {
    "original".into()
}

/// A number that JSON may hold as `null`: serde_json writes a NaN (a value not measured yet)
/// as `null`, so reading it back must accept it.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Reads a run's `metrics.json`, of this version or an older one (without `status`: see
/// [`crate::reporting::runs::status_of`]). Errors name the file.
pub fn read_metrics(run: &Path) -> Result<RunMetrics> {
    let path = run.join(METRICS_FILE);
    let bad = |message: String| Error::Io {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    };
    let bytes = std::fs::read(&path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    let mut json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let status = crate::reporting::runs::status_of(&json).map_err(bad)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert(
            "status".into(),
            serde_json::to_value(status).map_err(|e| bad(e.to_string()))?,
        );
    }
    serde_json::from_value(json).map_err(|e| bad(format!("not a run's metrics: {e}")))
}

/// What a training run produced.
pub struct RunOutcome {
    pub dir: PathBuf,
    pub metrics: RunMetrics,
    /// The comparison table (terminal form).
    pub table: String,
}

/// `train-head`: trains the configured head on the cached features (with `[head] unfreeze =
/// "block5"`, VGG16's block 5 and a linear head on cached block-4 activations).
pub fn train_head(config: &Config) -> Result<RunOutcome> {
    let device = training_device(config)?;
    let plan = Plan::new(config)?;
    let set = if config.head.unfreeze == Unfreeze::Block5 {
        load_or_extract(config, &plan)?
    } else {
        load_features(config, &plan)?
    };
    if config.head.unfreeze == Unfreeze::Block5 {
        return train_block5(config, &device, &plan, set);
    }
    let split = split_dataset(config, &plan.dataset, &plan.hashes)?;
    // Feature rows on each side (rows of skipped images are simply absent).
    let side = |rows: &[usize]| -> Vec<usize> {
        let mut on = vec![false; plan.dataset.samples.len()];
        rows.iter().for_each(|&r| on[r] = true);
        (0..set.rows.len()).filter(|&i| on[set.rows[i]]).collect()
    };
    let (train_images, val_images) = (side(&split.split.train), side(&split.split.val));
    // The split is of images: every view of a training image trains (feature rows are
    // view-major, see `FeatureSet`), and validation rows are the original views of the
    // validation images (the mean over views is taken at the end when `val_views = "mean"`).
    let kept = set.rows.len();
    let view_count = set.views.len();
    let (train_rows, val_rows) = view_rows(&train_images, val_images, kept, view_count);
    let labels: Vec<usize> = set.labels.repeat(view_count);
    let h = &config.head;
    let mut rng = Rng::new(config.split.seed).fork(INIT_STREAM);
    let dim = set.key.dim;
    let classes = plan.dataset.classes.clone();
    // Scaling is fitted on the training rows only, then applied to every row once.
    let raw = set.features.to_device(&device)?;
    let scaler = Scaler::fit(h.scaling, &raw, &train_rows)?;
    let features = scaler.apply(&raw)?;
    drop(raw);
    let data = Labelled {
        inputs: &features,
        labels: &labels,
    };
    let kind = match h.kind {
        HeadKind::Linear => "linear",
        HeadKind::Mlp => "mlp",
        HeadKind::Logistic => "logistic",
    };
    let run = RunDir::create(&config.output.runs, &format!("head-{kind}"))?;
    run.write_config(config)?;
    run.write_json("cache_key.json", &set.key)?;
    let shape = HeadShape::new(h.kind, dim, classes.len(), h.dropout);
    let view_names = views::names(&set.views);
    let mut name = format!(
        "{} + {kind} head",
        crate::features::backbone::spec(&set.key.backbone)?.display
    );
    if view_count > 1 {
        name.push_str(&format!(
            ", views {} (val {})",
            view_names.join("+"),
            h.val_views.name()
        ));
    }
    let spec = RunSpec {
        run: &run,
        kind: "head",
        name: &name,
        views: Views {
            names: view_names,
            per_view: kept,
            // With the original view alone, "mean" is the original view: said as such.
            val: if view_count > 1 {
                h.val_views
            } else {
                ValViews::Original
            },
        },
        classes,
        split,
        train_rows: &train_rows,
        val_rows: &val_rows,
        epochs: if h.kind == HeadKind::Logistic {
            1
        } else {
            h.train.epochs
        },
        batch_size: h.train.batch_size,
    };
    let train: Train<'_, Head> = match h.kind {
        HeadKind::Logistic => logistic_head(config, &shape, scaler, &data, &spec),
        HeadKind::Linear | HeadKind::Mlp => {
            let head = Head::new(
                &shape,
                Some(&plan.weights),
                &mut rng,
                features.dtype(),
                &device,
            )?
            .with_scaler(scaler)?;
            let opts = TrainOptions {
                settings: h.train.clone(),
                seed: config.split.seed,
            };
            with_fit(head, &data, &spec, opts)
        }
    };
    let (head, outcome) = train_and_record(&spec, &data, train)?;
    head.save(&run.file("head.safetensors"))?;
    finish_run(config, &run, outcome)
}

/// The dataset's features from the store, extracted first (by `extract`'s own code, so its
/// locking, resume and validation hold) when the store lacks or has damaged some of them.
fn load_or_extract(config: &Config, plan: &Plan) -> Result<FeatureSet> {
    match load_features(config, plan) {
        Ok(set) => Ok(set),
        Err(Error::Cache { message, .. }) => {
            eprintln!("train-head: {message}; extracting the block-4 activations now");
            let summary = crate::features::extract::run(config)?;
            eprintln!("{summary}");
            load_features(config, plan)
        }
        Err(e) => Err(e),
    }
}

/// `train-head` with `[head] unfreeze = "block5"`: first the linear head alone on block 5's
/// frozen output (computed once from the cached block-4 activations; `[head] epochs`), then
/// block 5 and the head together (`[head] finetune_epochs`, the convolutions at `lr *
/// conv_lr_scale`), as fastai's `fine_tune`. Same split, seeds, metrics, run files and report
/// as the other heads; the run is `head-block5-<time>` with `block5.safetensors`.
fn train_block5(
    config: &Config,
    device: &Device,
    plan: &Plan,
    set: FeatureSet,
) -> Result<RunOutcome> {
    let split = split_dataset(config, &plan.dataset, &plan.hashes)?;
    let side = |rows: &[usize]| -> Vec<usize> {
        let mut on = vec![false; plan.dataset.samples.len()];
        rows.iter().for_each(|&r| on[r] = true);
        (0..set.rows.len()).filter(|&i| on[set.rows[i]]).collect()
    };
    let (train_rows, val_rows) = (side(&split.split.train), side(&split.split.val));
    let h = &config.head;
    let classes = plan.dataset.classes.clone();
    let shape = Block5Shape {
        channels: 512,
        side: set.key.preprocessing.input_size as usize / 16,
        classes: classes.len(),
        conv_lr_scale: h.conv_lr_scale,
    };
    let mut rng = Rng::new(config.split.seed).fork(INIT_STREAM);
    let model = Block5Head::new(&shape, &plan.weights, &mut rng, DType::F32, device)?;
    let activations = set.features.to_device(device)?;
    drop(set.features);
    let data = Labelled {
        inputs: &activations,
        labels: &set.labels,
    };
    let run = RunDir::create(&config.output.runs, "head-block5")?;
    run.write_config(config)?;
    run.write_json("cache_key.json", &set.key)?;
    let spec = RunSpec {
        run: &run,
        kind: "head",
        name: "VGG16 + fine-tuned block 5 + linear head",
        // Config validation refuses block 5 with augmented views: the original view only.
        views: Views {
            names: views::original_only(),
            per_view: set.labels.len(),
            val: ValViews::Original,
        },
        classes,
        split,
        train_rows: &train_rows,
        val_rows: &val_rows,
        epochs: h.train.epochs + h.finetune_epochs,
        batch_size: h.train.batch_size,
    };
    let seed = config.split.seed;
    let train: Train<'_, Block5Head> = Box::new(|on_epoch| {
        // 1. The head alone, on block 5's frozen output computed once.
        let start = Instant::now();
        let all: Vec<usize> = (0..activations.dim(0)?).collect();
        let mut parts = Vec::new();
        for chunk in all.chunks(h.train.batch_size.max(1)) {
            let rows = crate::training::fit::select_rows(&activations, chunk)?;
            parts.push(model.block5_features(&rows)?);
        }
        let pool5 = Tensor::cat(&parts, 0)?;
        drop(parts);
        eprintln!(
            "block5: block 5's frozen output of {} images in {:.1} s; training the head alone for {} epochs",
            all.len(),
            start.elapsed().as_secs_f64(),
            h.train.epochs
        );
        let head_shape = HeadShape::new(HeadKind::Linear, shape.feature_dim(), shape.classes, 0.0);
        let head = Head::new(&head_shape, None, &mut rng, DType::F32, device)?;
        let frozen = Labelled {
            inputs: &pool5,
            labels: data.labels,
        };
        let opts = TrainOptions {
            settings: h.train.clone(),
            seed,
        };
        let first = fit(
            &head,
            &frozen,
            shape.classes,
            &train_rows,
            &val_rows,
            &opts,
            &mut *on_epoch,
        )?;
        let trained = head.params().sorted()?;
        let get = |name: &str| {
            trained
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_tensor().clone())
                .ok_or_else(|| Error::Model {
                    model: "block5".into(),
                    message: format!("the warm-up head has no `{name}`"),
                })
        };
        model.set_head(&get("fc.weight")?, &get("fc.bias")?)?;
        drop(pool5);
        // 2. Block 5 and the head together.
        eprintln!(
            "block5: fine-tuning block 5 (lr x {}) and the head for {} epochs",
            h.conv_lr_scale, h.finetune_epochs
        );
        let done = first.epochs.len();
        let opts = TrainOptions {
            settings: crate::config::TrainSettings {
                epochs: h.finetune_epochs,
                ..h.train.clone()
            },
            seed: seed.wrapping_add(1),
        };
        let second = fit(
            &model,
            &data,
            shape.classes,
            &train_rows,
            &val_rows,
            &opts,
            |r: &EpochRecord| {
                on_epoch(&EpochRecord {
                    epoch: done + r.epoch,
                    ..r.clone()
                })
            },
        )?;
        let mut epochs = first.epochs;
        epochs.extend(second.epochs.into_iter().map(|r| EpochRecord {
            epoch: done + r.epoch,
            ..r
        }));
        let history = History {
            epochs,
            best_epoch: done + second.best_epoch,
            stopped_early: second.stopped_early,
        };
        Ok((model, history))
    });
    let (model, outcome) = train_and_record(&spec, &data, train)?;
    model.save(&run.file(BLOCK5_FILE))?;
    finish_run(config, &run, outcome)
}

/// The weights file of a block-5 run (a head run's is `head.safetensors`).
pub const BLOCK5_FILE: &str = "block5.safetensors";

/// The logistic head's training: cross-validation over `[head] c`, the final fit on all
/// training rows, and one record of its losses and accuracies (it has no epochs). The
/// cross-validation table is printed and written to the run's `cv.json`.
fn logistic_head<'a>(
    config: &'a Config,
    shape: &'a HeadShape,
    scaler: Scaler,
    data: &'a Labelled<'a>,
    spec: &'a RunSpec<'a>,
) -> Train<'a, Head> {
    Box::new(move |on_epoch| {
        let start = Instant::now();
        let h = &config.head;
        // Cross-validation folds are made of images: all views of an image in one fold.
        let images: Vec<usize> = spec
            .train_rows
            .iter()
            .map(|r| r % spec.views.per_view.max(1))
            .collect();
        let (solution, scores) = crate::models::logistic::fit_cv(
            data.inputs,
            data.labels,
            shape.classes,
            spec.train_rows,
            &images,
            &h.c,
            h.cv_folds,
            config.split.seed,
        )?;
        for s in &scores {
            eprintln!(
                "logistic: C {:<8e} cross-validated log-loss {:.4}, accuracy {:.2}%{}",
                s.c,
                s.log_loss,
                100.0 * s.accuracy,
                if s.c == solution.c { "  <- chosen" } else { "" }
            );
        }
        spec.run.write_json("cv.json", &scores)?;
        let device = data.inputs.device();
        let head = Head::from_weights(shape, &solution.weight, &solution.bias, device)?
            .with_scaler(scaler)?;
        let batch = spec.batch_size;
        let (train_loss, train_accuracy) = evaluate(&head, data, spec.train_rows, batch)?;
        let (val_loss, val_accuracy) = evaluate(&head, data, spec.val_rows, batch)?;
        let record = EpochRecord {
            epoch: 1,
            lr: 0.0,
            train_loss,
            train_accuracy,
            val_loss,
            val_accuracy,
            seconds: start.elapsed().as_secs_f64(),
        };
        eprintln!(
            "logistic: C {:e} ({} L-BFGS iterations on the training rows)",
            solution.c, solution.iterations
        );
        on_epoch(&record);
        let history = History {
            epochs: vec![record],
            best_epoch: 1,
            stopped_early: false,
        };
        Ok((head, history))
    })
}

/// `train-cnn`: trains the from-scratch CNN baseline on the images of the same split.
pub fn train_cnn(config: &Config) -> Result<RunOutcome> {
    // The device first: a `cuda` that cannot be kept fails before minutes of image loading.
    let device = training_device(config)?;
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
    let images = load_images(&kept_paths, c.input_size, &dataset.limits).map_err(|e| match e {
        Error::BadImage { path, message } if config.data.on_bad_image == OnBadImage::Skip => {
            Error::BadImage {
                path,
                message: format!(
                    "{message} (on_bad_image = \"skip\" leaves out only files that cannot be read)"
                ),
            }
        }
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
    let mut rng = Rng::new(config.split.seed).fork(INIT_STREAM);
    let images = images.to_device(&device)?;
    let shape = CnnShape {
        channels: c.channels.clone(),
        input_size: c.input_size as usize,
        classes: dataset.classes.len(),
    };
    let cnn = Cnn::new(&shape, &mut rng, images.dtype(), &device)?;
    let data = Labelled {
        inputs: &images,
        labels: &labels,
    };
    let run = RunDir::create(&config.output.runs, "cnn")?;
    run.write_config(config)?;
    let spec = RunSpec {
        run: &run,
        kind: "cnn",
        name: &format!("CNN baseline {:?}", c.channels),
        views: Views {
            names: views::original_only(),
            per_view: labels.len(),
            val: ValViews::Original,
        },
        classes: dataset.classes.clone(),
        split,
        train_rows: &train_rows,
        val_rows: &val_rows,
        epochs: c.train.epochs,
        batch_size: c.train.batch_size,
    };
    let opts = TrainOptions {
        settings: c.train.clone(),
        seed: config.split.seed,
    };
    let (cnn, outcome) = train_and_record(&spec, &data, with_fit(cnn, &data, &spec, opts))?;
    cnn.save(&run.file("cnn.safetensors"))?;
    finish_run(config, &run, outcome)
}

/// Where a run's training happens and what it reports: the run directory, the model kind
/// and name, the classes, the split and its rows.
struct RunSpec<'a> {
    run: &'a RunDir,
    kind: &'a str,
    name: &'a str,
    /// The views of the data's rows.
    views: Views,
    classes: Vec<String>,
    split: StudySplit,
    train_rows: &'a [usize],
    val_rows: &'a [usize],
    /// For the log lines ("epoch 3/30") and the measuring batches.
    epochs: usize,
    batch_size: usize,
}

/// The views of a run's data rows: `names.len()` views of `per_view` images each, view-major
/// (image `i` under view `v` is row `v * per_view + i`), and how validation scores them.
struct Views {
    names: Vec<String>,
    per_view: usize,
    val: ValViews,
}

/// A training procedure: builds and trains a model, calling its argument after every epoch.
type Train<'a, M> = Box<dyn FnOnce(&mut dyn FnMut(&EpochRecord)) -> Result<(M, History)> + 'a>;

/// Trains the shared loop's way (Adam, [`fit`]).
fn with_fit<'a, M: Model + 'a>(
    model: M,
    data: &'a Labelled<'a>,
    spec: &'a RunSpec<'a>,
    opts: TrainOptions,
) -> Train<'a, M> {
    Box::new(move |on_epoch| {
        let classes = spec.classes.len();
        let history = fit(
            &model,
            data,
            classes,
            spec.train_rows,
            spec.val_rows,
            &opts,
            on_epoch,
        )?;
        Ok((model, history))
    })
}

/// Runs `train` with per-epoch log lines and `metrics.json` rewritten after every epoch, then
/// measures the final model on both sides.
fn train_and_record<M: Model>(
    spec: &RunSpec,
    data: &Labelled,
    train: Train<'_, M>,
) -> Result<(M, RunMetrics)> {
    let RunSpec {
        run,
        kind,
        name,
        train_rows,
        val_rows,
        ..
    } = *spec;
    let mut metrics = RunMetrics {
        model: kind.into(),
        name: name.into(),
        status: RunStatus::Running,
        classes: spec.classes.clone(),
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
        split: spec.split.clone(),
        views: spec.views.names.clone(),
        val_views: spec.views.val.name().into(),
    };
    eprintln!(
        "{name}: training on {} rows, validating on {}; run {}",
        train_rows.len(),
        val_rows.len(),
        run.path.display()
    );
    let start = Instant::now();
    let mut write_error = None;
    let mut on_epoch = |r: &EpochRecord| {
        println!(
            "epoch {:>3}/{}  lr {:.2e}  train loss {:.4}  train acc {:.2}%  val loss {:.4}  val acc {:.2}%  ({:.1} s)",
            r.epoch,
            spec.epochs,
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
    };
    let (model, history): (M, History) = train(&mut on_epoch)?;
    if let Some(e) = write_error {
        return Err(e);
    }
    metrics.train_seconds = start.elapsed().as_secs_f64();
    let seen: usize = history.epochs.len() * train_rows.len();
    metrics.images_per_second = seen as f64 / metrics.train_seconds.max(1e-9);
    metrics.best_epoch = history.best_epoch;
    metrics.stopped_early = history.stopped_early;
    let n = metrics.classes.len();
    // `mean`: each validation image's probabilities averaged over its views' rows.
    let over_views = spec.views.val == ValViews::Mean && spec.views.names.len() > 1;
    let measure = |rows: &[usize], mean: bool| -> Result<Metrics> {
        let probs = if mean {
            let per_view = (0..spec.views.names.len())
                .map(|v| {
                    let shifted: Vec<usize> =
                        rows.iter().map(|r| v * spec.views.per_view + r).collect();
                    predict(&model, data.inputs, &shifted, spec.batch_size)
                })
                .collect::<Result<Vec<_>>>()?;
            mean_over_views(&per_view)?
        } else {
            predict(&model, data.inputs, rows, spec.batch_size)?
        };
        let flat: Vec<f32> = probs.into_iter().flatten().collect();
        let labels = data.labels;
        let mut cm = ConfusionMatrix::new(n);
        cm.update(
            &argmax_rows(&flat, n),
            &rows.iter().map(|&r| labels[r]).collect::<Vec<_>>(),
        );
        Ok(cm.compute())
    };
    let (train, val) = (measure(train_rows, false)?, measure(val_rows, over_views)?);
    metrics.train_accuracy = train.accuracy;
    metrics.val_accuracy = val.accuracy;
    metrics.confusion_matrix = val.confusion_matrix.clone();
    metrics.train = Some(train);
    metrics.val = Some(val);
    metrics.status = RunStatus::Finished;
    Ok((model, metrics))
}

/// Writes metrics, plots and the comparison report of a finished run.
fn finish_run(config: &Config, run: &RunDir, metrics: RunMetrics) -> Result<RunOutcome> {
    run.write_json(METRICS_FILE, &metrics)?;
    write_plots(run, &metrics)?;
    let table = write_report(config, &run.path, &metrics)?;
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
        "loss",
        &[
            series("train", |r| r.train_loss),
            series("validation", |r| r.val_loss),
        ],
    )?;
    line_chart(
        &run.file("accuracy.png"),
        &format!("{} accuracy", m.name),
        "epoch",
        "accuracy",
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

/// Run-name prefixes of the model kinds the report compares.
const RUN_KINDS: [&str; 5] = [
    "cnn-",
    "head-linear-",
    "head-mlp-",
    "head-logistic-",
    "head-block5-",
];

/// Writes `report.md` in `run` comparing it (its `metrics`) with the latest finished run of
/// every other model kind trained on the same split; returns the terminal table. Other runs'
/// files never make this fail: unfinished or unreadable runs are skipped, saying so.
pub fn write_report(config: &Config, run: &Path, metrics: &RunMetrics) -> Result<String> {
    let run_name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut all = Vec::new();
    let mut passed_over = Vec::new();
    for prefix in RUN_KINDS {
        if run_name.starts_with(prefix) {
            // This run stands for its kind, whatever else of that kind is newer.
            all.push((run.to_owned(), metrics.clone()));
            continue;
        }
        let latest = latest_finished(&config.output.runs, prefix, read_metrics);
        for note in latest.notes("report") {
            eprintln!("{note}");
        }
        passed_over.extend(latest.skipped);
        all.extend(latest.run);
    }
    let this = metrics.split.fingerprint.clone();
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
    if !passed_over.is_empty() {
        md.push_str("\nPassed over (newer than the runs above, but unfinished or unreadable):\n\n");
        for s in &passed_over {
            md.push_str(&format!("- `{}`: {}\n", s.dir.display(), s.reason));
        }
    }
    crate::features::store::atomic_write(&run.join("report.md"), md.as_bytes())?;
    Ok(terminal_table(&rows))
}

/// Training runs where extraction runs: `[extract] device`.
fn training_device(config: &Config) -> Result<Device> {
    config.extract.device.open_logged("train")
}

/// Probabilities of a head on new feature rows, batched.
pub fn head_probabilities(head: &Head, features: &Tensor) -> Result<Vec<Vec<f32>>> {
    let logits = head.logits(features)?;
    crate::training::fit::probabilities(&logits)
}
