//! `predict`: labels new images with a trained backbone + head and writes a CSV in the format
//! of the training labels (image column, label column with the training labels' values), plus
//! one probability column per class.
//!
//! Everything about the model comes from the run directory (its resolved config, the feature
//! space the head was trained on, the head's weights); only the input and output come from the
//! current config. The weights file is checked against the SHA-256 recorded at training time.
//!
//! Features come from the feature store the run's config names (`[extract] out`) when it holds
//! them (same image bytes, same space); the others are computed and added to it as shards,
//! with a `predict` row map so that `extract --gc` keeps them.
//!
//! The input is a CSV of image names or a folder (every image under it, sub-folders included,
//! known by its path below the folder); a folder needs no `[data]` section at all.
//!
//! `evaluate` labels its images the same way: [`TrainedRun`] (the run, checked) and [`score`]
//! (store lookups, backbone, head) are shared, as is the predictions table
//! ([`predictions_table`], a polars DataFrame written with polars' CSV writer).
//!
//! Test-time augmentation: a run trained with `[extract] views` predicts each image by the
//! mean of its class probabilities over those views (`[predict] tta`, default true; false
//! scores the original view only). A run without views predicts exactly as before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use polars::prelude::{Column, DataFrame};

use crate::config::{Config, OnBadImage};
use crate::data::dataset::{content_hashes_within, Dataset, InputLimits};
use crate::device::describe;
use crate::error::{Error, IoContext, Result};
use crate::features::backbone::{load_layer, BackboneOptions};
use crate::features::extract::{compute_jobs, Computed, Engine, Job, Work};
use crate::features::store::rowmap::{self, view_id, KIND_PREDICT};
use crate::features::store::{
    atomic_write, shard, CacheKey, Layer, Row, RowMap, Store, FORMAT_VERSION,
};
use crate::features::views::{self, mean_over_views, View};
use crate::features::weights::Weights;
use crate::models::finetune::Block5Head;
use crate::models::head::Head;
use crate::reporting::runs::{latest_finished, read_config, read_status, RunStatus};
use crate::training::metrics::argmax_rows;
use crate::training::study::{head_probabilities, read_metrics, RunMetrics, BLOCK5_FILE};

/// What a prediction run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub images: usize,
    pub skipped: usize,
    /// Distinct images whose features came from the feature store.
    pub from_store: usize,
    /// Distinct images run through the backbone.
    pub computed: usize,
    pub seconds: f64,
    pub output: PathBuf,
    pub run: PathBuf,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "predict: {} images labelled in {:.1} s ({:.2} images/s; {} from the store, {} computed) with {} -> {}",
            self.images,
            self.seconds,
            self.images as f64 / self.seconds.max(1e-9),
            self.from_store,
            self.computed,
            self.run.display(),
            self.output.display()
        )?;
        if self.skipped > 0 {
            write!(f, " ({} unreadable images skipped)", self.skipped)?;
        }
        Ok(())
    }
}

/// The head run to use: `[predict] run` (which must be finished), or the most recent finished
/// head run, passing over (and saying so) newer runs that are unfinished or unreadable.
pub fn choose_run(config: &Config) -> Result<PathBuf> {
    choose_run_as(
        config,
        config.predict.run.as_deref(),
        "predict.run",
        "predict",
    )
}

/// [`choose_run`] for `program`, whose config key `key` names the run (`chosen`) or is unset.
pub(crate) fn choose_run_as(
    config: &Config,
    chosen: Option<&Path>,
    key: &str,
    program: &str,
) -> Result<PathBuf> {
    if let Some(run) = chosen {
        let invalid = |message: String| Error::InvalidValue {
            key: key.into(),
            message,
        };
        return match read_status(run) {
            Ok(RunStatus::Finished) => Ok(run.to_path_buf()),
            Ok(RunStatus::Running) => Err(invalid(format!(
                "{} is unfinished (its metrics.json says \"running\": still training, or crashed); \
                 name a finished run, or leave `{key}` out for the latest finished one",
                run.display()
            ))),
            Err(e) => Err(invalid(format!(
                "{} is not a usable run: {e}",
                run.display()
            ))),
        };
    }
    let latest = latest_finished(&config.output.runs, "head-", read_metrics);
    for note in latest.notes(program) {
        eprintln!("{note}");
    }
    let skipped = latest.skipped.len();
    latest
        .run
        .map(|(dir, _)| dir)
        .ok_or_else(|| Error::InvalidValue {
            key: key.into(),
            message: format!(
                "no finished head run under {}{}: run `cargo run -p train-head` first",
                config.output.runs.display(),
                match skipped {
                    0 => String::new(),
                    n => format!(" ({n} unfinished or unreadable passed over)"),
                }
            ),
        })
}

