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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use crate::config::{Config, OnBadImage};
use crate::data::dataset::{content_hashes_within, Dataset, InputLimits};
use crate::device::{describe, DeviceChoice};
use crate::error::{Error, IoContext, Result};
use crate::features::backbone::{load_layer, BackboneOptions};
use crate::features::extract::{compute_jobs, Computed, Engine, Job, Work};
use crate::features::store::rowmap::{self, view_id, KIND_PREDICT};
use crate::features::store::{
    atomic_write, shard, CacheKey, Layer, Row, RowMap, Store, FORMAT_VERSION,
};
use crate::features::weights::{Weights, WeightsSource};
use crate::models::finetune::Block5Head;
use crate::models::head::Head;
use crate::reporting::runs::{latest_finished, read_config, read_status, RunStatus};
use crate::training::study::{head_probabilities, read_metrics, BLOCK5_FILE};

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
    if let Some(run) = &config.predict.run {
        let invalid = |message: String| Error::InvalidValue {
            key: "predict.run".into(),
            message,
        };
        return match read_status(run) {
            Ok(RunStatus::Finished) => Ok(run.clone()),
            Ok(RunStatus::Running) => Err(invalid(format!(
                "{} is unfinished (its metrics.json says \"running\": still training, or crashed); \
                 name a finished run, or leave `predict.run` out for the latest finished one",
                run.display()
            ))),
            Err(e) => Err(invalid(format!(
                "{} is not a usable run: {e}",
                run.display()
            ))),
        };
    }
    let latest = latest_finished(&config.output.runs, "head-", read_metrics);
    for note in latest.notes("predict") {
        eprintln!("{note}");
    }
    let skipped = latest.skipped.len();
    latest
        .run
        .map(|(dir, _)| dir)
        .ok_or_else(|| Error::InvalidValue {
            key: "predict.run".into(),
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
fn open_store(dir: &Path, config: &Config) -> Result<Option<Store>> {
    match Store::open_shared(dir, config.extract.lock_wait(), "predict") {
        Ok(Some(store)) => Ok(Some(store)),
        Ok(None) => {
            eprintln!(
                "predict: no feature store at {}: computing every image, without caching",
                dir.display()
            );
            Ok(None)
        }
        Err(e @ (Error::ForeignFolder { .. } | Error::Cache { .. })) => {
            eprintln!("predict: not using the feature store ({e}): computing every image, without caching");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Runs prediction as configured. Images already in the feature store (same content, same
/// backbone, weights, preprocessing and dtype as the head was trained on) are looked up, the
/// rest computed and added to the store.
pub fn run(config: &Config) -> Result<Summary> {
    let start = Instant::now();
    let run = choose_run(config)?;
    let trained = read_config(&run)?;
    let key_path = run.join("cache_key.json");
    let key = CacheKey::from_run_json(&std::fs::read(&key_path).at(&key_path)?, &key_path)?;
    let metrics = read_metrics(&run)?;
    let weights = Weights::open(WeightsSource::parse(&trained.backbone.weights).resolve()?)?;
    if weights.sha256 != key.weights_sha256 {
        return Err(Error::WeightsSource {
            source_name: trained.backbone.weights.clone(),
            message: format!(
                "sha256 {} differs from the {} the head in {} was trained on",
                weights.sha256,
                key.weights_sha256,
                run.display()
            ),
        });
    }
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
                eprintln!("predict: skipping {}: {e}", s.id);
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

    let device = DeviceChoice::parse(&config.extract.device)?.open_logged("predict")?;
    let store = open_store(&trained.extract.out, config)?;
    let mut index = match &store {
        Some(s) => {
            s.ensure_space(&key)?;
            s.index(&key, "predict")?
        }
        None => crate::features::extract::empty_index(&key),
    };
    let batch_size = config.extract.batch_size;
    let hashes: Vec<Option<String>> = rows.iter().map(|r| r.hash.clone()).collect();
    let work = Work::new(&hashes, batch_size);
    let (hits, misses): (Vec<_>, Vec<_>) = work.unique.iter().partition(|(h, _)| index.contains(h));
    let mut features: HashMap<String, Vec<f32>> = HashMap::new();
    let hit_hashes: Vec<&str> = hits.iter().map(|(h, _)| h.as_str()).collect();
    let values = index.gather(&hit_hashes)?;
    for (h, v) in hit_hashes.iter().zip(values.chunks_exact(key.dim.max(1))) {
        features.insert(h.to_string(), v.to_vec());
    }
    eprintln!(
        "predict: {} images ({} distinct) with {} on {}: {} from the store, {} to compute",
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
        let backbone = load_layer(&key.backbone, key.layer, &weights, &device, &options)?;
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
            key: &key,
            on_bad_image: config.data.on_bad_image,
            program: "predict",
        };
        let mut caching = store.is_some();
        let mut written = Vec::new();
        let outcome = compute_jobs(&engine, samples, &jobs, |c: Computed| {
            let values = shard::to_f32(&c.data, &key.dtype);
            for (h, v) in c.hashes.iter().zip(values.chunks_exact(key.dim.max(1))) {
                features.insert(h.clone(), v.to_vec());
            }
            if let (Some(s), true) = (&store, caching) {
                match s.write_shard(&key, c.hashes, &c.data) {
                    Ok(w) => written.push(w),
                    Err(e) => {
                        eprintln!("predict: cannot add to the feature store ({e}): continuing without caching");
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
        let source = input.display().to_string();
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
            weights: trained.backbone.weights.clone(),
            classes: Vec::new(),
            batch_size,
            fingerprint: rowmap::fingerprint(&[], &rows),
            complete: true,
            counts: rowmap::count(&map_rows),
            rows: map_rows,
            written_by: format!("pipeline {}", env!("CARGO_PKG_VERSION")),
        };
        if map
            .rows
            .iter()
            .all(|r| r.skipped.is_some() || r.hash.as_ref().is_some_and(|h| index.contains(h)))
        {
            s.write_row_map(&view_id(KIND_PREDICT, &source, &key.id()), &map)?;
        }
    }
    eprintln!(
        "predict: {} from the store, {} computed",
        hits.len(),
        computed
    );
    drop(store);

    let model = TrainedModel::load(&run, &key, &device)?;
    let mut labelled: Vec<(String, Vec<f32>)> = Vec::with_capacity(samples.len());
    let mut skipped = 0;
    let usable: Vec<(&Row, &Vec<f32>)> = rows
        .iter()
        .filter_map(|r| {
            let f = r.hash.as_ref().and_then(|h| features.get(h));
            if f.is_none() {
                skipped += 1;
            }
            Some((r, f?))
        })
        .collect();
    for chunk in usable.chunks(batch_size.max(1)) {
        let flat: Vec<f32> = chunk.iter().flat_map(|(_, f)| f.iter().copied()).collect();
        let x = Tensor::from_vec(flat, (chunk.len(), key.dim), &device)?;
        let probs = model.probabilities(&x)?;
        labelled.extend(chunk.iter().map(|(r, _)| r.id.clone()).zip(probs));
    }
    let trained_data = &trained.data;
    let image_column = &config.data.image_column;
    let csv = to_csv(
        image_column,
        &trained_data.label_column,
        &metrics.classes,
        &labelled,
    );
    atomic_write(&output, csv.as_bytes())?;
    Ok(Summary {
        images: labelled.len(),
        skipped,
        from_store: hits.len(),
        computed,
        seconds: start.elapsed().as_secs_f64(),
        output,
        run,
    })
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

/// The output CSV: image, predicted label (the class's own value), `prob_<class>` columns.
pub fn to_csv(
    image_column: &str,
    label_column: &str,
    classes: &[String],
    rows: &[(String, Vec<f32>)],
) -> String {
    let mut header = vec![quote(image_column), quote(label_column)];
    header.extend(classes.iter().map(|c| quote(&format!("prob_{c}"))));
    let mut out = header.join(",") + "\n";
    for (id, probs) in rows {
        let best = probs
            .iter()
            .enumerate()
            .fold(0, |b, (i, p)| if *p > probs[b] { i } else { b });
        let mut cells = vec![
            quote(id),
            quote(classes.get(best).map_or("", String::as_str)),
        ];
        cells.extend(probs.iter().map(|p| format!("{p:.6}")));
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// A CSV cell, quoted when it needs to be.
fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        );
        assert_eq!(
            csv,
            "image_names,emergency_or_not,prob_0,prob_1\n\
             a.jpg,0,0.900000,0.100000\n\
             \"b,c.jpg\",1,0.200000,0.800000\n"
        );
    }
}
