//! `extract`: dataset -> decoded batches -> frozen backbone -> feature cache.
//!
//! Decoding runs on a producer thread (images decoded in parallel with rayon) one batch ahead
//! of the network, so the network never waits on JPEG decoding. Shards already on disk and made
//! from the same inputs are kept, so an interrupted run resumes where it stopped.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::backbone::{BackboneOptions, Vgg16Features};
use crate::config::{Config, OnBadImage};
use crate::dataset::{hex, Dataset};
use crate::device::{describe, DeviceChoice};
use crate::error::{Error, Result};
use crate::preprocess::{Partial, Preprocessing};
use crate::progress::Progress;
use crate::store::{CacheKey, FeatureStore, Manifest, Shard, Skipped, FORMAT_VERSION};
use crate::weights::{Weights, WeightsSource};

/// Everything resolved before any pixel goes through the network.
pub struct Plan {
    pub dataset: Dataset,
    /// Content hash of every sample's file; `None` where it could not be read (skip mode).
    pub hashes: Vec<Option<String>>,
    pub weights: Weights,
    pub preprocessing: Preprocessing,
    pub key: CacheKey,
}

impl Plan {
    /// Loads the dataset, hashes its files, opens the weights and works out the preprocessing
    /// and the cache key. With `on_bad_image = "error"`, a missing image fails here, before any
    /// work is done.
    pub fn new(config: &Config) -> Result<Self> {
        let dataset = Dataset::load(&config.data)?;
        let source = WeightsSource::parse(&config.backbone.weights);
        let weights = Weights::open(source.resolve()?)?;
        let preprocessing = Partial::from_config(&config.preprocess)
            .or(Partial::from_metadata(&weights.metadata, &weights.path)?)
            .or(source.known_preprocessing())
            .complete(config.preprocess.resize, &config.backbone.weights)?;
        let hashes = hash_samples(&dataset, config.data.on_bad_image)?;
        let mut digest = Sha256::new();
        for (s, h) in dataset.samples.iter().zip(&hashes) {
            let h = h.as_deref().unwrap_or("unreadable");
            let label = s.label.map(|l| l as i64).unwrap_or(-1);
            digest.update(format!("{}\t{label}\t{h}\n", s.id));
        }
        let key = CacheKey {
            format: FORMAT_VERSION,
            dataset_fingerprint: hex(&digest.finalize()),
            dataset_source: dataset.source.display().to_string(),
            classes: dataset.classes.clone(),
            rows: dataset.samples.len(),
            backbone: format!("{:?}", config.backbone.name).to_lowercase(),
            weights: config.backbone.weights.clone(),
            weights_sha256: weights.sha256.clone(),
            preprocessing: preprocessing.clone(),
            dtype: format!("{:?}", config.extract.dtype).to_lowercase(),
            compute: config.extract.compute.name().into(),
            shard_rows: config.extract.batch_size,
        };
        Ok(Self {
            dataset,
            hashes,
            weights,
            preprocessing,
            key,
        })
    }
}

/// Content hashes of the dataset's files. With `on_bad_image = "error"` an unreadable file is an
/// error naming it and its line; otherwise its hash is `None`.
pub fn hash_samples(dataset: &Dataset, on_bad_image: OnBadImage) -> Result<Vec<Option<String>>> {
    dataset
        .samples
        .iter()
        .zip(dataset.content_hashes())
        .map(|(s, h)| match h {
            Ok(h) => Ok(Some(h)),
            Err(e) if on_bad_image == OnBadImage::Error => Err(with_line(e, s.line)),
            Err(_) => Ok(None),
        })
        .collect()
}

/// What a run did, for the closing summary line.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Rows in the cache.
    pub images: usize,
    /// Images run through the network by this run (0 when the cache was reused).
    pub computed: usize,
    pub seconds: f64,
    pub device: String,
    pub dir: PathBuf,
    pub skipped: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.computed as f64 / self.seconds.max(1e-9);
        write!(
            f,
            "extract: {} images ({} computed now) in {:.1} s, {:.2} images/s, device {}, cache {}",
            self.images,
            self.computed,
            self.seconds,
            rate,
            self.device,
            self.dir.display()
        )?;
        if self.skipped > 0 {
            write!(
                f,
                ", {} bad images skipped (listed in manifest.json)",
                self.skipped
            )?;
        }
        Ok(())
    }
}