/// The feature store of the run's config, when it is one: absent or not a store means
/// computing without caching (said once); a store that is busy or broken is an error.
fn open_store(dir: &Path, config: &Config, program: &str) -> Result<Option<Store>> {
    match Store::open_shared(dir, config.extract.lock_wait(), program) {
        Ok(Some(store)) => Ok(Some(store)),
        Ok(None) => {
            eprintln!(
                "{program}: no feature store at {}: computing every image, without caching",
                dir.display()
            );
            Ok(None)
        }
        Err(e @ (Error::ForeignFolder { .. } | Error::Cache { .. })) => {
            eprintln!("{program}: not using the feature store ({e}): computing every image, without caching");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A finished head run, opened for labelling images: everything about the model comes from
/// here (its resolved config, feature space, classes and weights).
pub(crate) struct TrainedRun {
    pub dir: PathBuf,
    /// The run's resolved config (its `[data]`, `[backbone]`, `[extract]` at training time).
    pub config: Config,
    /// The feature space the head was trained on.
    pub key: CacheKey,
    /// Its `metrics.json` (the classes, in the head's output order).
    pub metrics: RunMetrics,
    /// The backbone weights, checked against the SHA-256 the head was trained on.
    pub weights: Weights,
}

impl TrainedRun {
    /// Reads the run in `run` and opens its backbone weights, refusing weights whose SHA-256
    /// differs from the one the head was trained on.
    pub(crate) fn open(run: PathBuf) -> Result<Self> {
        let trained = read_config(&run)?;
        let key_path = run.join("cache_key.json");
        let key = CacheKey::from_run_json(&std::fs::read(&key_path).at(&key_path)?, &key_path)?;
        let metrics = read_metrics(&run)?;
        let weights = Weights::open(trained.backbone.weights.resolve()?)?;
        if weights.sha256 != key.weights_sha256 {
            return Err(Error::WeightsSource {
                source_name: trained.backbone.weights.to_string(),
                message: format!(
                    "sha256 {} differs from the {} the head in {} was trained on",
                    weights.sha256,
                    key.weights_sha256,
                    run.display()
                ),
            });
        }
        Ok(Self {
            dir: run,
            config: trained,
            key,
            metrics,
            weights,
        })
    }
}

/// Runs prediction as configured. Images already in the feature store (same content, same
/// backbone, weights, preprocessing and dtype as the head was trained on) are looked up, the
/// rest computed and added to the store.
pub fn run(config: &Config) -> Result<Summary> {
    let start = Instant::now();
    let trained_run = TrainedRun::open(choose_run(config)?)?;
    let input = config
        .predict
        .input
        .as_ref()
        .ok_or_else(|| Error::InvalidValue {
            key: "predict.input".into(),
            message: "set it to a CSV of image names or a folder of images".into(),
        })?;
    let output = config
        .predict
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("predictions.csv"));
    crate::data::fetch::ensure_source(&config.data, [input.as_path()])?;
    let dataset = Dataset::load_unlabelled(
        input,
        config.data.images.as_deref(),
        &config.data.image_column,
    )?
    .with_limits(InputLimits::from_config(&config.data));
    let scored = score(config, &trained_run, &dataset, "predict")?;
    let labelled: Vec<(String, Vec<f32>)> = dataset
        .samples
        .iter()
        .zip(scored.probabilities)
        .filter_map(|(s, p)| Some((s.id.clone(), p?)))
        .collect();
    let table = predictions_table(
        &config.data.image_column,
        &trained_run.config.data.label_column,
        &trained_run.metrics.classes,
        &labelled,
    )?;
    write_csv(table, &output)?;
    Ok(Summary {
        images: labelled.len(),
        skipped: scored.skipped,
        from_store: scored.from_store,
        computed: scored.computed,
        seconds: start.elapsed().as_secs_f64(),
        output,
        run: trained_run.dir,
    })
}

/// Class probabilities of a dataset's images under a trained run.
pub(crate) struct Scored {
    /// Per sample, in dataset order: the head's probabilities (in the run's class order), or
    /// `None` for an image that could not be read or decoded (`on_bad_image = "skip"`).
    pub probabilities: Vec<Option<Vec<f32>>>,
    /// Samples without probabilities.
    pub skipped: usize,
    /// Distinct images whose features came from the feature store.
    pub from_store: usize,
    /// Distinct images run through the backbone.
    pub computed: usize,
}

/// Labels every image of `dataset` with the run's backbone + head on behalf of `program`
/// (for messages and the store's lock). Features the run's feature store holds are looked up;
/// the rest are computed and added to it, under a row map of kind `predict` named by the
/// dataset's source, so `extract --gc` keeps them.
pub(crate) fn score(
    config: &Config,
    trained_run: &TrainedRun,
    dataset: &Dataset,
    program: &str,
) -> Result<Scored> {
    let TrainedRun {
        dir: run,
        config: trained,
        key,
        weights,
        ..
    } = trained_run;
    let samples = &dataset.samples;
    let mut rows: Vec<Row> = Vec::with_capacity(samples.len());
    for (s, h) in samples
        .iter()
        .zip(content_hashes_within(samples, &dataset.limits))
    {
        let (hash, skipped) = match h {
            Ok(h) => (Some(h), None),
            Err(e) if config.data.on_bad_image == OnBadImage::Error => {
                return Err(crate::features::extract::with_line(e, s.line))
            }
            Err(e) => {
                eprintln!("{program}: skipping {}: {e}", s.id);
                (None, Some(e.to_string()))
            }
        };
        rows.push(Row {
            id: s.id.clone(),
            label: None,
            hash,
            skipped,
        });
    }

    let device = config.extract.device.open_logged(program)?;
    let store = open_store(&trained.extract.out, config, program)?;
    let mut index = match &store {
        Some(s) => {
            s.ensure_space(key)?;
            s.index(key, program)?
        }
        None => crate::features::extract::empty_index(key),
    };
    let batch_size = config.extract.batch_size;
    let hashes: Vec<Option<String>> = rows.iter().map(|r| r.hash.clone()).collect();
    // The views the run was trained with (its resolved config), or the original alone.
    let views = if config.predict.tta {
        trained.extract.views()?
    } else {
        vec![View::Original]
    };
    if views.len() > 1 {
        eprintln!(
            "{program}: test-time augmentation: mean of the class probabilities over the run's views {:?}",
            views::names(&views)
        );
    }
    let work = Work::with_views(&hashes, &views, batch_size);
    let (hits, misses): (Vec<_>, Vec<_>) = work.unique.iter().partition(|(h, _)| index.contains(h));
    let mut features: HashMap<String, Vec<f32>> = HashMap::new();
    let hit_hashes: Vec<&str> = hits.iter().map(|(h, _)| h.as_str()).collect();
    let values = index.gather(&hit_hashes)?;
    for (h, v) in hit_hashes.iter().zip(values.chunks_exact(key.dim.max(1))) {
        features.insert(h.to_string(), v.to_vec());
    }
    eprintln!(
        "{program}: {} images ({} distinct) with {} on {}: {} from the store, {} to compute",
        samples.len(),
        work.unique.len(),
        run.display(),
        describe(&device),
        hits.len(),
        misses.len()
    );
    let mut bad: HashMap<String, String> = HashMap::new();
    let mut computed = 0;
    if !misses.is_empty() {
        // The head was trained on features of the run's arithmetic; the rest (CPU algorithm,
        // GPU memory bound) is this machine's business.
        let options = BackboneOptions {
            compute: trained.extract.compute,
            ..BackboneOptions::from_config(&config.extract)
        };
        let backbone = load_layer(&key.backbone, key.layer, weights, &device, &options)?;
        let jobs: Vec<Job> = misses
            .chunks(batch_size.max(1))
            .map(|items| Job {
                items: items.iter().map(|&(h, r)| (h.clone(), *r)).collect(),
            })
            .collect();
        let engine = Engine {
            model: backbone.as_ref(),
            device: &device,
            prep: &key.preprocessing,
            limits: &dataset.limits,
            key,
            on_bad_image: config.data.on_bad_image,
            program,
            views: &views,
        };
        let mut caching = store.is_some();
        let mut written = Vec::new();
        let outcome = compute_jobs(&engine, samples, &jobs, |c: Computed| {
            let values = shard::to_f32(&c.data, &key.dtype);
            for (h, v) in c.hashes.iter().zip(values.chunks_exact(key.dim.max(1))) {
                features.insert(h.clone(), v.to_vec());
            }
            if let (Some(s), true) = (&store, caching) {
                match s.write_shard(key, c.hashes, &c.data) {
                    Ok(w) => written.push(w),
                    Err(e) => {
                        eprintln!("{program}: cannot add to the feature store ({e}): continuing without caching");
                        caching = false;
                    }
                }
            }
            Ok(())
        })?;
        computed = outcome.computed;
        bad.extend(outcome.skipped);
        for (path, header) in written {
            index.add(path, header);
        }
    }
    if let Some(s) = &store {
        let source = dataset.source.display().to_string();
        let map_rows: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                skipped: r
                    .skipped
                    .clone()
                    .or_else(|| r.hash.as_ref().and_then(|h| bad.get(h).cloned())),
                ..r.clone()
            })
            .collect();
        let map = RowMap {
            format: FORMAT_VERSION,
            kind: KIND_PREDICT.into(),
            source: source.clone(),
            space: key.id(),
            weights: trained.backbone.weights.to_string(),
            classes: Vec::new(),
            batch_size,
            fingerprint: rowmap::fingerprint(&[], &rows),
            views: views::names(&views),
            complete: true,
            counts: rowmap::count(&map_rows),
            rows: map_rows,
            written_by: format!("pipeline {}", env!("CARGO_PKG_VERSION")),
        };
        if map.rows.iter().all(|r| {
            r.skipped.is_some()
                || r.hash
                    .as_ref()
                    .is_some_and(|h| views.iter().all(|v| index.contains(&v.row_key(h))))
        }) {
            s.write_row_map(&view_id(KIND_PREDICT, &source, &key.id()), &map)?;
        }
    }
    eprintln!(
        "{program}: {} from the store, {} computed",
        hits.len(),
        computed
    );
    drop(store);

    let model = TrainedModel::load(run, key, &device)?;
    let mut probabilities: Vec<Option<Vec<f32>>> = vec![None; samples.len()];
    let mut skipped = 0;
    // An image is labelled when its features exist under every view.
    let usable: Vec<(usize, Vec<&Vec<f32>>)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let f: Option<Vec<&Vec<f32>>> = r
                .hash
                .as_ref()
                .and_then(|h| views.iter().map(|v| features.get(&v.row_key(h))).collect());
            if f.is_none() {
                skipped += 1;
            }
            Some((i, f?))
        })
        .collect();
    for chunk in usable.chunks(batch_size.max(1)) {
        let per_view: Vec<Vec<&[f32]>> = (0..views.len())
            .map(|v| chunk.iter().map(|(_, f)| f[v].as_slice()).collect())
            .collect();
        let probs = view_mean_probabilities(&model, &per_view, key.dim, &device)?;
        for ((i, _), p) in chunk.iter().zip(probs) {
            probabilities[*i] = Some(p);
        }
    }
    Ok(Scored {
        probabilities,
        skipped,
        from_store: hits.len(),
        computed,
    })
}

