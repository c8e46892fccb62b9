//! `predict`: labels new images with a trained backbone + head and writes a CSV in the format
//! of the training labels (image column, label column with the training labels' values), plus
//! one probability column per class.
//!
//! Everything about the model comes from the run directory (its resolved config, the cache key
//! the head was trained on, the head's weights); only the input and output come from the
//! current config. The weights file is checked against the SHA-256 recorded at training time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use crate::backbone::{BackboneOptions, Vgg16Features};
use crate::config::{Config, OnBadImage};
use crate::dataset::{Dataset, InputLimits};
use crate::device::{describe, DeviceChoice};
use crate::error::{Error, IoContext, Result};
use crate::head::Head;
use crate::progress::Progress;
use crate::runs::{latest_finished, read_config, read_status, RunStatus};
use crate::store::{atomic_write, CacheKey};
use crate::study::{head_probabilities, read_metrics};
use crate::weights::{Weights, WeightsSource};

/// What a prediction run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub images: usize,
    pub skipped: usize,
    pub seconds: f64,
    pub output: PathBuf,
    pub run: PathBuf,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "predict: {} images labelled in {:.1} s ({:.2} images/s) with {} -> {}",
            self.images,
            self.seconds,
            self.images as f64 / self.seconds.max(1e-9),
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

/// Runs prediction as configured.
pub fn run(config: &Config) -> Result<Summary> {
    let start = Instant::now();
    let run = choose_run(config)?;
    let trained = read_config(&run)?;
    let key: CacheKey = read_json(&run.join("cache_key.json"))?;
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
    crate::fetch::ensure_source(&config.data, [input.as_path()])?;
    let dataset = Dataset::load_unlabelled(
        input,
        config.data.images.as_deref(),
        &config.data.image_column,
    )?
    .with_limits(InputLimits::from_config(&config.data));

    let device = DeviceChoice::parse(&config.extract.device)?.open_logged("predict")?;
    // The head was trained on features of the run's arithmetic; the rest (CPU algorithm, GPU
    // memory bound) is this machine's business.
    let options = BackboneOptions {
        compute: trained.extract.compute,
        ..BackboneOptions::from_config(&config.extract)
    };
    let backbone = Vgg16Features::load(&weights, &device, &options)?;
    let head = Head::load(&run.join("head.safetensors"), &device)?;
    let prep = &key.preprocessing;
    eprintln!(
        "predict: {} images with {} on {}",
        dataset.samples.len(),
        run.display(),
        describe(&device)
    );
    let mut progress = Progress::new("predict", "images", dataset.samples.len() as u64);
    let mut rows: Vec<(String, Vec<f32>)> = Vec::with_capacity(dataset.samples.len());
    let mut skipped = 0;
    for batch in dataset.samples.chunks(config.extract.batch_size) {
        let paths: Vec<&Path> = batch.iter().map(|s| s.path.as_path()).collect();
        let mut pixels = Vec::new();
        let mut ids = Vec::new();
        for (sample, decoded) in batch
            .iter()
            .zip(prep.load_many_within(&paths, &dataset.limits))
        {
            match decoded {
                Ok(p) => {
                    pixels.extend(p);
                    ids.push(sample.id.clone());
                }
                Err(e) if config.data.on_bad_image == OnBadImage::Error => {
                    return Err(crate::extract::with_line(e, sample.line))
                }
                Err(e) => {
                    eprintln!("predict: skipping {}: {e}", sample.id);
                    skipped += 1;
                }
            }
        }
        if !ids.is_empty() {
            let s = prep.input_size as usize;
            let x = Tensor::from_vec(pixels, (ids.len(), 3, s, s), &device)?;
            let features = backbone.forward(&x)?;
            let probs = head_probabilities(&head, &features)?;
            rows.extend(ids.into_iter().zip(probs));
        }
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    let trained_data = &trained.data;
    let image_column = &config.data.image_column;
    let csv = to_csv(
        image_column,
        &trained_data.label_column,
        &metrics.classes,
        &rows,
    );
    atomic_write(&output, csv.as_bytes())?;
    Ok(Summary {
        images: rows.len(),
        skipped,
        seconds: start.elapsed().as_secs_f64(),
        output,
        run,
    })
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

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).at(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })
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