/// Runs extraction as configured, reusing or resuming the cache where it can.
pub fn run(config: &Config) -> Result<Summary> {
    let start = Instant::now();
    let plan = Plan::new(config)?;
    let store = FeatureStore::new(&config.extract.out);
    let key = &plan.key;
    let dim = Vgg16Features::feature_dim(plan.preprocessing.input_size);
    let mut todo: Vec<usize> = (0..key.shard_count()).collect();
    match store.manifest() {
        Ok(Some(m)) if m.key == *key => {
            todo.retain(|&i| store.read_shard(i, key).is_err());
            if m.complete && todo.is_empty() {
                eprintln!(
                    "extract: cache {} is up to date ({} images, same dataset, weights and preprocessing): reusing it",
                    store.dir.display(),
                    m.count
                );
                return Ok(Summary {
                    images: m.count,
                    computed: 0,
                    seconds: start.elapsed().as_secs_f64(),
                    device: "none".into(),
                    dir: store.dir.clone(),
                    skipped: m.skipped.len(),
                });
            }
            eprintln!(
                "extract: resuming {}: {} of {} shards already done",
                store.dir.display(),
                key.shard_count() - todo.len(),
                key.shard_count()
            );
        }
        Ok(Some(m)) => {
            eprintln!(
                "extract: cache {} was made from other inputs ({} changed): rebuilding it",
                store.dir.display(),
                m.key.differences(key).join(", ")
            );
            store.clear()?;
        }
        Ok(None) => store.clear()?,
        Err(e) => {
            eprintln!("extract: {e}: rebuilding it");
            store.clear()?;
        }
    }
    store.remove_temporaries()?;
    let mut manifest = Manifest {
        key: key.clone(),
        complete: false,
        dim,
        count: 0,
        skipped: Vec::new(),
        written_by: format!("pipeline {}", env!("CARGO_PKG_VERSION")),
    };
    store.write_manifest(&manifest)?;

    let device = DeviceChoice::parse(&config.extract.device)?.open_logged("extract")?;
    let device_name = describe(&device);
    eprintln!(
        "extract: {} images in {} shards to compute on {device_name}",
        todo.iter().map(|&i| shard_len(key, i)).sum::<usize>(),
        todo.len(),
    );
    let model = load_backbone(&plan.weights, &device, config)?;
    let dtype = config.extract.dtype.to_candle();
    let computed = compute_shards(&plan, &store, &todo, config, &model, &device, dtype)?;

    // Gather the final counts from the shards themselves, the single source of truth.
    let mut count = 0;
    for i in 0..key.shard_count() {
        let s = store.read_shard(i, key)?;
        count += s.ids.len();
        manifest.skipped.extend(s.skipped);
    }
    if count == 0 {
        return Err(Error::EmptyDataset(plan.dataset.source.clone()));
    }
    manifest.count = count;
    manifest.complete = true;
    store.write_manifest(&manifest)?;
    Ok(Summary {
        images: count,
        computed,
        seconds: start.elapsed().as_secs_f64(),
        device: device_name,
        dir: store.dir.clone(),
        skipped: manifest.skipped.len(),
    })
}

fn shard_len(key: &CacheKey, index: usize) -> usize {
    key.shard_rows.min(key.rows - index * key.shard_rows)
}

/// The backbone as `[extract]` configures it, on `device`.
pub fn load_backbone(weights: &Weights, device: &Device, config: &Config) -> Result<Vgg16Features> {
    Vgg16Features::load(
        weights,
        device,
        &BackboneOptions::from_config(&config.extract),
    )
}

/// One decoded batch: (shard index, per row: dataset row and decoded pixels or error).
type Decoded = (usize, Vec<(usize, Result<Vec<f32>>)>);

/// Computes and writes the shards in `todo`; returns how many images went through the network.
#[allow(clippy::too_many_arguments)]
fn compute_shards(
    plan: &Plan,
    store: &FeatureStore,
    todo: &[usize],
    config: &Config,
    model: &Vgg16Features,
    device: &Device,
    store_dtype: DType,
) -> Result<usize> {
    let key = &plan.key;
    let prep = &plan.preprocessing;
    let samples = &plan.dataset.samples;
    let total: usize = todo.iter().map(|&i| shard_len(key, i)).sum();
    let mut progress = Progress::new("extract", "images", total as u64);
    let mut computed = 0;
    std::thread::scope(|scope| -> Result<()> {
        // One batch in flight ahead of the network: enough to hide decoding, bounded memory.
        let (tx, rx) = mpsc::sync_channel::<Decoded>(1);
        scope.spawn(move || {
            for &shard in todo {
                let start = shard * key.shard_rows;
                let rows: Vec<usize> = (start..start + shard_len(key, shard)).collect();
                let paths: Vec<&std::path::Path> =
                    rows.iter().map(|&r| samples[r].path.as_path()).collect();
                let decoded = rows
                    .into_iter()
                    .zip(prep.load_many_within(&paths, &plan.dataset.limits))
                    .collect();
                if tx.send((shard, decoded)).is_err() {
                    return; // the consumer stopped on an error
                }
            }
        });
        for (index, decoded) in rx {
            let mut pixels = Vec::new();
            let mut shard = Shard {
                features: Tensor::zeros((0, 0), store_dtype, &Device::Cpu)?,
                labels: Vec::new(),
                rows: Vec::new(),
                ids: Vec::new(),
                skipped: Vec::new(),
            };
            for (row, result) in decoded {
                let sample = &samples[row];
                match result {
                    Ok(p) => {
                        pixels.extend(p);
                        shard.rows.push(row as i64);
                        shard
                            .labels
                            .push(sample.label.map(|l| l as i64).unwrap_or(-1));
                        shard.ids.push(sample.id.clone());
                    }
                    Err(e) if config.data.on_bad_image == OnBadImage::Error => {
                        return Err(with_line(e, sample.line))
                    }
                    Err(e) => {
                        eprintln!("extract: skipping {}: {e}", sample.id);
                        shard.skipped.push(Skipped {
                            id: sample.id.clone(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            let n = shard.ids.len();
            let dim = Vgg16Features::feature_dim(prep.input_size);
            shard.features = if n == 0 {
                Tensor::zeros((0, dim), store_dtype, &Device::Cpu)?
            } else {
                let s = prep.input_size as usize;
                let x = Tensor::from_vec(pixels, (n, 3, s, s), device)?;
                model
                    .forward(&x)?
                    .to_dtype(store_dtype)?
                    .to_device(&Device::Cpu)?
            };
            store.write_shard(index, key, &shard)?;
            computed += n;
            progress.inc((n + shard.skipped.len()) as u64);
        }
        Ok(())
    })?;
    progress.finish();
    Ok(computed)
}

/// Adds the label-file line to an image error, so the user can find the row.
pub(crate) fn with_line(e: Error, line: usize) -> Error {
    match e {
        Error::BadImage { path, message } if line > 0 => Error::BadImage {
            path,
            message: format!("{message} (line {line} of the label file)"),
        },
        e => e,
    }
}