/// Each row's class probabilities averaged over views: `per_view[v][i]` is row `i`'s feature
/// vector (length `dim`) under view `v`. With one view, the model's probabilities unchanged.
pub(crate) fn view_mean_probabilities(
    model: &TrainedModel,
    per_view: &[Vec<&[f32]>],
    dim: usize,
    device: &candle_core::Device,
) -> Result<Vec<Vec<f32>>> {
    let probs = per_view
        .iter()
        .map(|rows| {
            let flat: Vec<f32> = rows.iter().flat_map(|f| f.iter().copied()).collect();
            let x = Tensor::from_vec(flat, (rows.len(), dim), device)?;
            model.probabilities(&x)
        })
        .collect::<Result<Vec<_>>>()?;
    mean_over_views(&probs)
}

/// What a head run trained: a head on stored features, or (a run on block-4 activations)
/// VGG16's fine-tuned block 5 with its head.
pub enum TrainedModel {
    Head(Head),
    Block5(Block5Head),
}

impl TrainedModel {
    /// The model of `run`, trained in space `key`: `block5.safetensors` for a pool4 space,
    /// else `head.safetensors`.
    pub fn load(run: &Path, key: &CacheKey, device: &candle_core::Device) -> Result<Self> {
        Ok(match key.layer {
            Layer::Pool4 => Self::Block5(Block5Head::load(&run.join(BLOCK5_FILE), device)?),
            Layer::Output => Self::Head(Head::load(&run.join("head.safetensors"), device)?),
        })
    }

    /// Softmax probabilities of stored rows of the run's space (`[n, key.dim]`).
    pub fn probabilities(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Head(head) => head_probabilities(head, x),
            Self::Block5(model) => crate::training::fit::probabilities(&model.logits(x)?),
        }
    }
}

/// The predicted class of each row of probabilities: the first largest value (NaN never wins),
/// as [`argmax_rows`] decides for the metrics, so a CSV's label and a confusion matrix agree.
pub(crate) fn predicted_classes(rows: &[(String, Vec<f32>)], classes: usize) -> Vec<usize> {
    rows.iter()
        .map(|(_, p)| argmax_rows(p, classes).first().copied().unwrap_or(0))
        .collect()
}

/// The predictions table: the image column, the predicted label (the class's own value, like
/// the training labels), one `prob_<class>` column per class. Column names must differ (a
/// table cannot hold two columns of one name); a clash is an error naming the column.
pub fn predictions_table(
    image_column: &str,
    label_column: &str,
    classes: &[String],
    rows: &[(String, Vec<f32>)],
) -> Result<DataFrame> {
    let columns = prediction_columns(image_column, label_column, classes, rows)?;
    table(rows.len(), columns, "predictions")
}

/// The columns of [`predictions_table`], for tables that add their own.
pub(crate) fn prediction_columns(
    image_column: &str,
    label_column: &str,
    classes: &[String],
    rows: &[(String, Vec<f32>)],
) -> Result<Vec<Column>> {
    if let Some((id, p)) = rows.iter().find(|(_, p)| p.len() != classes.len()) {
        return Err(Error::Table {
            table: "predictions".into(),
            message: format!(
                "{id}: {} probabilities for {} classes",
                p.len(),
                classes.len()
            ),
        });
    }
    let predicted = predicted_classes(rows, classes.len());
    let mut columns = vec![
        Column::new(
            image_column.into(),
            rows.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            label_column.into(),
            predicted
                .iter()
                .map(|&c| classes.get(c).map_or("", String::as_str))
                .collect::<Vec<_>>(),
        ),
    ];
    for (c, class) in classes.iter().enumerate() {
        columns.push(Column::new(
            format!("prob_{class}").into(),
            rows.iter().map(|(_, p)| p[c]).collect::<Vec<f32>>(),
        ));
    }
    Ok(columns)
}

/// A DataFrame of `columns`, each `height` long; a clash of column names is an error naming the
/// column and the table.
pub(crate) fn table(height: usize, columns: Vec<Column>, name: &str) -> Result<DataFrame> {
    let mut seen = std::collections::HashSet::new();
    if let Some(c) = columns.iter().find(|c| !seen.insert(c.name().to_string())) {
        return Err(Error::Table {
            table: name.into(),
            message: format!(
                "two columns are named `{}` (an image or label column of that name, or a \
                 class named so that its probability column clashes): rename one",
                c.name()
            ),
        });
    }
    DataFrame::new(height, columns).map_err(|e| Error::Table {
        table: name.into(),
        message: e.to_string(),
    })
}

/// A table as CSV text with polars' writer: a header, `,` between cells, `\n` after each row,
/// a cell quoted only when it holds `,`, `"` or a line break (an empty one as `""`), floats
/// with 6 decimals.
pub(crate) fn csv_bytes(mut table: DataFrame, path: &Path) -> Result<Vec<u8>> {
    use polars::prelude::{CsvWriter, SerWriter};
    let mut out = Vec::new();
    CsvWriter::new(&mut out)
        .include_header(true)
        .with_float_precision(Some(6))
        .finish(&mut table)
        .map_err(|e| Error::Csv {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    Ok(out)
}

/// Writes a table to `path` as CSV ([`csv_bytes`]), whole or not at all.
pub(crate) fn write_csv(table: DataFrame, path: &Path) -> Result<()> {
    atomic_write(path, &csv_bytes(table, path)?)
}

/// The predictions CSV as text: [`predictions_table`] written as [`csv_bytes`] writes it.
pub fn to_csv(
    image_column: &str,
    label_column: &str,
    classes: &[String],
    rows: &[(String, Vec<f32>)],
) -> Result<String> {
    let table = predictions_table(image_column, label_column, classes, rows)?;
    let bytes = csv_bytes(table, Path::new("predictions.csv"))?;
    // polars writes UTF-8 from UTF-8 columns.
    String::from_utf8(bytes).map_err(|e| Error::Table {
        table: "predictions".into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tta_averages_the_class_probabilities_over_views() {
        use crate::config::HeadKind;
        use crate::models::head::HeadShape;
        let device = candle_core::Device::Cpu;
        // logits (x, -x): P(class 0) = sigmoid(2x).
        let shape = HeadShape::new(HeadKind::Linear, 1, 2, 0.0);
        let head = Head::from_weights(&shape, &[1.0, -1.0], &[0.0, 0.0], &device).expect("ok");
        let model = TrainedModel::Head(head);
        let half_ln3 = 3f32.ln() / 2.0; // sigmoid(ln 3) = 3/4
        let (a0, a1, b0, b1) = ([0.0f32], [half_ln3], [-half_ln3], [-half_ln3]);
        let per_view = vec![vec![&a0[..], &b0[..]], vec![&a1[..], &b1[..]]];
        let probs = view_mean_probabilities(&model, &per_view, 1, &device).expect("ok");
        // Image a: (1/2 + 3/4) / 2 = 5/8; image b: (1/4 + 1/4) / 2 = 1/4.
        let want = [[0.625, 0.375], [0.25, 0.75]];
        for (p, w) in probs.iter().zip(want) {
            for (x, y) in p.iter().zip(w) {
                assert!((x - y).abs() < 1e-6, "{probs:?}");
            }
        }
        // One view: the head's own probabilities.
        let one = view_mean_probabilities(&model, &per_view[..1], 1, &device).expect("ok");
        assert!((one[0][0] - 0.5).abs() < 1e-6 && (one[1][0] - 0.25).abs() < 1e-6);
    }

    #[test]
    fn csv_has_the_training_label_format_and_probabilities() {
        let rows = vec![
            ("a.jpg".to_string(), vec![0.9, 0.1]),
            ("b,c.jpg".to_string(), vec![0.2, 0.8]),
        ];
        let csv = to_csv(
            "image_names",
            "emergency_or_not",
            &["0".into(), "1".into()],
            &rows,
        )
        .expect("csv");
        assert_eq!(
            csv,
            "image_names,emergency_or_not,prob_0,prob_1\n\
             a.jpg,0,0.900000,0.100000\n\
             \"b,c.jpg\",1,0.200000,0.800000\n"
        );
    }
}
