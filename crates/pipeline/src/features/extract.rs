//! `extract`: dataset -> content hashes -> work plan -> decoded batches -> frozen backbone ->
//! feature store.
//!
//! Planning: the dataset's distinct content hashes, in order of first appearance, are cut into
//! batches of `batch_size`; the hashes of a batch that the store lacks are computed together
//! and written as one shard. Appending rows or changing an image therefore computes only
//! those images, duplicates are computed once, removed rows cost nothing, and a rerun after a
//! kill computes only what is missing. With `--shard K/N` ([`run_with`], [`parts`]) a task
//! computes only the batches [`assigned`] to it, under the store's shared lock, and the last
//! part to finish writes the dataset's row map.
//!
//! The host pipeline keeps the network busy: a decoder thread decodes and resizes the next
//! batches (rayon across all cores, at most two batches ahead), the network runs on the
//! calling thread, and a writer thread serialises, fsyncs and renames the shards (fed by a
//! bounded channel), so the network never waits on JPEG decoding or on the disk. An error on
//! any side stops the run with that error; shards already renamed stay valid.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, DataConfig, OnBadImage, Unfreeze};
use crate::data::dataset::{content_hashes_within, Dataset, InputLimits, Sample};
use crate::data::preprocess::{Partial, Preprocessing};
use crate::device::describe;
use crate::error::{Error, Result};
use crate::features::backbone::{load_layer, spec, Backbone, BackboneOptions};
use crate::features::parts::{self, Assignment, Part, PartRecord, PartsFound, Skipped};
use crate::features::store::rowmap::{self, describe_changes, view_id, KIND_DATASET};
use crate::features::store::{
    CacheKey, FeatureSet, Folder, Index, Layer, Row, RowMap, Store, FORMAT_VERSION,
};
use crate::features::views::{self, View};
use crate::features::weights::Weights;
use crate::progress::Progress;

/// Everything resolved before any pixel goes through the network.
pub struct Plan {
    pub dataset: Dataset,
    /// Content hash of every sample's file; `None` where it could not be read (skip mode).
    pub hashes: Vec<Option<String>>,
    pub weights: Weights,
    pub preprocessing: Preprocessing,
    /// The feature space.
    pub key: CacheKey,
    /// Where the rows come from (canonical paths), as recorded in the row map.
    pub source: String,
    /// The row map's id: (dataset, source, space).
    pub view: String,
    /// The row map's rows (skip reasons of unreadable files filled in; of undecodable ones
    /// not yet).
    pub rows: Vec<Row>,
    /// Fingerprint of the classes and rows.
    pub fingerprint: String,
    /// The augmented views extracted of every image (`[extract] views`), original first.
    pub views: Vec<View>,
}

impl Plan {
    /// Loads the dataset, hashes its files, opens the weights and works out the preprocessing
    /// and the feature space. With `on_bad_image = "error"`, a missing image fails here,
    /// before any work is done.
    pub fn new(config: &Config) -> Result<Self> {
        let dataset = Dataset::load(&config.data)?;
        let source = &config.backbone.weights;
        let weights = Weights::open(source.resolve()?)?;
        let preprocessing = Partial::from_config(&config.preprocess)
            .or(Partial::from_metadata(&weights.metadata, &weights.path)?)
            .or(source.known_preprocessing())
            .complete(config.preprocess.resize, &source.to_string())?;
        let (hashes, unreadable) =
            hash_rows(&dataset.samples, &dataset.limits, config.data.on_bad_image)?;
        let key = space_key(config, &weights, &preprocessing)?;
        let source = data_source(&config.data);
        let view = view_id(KIND_DATASET, &source, &key.id());
        let rows: Vec<Row> = dataset
            .samples
            .iter()
            .zip(&hashes)
            .zip(unreadable)
            .map(|((s, h), why)| Row {
                id: s.id.clone(),
                label: s.label,
                hash: h.clone(),
                skipped: why,
            })
            .collect();
        let fingerprint = rowmap::fingerprint(&dataset.classes, &rows);
        let views = config.extract.views()?;
        Ok(Self {
            dataset,
            hashes,
            weights,
            preprocessing,
            key,
            source,
            view,
            rows,
            fingerprint,
            views,
        })
    }

    /// The row map of this plan, with skip reasons per content hash.
    fn row_map(&self, config: &Config, bad: &HashMap<String, String>, complete: bool) -> RowMap {
        self.row_map_batched(config, config.extract.batch_size, bad, complete)
    }

    /// [`Self::row_map`] for a partition into batches of `batch_size`.
    fn row_map_batched(
        &self,
        config: &Config,
        batch_size: usize,
        bad: &HashMap<String, String>,
        complete: bool,
    ) -> RowMap {
        let rows: Vec<Row> = self
            .rows
            .iter()
            .map(|r| Row {
                skipped: r
                    .skipped
                    .clone()
                    .or_else(|| r.hash.as_ref().and_then(|h| bad.get(h).cloned())),
                ..r.clone()
            })
            .collect();
        RowMap {
            format: FORMAT_VERSION,
            kind: KIND_DATASET.into(),
            source: self.source.clone(),
            space: self.key.id(),
            weights: config.backbone.weights.to_string(),
            classes: self.dataset.classes.clone(),
            batch_size,
            fingerprint: self.fingerprint.clone(),
            views: views::names(&self.views),
            complete,
            counts: rowmap::count(&rows),
            rows,
            written_by: written_by(),
        }
    }
}

/// The feature space a config and its weights define.
pub fn space_key(
    config: &Config,
    weights: &Weights,
    preprocessing: &Preprocessing,
) -> Result<CacheKey> {
    let backbone = spec(&config.backbone.name)?;
    let layer = space_layer(config);
    let dim = layer
        .dim(backbone.name, preprocessing.input_size)
        .ok_or_else(|| Error::InvalidValue {
            key: "head.unfreeze".into(),
            message: format!(
                "block-4 activations exist for vgg16 only, not `{}`",
                backbone.name
            ),
        })?;
    Ok(CacheKey {
        format: FORMAT_VERSION,
        backbone: backbone.name.to_string(),
        weights_sha256: weights.sha256.clone(),
        preprocessing: preprocessing.clone(),
        dtype: format!("{:?}", config.extract.dtype).to_lowercase(),
        compute: config.extract.compute.name().into(),
        dim,
        layer,
    })
}

/// The activations a config's store space holds: the backbone's output, or with `[head]
/// unfreeze = "block5"` VGG16's block-4 pool (what the fine-tuned block 5 reads: `extract`
/// then extracts those, and `train-head` finds them there).
pub fn space_layer(config: &Config) -> Layer {
    match config.head.unfreeze {
        Unfreeze::None => Layer::Output,
        Unfreeze::Block5 => Layer::Pool4,
    }
}

/// The canonical description of a dataset's origin (part of its row map's identity).
pub fn data_source(d: &DataConfig) -> String {
    let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    match (show(&d.csv), show(&d.images), show(&d.root)) {
        (Some(csv), Some(images), _) => format!(
            "csv {csv} images {images} columns {} {}",
            d.image_column, d.label_column
        ),
        (_, _, Some(root)) => format!("folders {root}"),
        _ => String::new(),
    }
}

fn written_by() -> String {
    format!("pipeline {}", env!("CARGO_PKG_VERSION"))
}

/// Content hashes of the dataset's files. With `on_bad_image = "error"` an unreadable file is an
/// error naming it and its line; otherwise its hash is `None`.
pub fn hash_samples(dataset: &Dataset, on_bad_image: OnBadImage) -> Result<Vec<Option<String>>> {
    Ok(hash_rows(&dataset.samples, &dataset.limits, on_bad_image)?.0)
}

/// Per row: its content hash, or (skip mode) why its file could not be read.
type HashedRows = (Vec<Option<String>>, Vec<Option<String>>);

/// Content hashes, and for unreadable files (skip mode) the reason.
fn hash_rows(
    samples: &[Sample],
    limits: &InputLimits,
    on_bad_image: OnBadImage,
) -> Result<HashedRows> {
    let mut hashes = Vec::with_capacity(samples.len());
    let mut reasons = Vec::with_capacity(samples.len());
    for (s, h) in samples.iter().zip(content_hashes_within(samples, limits)) {
        match h {
            Ok(h) => {
                hashes.push(Some(h));
                reasons.push(None);
            }
            Err(e) if on_bad_image == OnBadImage::Error => return Err(with_line(e, s.line)),
            Err(e) => {
                hashes.push(None);
                reasons.push(Some(e.to_string()));
            }
        }
    }
    Ok((hashes, reasons))
}

/// The unit of work: the distinct content hashes of a dataset in order of first appearance
/// (each with its first row), cut into batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    /// (content hash, first dataset row with it).
    pub unique: Vec<(String, usize)>,
    pub batch_size: usize,
}

impl Work {
    /// Plans the batches of `hashes` (rows without a hash are left out).
    pub fn new(hashes: &[Option<String>], batch_size: usize) -> Self {
        Self::with_views(hashes, &[View::Original], batch_size)
    }

    /// Plans the batches of every view's rows: the row keys ([`View::row_key`]) of view 0's
    /// rows, then view 1's, and so on, each key once. The second field of an item is then the
    /// *slot* `view * hashes.len() + row` (the row itself for the original view, so with
    /// `[View::Original]` this is [`Work::new`]'s plan exactly); [`Engine::views`] decodes it.
    pub fn with_views(hashes: &[Option<String>], views: &[View], batch_size: usize) -> Self {
        let mut seen = HashSet::new();
        let n = hashes.len();
        let unique = views
            .iter()
            .enumerate()
            .flat_map(|(v, view)| {
                hashes
                    .iter()
                    .enumerate()
                    .filter_map(move |(row, h)| Some((view.row_key(h.as_ref()?), v * n + row)))
            })
            .filter(|(key, _)| seen.insert(key.clone()))
            .collect();
        Self {
            unique,
            batch_size: batch_size.max(1),
        }
    }

    /// The batches: (batch index, its hashes with their first rows).
    pub fn batches(&self) -> impl Iterator<Item = (usize, &[(String, usize)])> {
        self.unique.chunks(self.batch_size).enumerate()
    }

    /// The batch a unique hash's position falls in.
    pub fn batch_of(&self, position: usize) -> usize {
        position / self.batch_size
    }
}

/// Whether batch `batch` is this task's work: every batch for an unsharded run; with
/// `Some((k, n))` (task k of n, `--shard K/N`), batch b belongs to task b mod n.
pub fn assigned(batch: usize, shard: Option<(usize, usize)>) -> bool {
    match shard {
        None => true,
        Some((k, n)) => n > 0 && batch % n == k,
    }
}

/// What a run did, for the closing summary line.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Rows of the dataset.
    pub rows: usize,
    /// Distinct images (content hashes) among them.
    pub unique: usize,
    /// Rows with features in the store.
    pub images: usize,
    /// Images run through the network by this run.
    pub computed: usize,
    /// Distinct images found in the store already.
    pub reused: usize,
    /// Rows left out as bad images.
    pub skipped: usize,
    pub seconds: f64,
    pub device: String,
    pub dir: PathBuf,
    /// For a part (`--shard K/N`): which, and its batches; `rows`, `unique`, `images` and
    /// `skipped` then count the part's images only.
    pub part: Option<PartSummary>,
}

/// What a part (`--shard K/N`) did besides computing.
#[derive(Debug, Clone)]
pub struct PartSummary {
    pub part: Part,
    /// Batches of this part, and of the whole dataset.
    pub batches: usize,
    pub all_batches: usize,
    /// Whether the dataset's row map (the union of all parts) is written now.
    pub union: bool,
    /// What was found about the other parts ("parts 0, 1 of 4 have not finished", ...).
    pub note: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.computed as f64 / self.seconds.max(1e-9);
        if let Some(p) = &self.part {
            write!(
                f,
                "extract (shard {}, {} of {} batches): ",
                p.part, p.batches, p.all_batches
            )?;
        } else {
            write!(f, "extract: ")?;
        }
        write!(
            f,
            "{} computed now, {} reused (of {} rows, {} unique images); {} images stored, \
             {:.1} s, {:.2} images/s, device {}, store {}",
            self.computed,
            self.reused,
            self.rows,
            self.unique,
            self.images,
            self.seconds,
            rate,
            self.device,
            self.dir.display()
        )?;
        if self.skipped > 0 {
            write!(
                f,
                ", {} bad images skipped (listed in the row map)",
                self.skipped
            )?;
        }
        if let Some(p) = &self.part {
            write!(f, "; {}", p.note)?;
        }
        Ok(())
    }
}

/// Runs extraction as configured: computes what the store lacks, reuses the rest. The part
/// `[extract] shard` or the scheduler's environment names, if any (see [`run_with`]).
pub fn run(config: &Config) -> Result<Summary> {
    run_with(config, None)
}

/// `extract [--shard K/N]`: the part `shard` (the flag), `[extract] shard`, a Slurm array or
/// a Kubernetes Indexed Job names, in that order ([`parts::resolve`]); without any of them,
/// the whole dataset.
pub fn run_with(config: &Config, shard: Option<&str>) -> Result<Summary> {
    let assignment = parts::resolve_from_process(shard, &config.extract)?;
    run_part(config, assignment.as_ref())
}

/// `extract --gc`: deletes the store's unreferenced shards; returns the report. A sharded
/// extraction whose parts do not yet add up to a row map stops it before anything is deleted
/// (its shards are referenced by no row map yet); records of finished ones are deleted.
pub fn gc(config: &Config) -> Result<crate::features::store::GcReport> {
    let out = &config.extract.out;
    let problem = match crate::features::store::inspect(out)? {
        Folder::Ours => None,
        Folder::Absent | Folder::Empty => Some("no feature store here: nothing to collect"),
        Folder::V1(_) => Some("an old feature cache (format 1): run `cargo run -p extract` first"),
        Folder::Foreign(entries) => {
            return Err(crate::features::store::foreign_error(out, &entries))
        }
    };
    if let Some(message) = problem {
        return Err(Error::Cache {
            path: out.clone(),
            message: message.into(),
        });
    }
    let store = Store::open_exclusive(out, config.extract.lock_wait(), "extract")?;
    settle_parts(&store)?;
    store.gc("extract")
}

/// Before gc: deletes the part records whose row map is written (same dataset version,
/// complete); any other record is a sharded extraction in progress, whose shards no row map
/// references yet, so gc must not run.
fn settle_parts(store: &Store) -> Result<()> {
    let root = store.dir().join(parts::PARTS);
    let mut unfinished = Vec::new();
    for view in crate::features::store::list_names(&root)? {
        if !crate::features::store::is_hex(&view, 16) {
            continue;
        }
        let map = store.read_row_map(&view)?.filter(|m| m.complete);
        if let Some(m) = &map {
            parts::remove_superseded(store, &view, &m.fingerprint)?;
        }
        let left = parts::read_records(store.dir(), &view, "extract")?;
        if let Some(r) = left.first() {
            let progress = PartsFound::of(left.clone(), &r.space, &r.fingerprint);
            let state = progress.describe_missing().unwrap_or_else(|| {
                "every part finished, but the dataset's row map is not written yet".into()
            });
            unfinished.push(format!("{} ({state})", root.join(&view).display()));
        }
    }
    if unfinished.is_empty() {
        return Ok(());
    }
    Err(Error::Cache {
        path: store.dir().to_owned(),
        message: format!(
            "a sharded extraction is unfinished, and gc would delete its shards: {}. Finish it \
             (the missing `extract --shard K/N` tasks, or `extract` without a shard, or \
             `train-head`, with its config) or delete that folder; nothing was deleted",
            unfinished.join("; ")
        ),
    })
}

/// Extraction of the batches [`assigned`] to `assignment`'s part (`None`: all of them).
///
/// A part (`--shard K/N`) takes the shared lock (its shard writes are content-addressed
/// renames, so other parts, and reruns of the same part, write alongside it), leaves
/// temporaries and invalid shards alone (another task may be writing them), and records itself
/// in `parts/<view>/part-K-of-N.json` instead of writing the row map; when it finds every part
/// of its partition recorded, it writes the row map of the whole dataset, as an unsharded run
/// would.
fn run_part(config: &Config, assignment: Option<&Assignment>) -> Result<Summary> {
    let start = Instant::now();
    let part = assignment.map(|a| a.part);
    let plan = Plan::new(config)?;
    let out = &config.extract.out;
    let store = match part {
        None => Store::open_exclusive(out, config.extract.lock_wait(), "extract")?,
        Some(_) => Store::open_shared_writable(out, config.extract.lock_wait(), "extract")?,
    };
    store.ensure_space(&plan.key)?;
    let mut index = store.index(&plan.key, "extract")?;
    let work = Work::with_views(&plan.hashes, &plan.views, config.extract.batch_size);
    let rows = plan.hashes.len();
    let mine: Vec<(usize, &[(String, usize)])> = work
        .batches()
        .filter(|(b, _)| assigned(*b, part.map(Part::pair)))
        .collect();
    let all_batches = work.batches().count();
    if let Some(a) = assignment {
        let shown: Vec<usize> = mine.iter().map(|(b, _)| *b).collect();
        eprintln!(
            "extract: shard {} (from {}): batch{} {} of {all_batches} (batches of {} unique images)",
            a.part,
            a.origin,
            if shown.len() == 1 { "" } else { "es" },
            if shown.is_empty() {
                "none".to_string()
            } else {
                parts::list(&shown, 8)
            },
            work.batch_size
        );
    }

    // Reused shards are read in full once (checksums), so a corrupt one is recomputed now
    // rather than found by train-head.
    let reused: BTreeSet<usize> = mine
        .iter()
        .flat_map(|(_, items)| items.iter())
        .filter_map(|(h, _)| index.locate(h).map(|(s, _)| s))
        .collect();
    let reused: Vec<usize> = reused.into_iter().collect();
    let corrupt = index.verify(&reused);
    for (s, reason) in &corrupt {
        if store.exclusive() {
            eprintln!("extract: removing corrupt shard: {reason}");
        } else {
            // Its recomputed replacement has the same name and replaces it.
            eprintln!("extract: recomputing corrupt shard: {reason}");
        }
        store.remove_shard(&index.shards()[*s].0)?;
    }
    index.remove(&corrupt.iter().map(|c| c.0).collect::<Vec<_>>());

    // Undecodable images a previous run of this view recorded (in its row map, or in a part
    // record) are not decoded again.
    let records = parts::read_records(store.dir(), &plan.view, "extract")?;
    let mut bad: HashMap<String, String> = HashMap::new();
    if config.data.on_bad_image == OnBadImage::Skip {
        if let Ok(Some(previous)) = store.read_row_map(&plan.view) {
            bad.extend(
                previous
                    .bad_hashes()
                    .into_iter()
                    .map(|(h, r)| (h.to_string(), r.to_string())),
            );
        }
        bad.extend(
            parts::skipped_of(&records)
                .into_iter()
                .map(|s| (s.hash.clone(), s.reason.clone())),
        );
    }
    let jobs: Vec<Job> = mine
        .iter()
        .filter_map(|(_, items)| {
            let missing: Vec<(String, usize)> = items
                .iter()
                .filter(|(h, slot)| {
                    // A bad image is bad under every view: its row's hash is what is recorded.
                    let image = plan.hashes[slot % rows].as_deref().unwrap_or_default();
                    !index.contains(h) && !bad.contains_key(image)
                })
                .cloned()
                .collect();
            (!missing.is_empty()).then_some(Job { items: missing })
        })
        .collect();
    let mine_unique: usize = mine.iter().map(|(_, items)| items.len()).sum();
    let to_compute: usize = jobs.iter().map(|j| j.items.len()).sum();
    let reused = mine
        .iter()
        .flat_map(|(_, items)| items.iter())
        .filter(|(h, _)| index.contains(h))
        .count();

    // The device and the backbone are ready before anything is written: a `cuda` that
    // cannot be kept, or arithmetic the device lacks, fails here and leaves the store as it
    // was.
    let backbone = if jobs.is_empty() {
        None
    } else {
        let device = config.extract.device.open_logged("extract")?;
        let model = load_backbone(&plan.weights, &device, config)?;
        Some((device, model))
    };
    if part.is_none() {
        let progress = PartsFound::of(records, &plan.key.id(), &plan.fingerprint);
        if let (Some(missing), false) = (progress.describe_missing(), jobs.is_empty()) {
            eprintln!(
                "extract: a sharded extraction of this dataset is unfinished ({missing}): \
                 computing what it lacks here"
            );
        }
        // The row map first says "incomplete", so that readers never take a half-done
        // extraction for a finished one. (A part writes no row map until all parts are in.)
        store.write_row_map(&plan.view, &plan.row_map(config, &bad, false))?;
    }
    let (device_name, computed) = if let Some((device, model)) = backbone {
        let device_name = describe(&device);
        eprintln!(
            "extract: {to_compute} of {mine_unique} unique images to compute in {} batches on {device_name}; {reused} reused from {}",
            jobs.len(),
            store.dir().display()
        );
        let engine = Engine {
            model: model.as_ref(),
            device: &device,
            prep: &plan.preprocessing,
            limits: &plan.dataset.limits,
            key: &plan.key,
            on_bad_image: config.data.on_bad_image,
            program: "extract",
            views: &plan.views,
        };
        let mut written = Vec::new();
        let outcome = compute_jobs(&engine, &plan.dataset.samples, &jobs, |c: Computed| {
            written.push(store.write_shard(&plan.key, c.hashes, &c.data)?);
            Ok(())
        })?;
        for (path, header) in written {
            index.add(path, header);
        }
        // Skip reasons are recorded by the image's content hash, whichever view's row failed
        // to decode (a part may hold a view of an image whose original row is another part's).
        let slot_of: HashMap<&str, usize> = jobs
            .iter()
            .flat_map(|j| j.items.iter().map(|(k, slot)| (k.as_str(), *slot)))
            .collect();
        for (key, reason) in outcome.skipped {
            let image = slot_of
                .get(key.as_str())
                .and_then(|slot| plan.hashes[slot % rows].clone())
                .unwrap_or(key);
            bad.insert(image, reason);
        }
        (device_name, outcome.computed)
    } else {
        eprintln!(
            "extract: store {} is up to date: all {} images of this {} are stored ({} reused): nothing to compute",
            store.dir().display(),
            mine_unique,
            if part.is_some() { "part" } else { "dataset" },
            reused
        );
        ("none".to_string(), 0)
    };
    let summary = |rows, unique, images, skipped, part| Summary {
        rows,
        unique,
        images,
        computed,
        reused,
        skipped,
        seconds: start.elapsed().as_secs_f64(),
        device: device_name.clone(),
        dir: store.dir().to_owned(),
        part,
    };
    let Some(part) = part else {
        let map = plan.row_map(config, &bad, true);
        // Every row must now be stored (under every view) or skipped: checked, not assumed.
        let lacking = lacking_rows(&map, &index);
        if lacking > 0 {
            return Err(Error::Cache {
                path: store.dir().to_owned(),
                message: format!("{lacking} rows have no features after extraction"),
            });
        }
        if map.counts.stored == 0 {
            return Err(Error::EmptyDataset(plan.dataset.source.clone()));
        }
        store.write_row_map(&plan.view, &map)?;
        // The records of a sharded extraction of this dataset add up to this row map now.
        parts::remove_superseded(&store, &plan.view, &plan.fingerprint)?;
        return Ok(summary(
            map.counts.rows,
            map.counts.unique,
            map.counts.stored,
            map.counts.skipped,
            None,
        ));
    };

    // The part's own images: each stored or skipped, checked before it is recorded as done.
    let items = || mine.iter().flat_map(|(_, items)| items.iter());
    // Skip reasons are the image's (its content hash), whichever view's item it is.
    let image_of = |slot: &usize| plan.hashes[slot % rows].as_deref().unwrap_or_default();
    let lacking = items()
        .filter(|(h, slot)| !index.contains(h) && !bad.contains_key(image_of(slot)))
        .count();
    if lacking > 0 {
        return Err(Error::Cache {
            path: store.dir().to_owned(),
            message: format!("{lacking} images of shard {part} have no features after extraction"),
        });
    }
    let mut skipped: Vec<Skipped> = items()
        .filter_map(|(_, slot)| {
            let image = image_of(slot);
            bad.get(image).map(|reason| Skipped {
                hash: image.to_string(),
                reason: reason.clone(),
            })
        })
        .collect();
    skipped.sort();
    skipped.dedup();
    // The part's dataset rows: those whose image is in its batches (under any view).
    let my_hashes: HashSet<&str> = items().map(|(_, slot)| image_of(slot)).collect();
    let part_rows: Vec<&Row> = plan
        .rows
        .iter()
        .filter(|r| r.hash.as_deref().is_some_and(|h| my_hashes.contains(h)))
        .collect();
    let rows_skipped = part_rows
        .iter()
        .filter(|r| r.hash.as_ref().is_some_and(|h| bad.contains_key(h)))
        .count();
    let record = PartRecord {
        format: FORMAT_VERSION,
        kind: parts::RECORD_KIND.into(),
        view: plan.view.clone(),
        space: plan.key.id(),
        fingerprint: plan.fingerprint.clone(),
        batch_size: work.batch_size,
        part: part.index,
        parts: part.count,
        batches: mine.len(),
        images: mine_unique,
        skipped: skipped.clone(),
        written_by: written_by(),
    };
    parts::write_record(&store, &record)?;
    let (union, note) = establish_union(&store, config, &plan, part, work.batch_size)?;
    Ok(summary(
        part_rows.len(),
        mine_unique,
        part_rows.len() - rows_skipped,
        rows_skipped,
        Some(PartSummary {
            part,
            batches: mine.len(),
            all_batches,
            union,
            note,
        }),
    ))
}

/// Rows of `map` neither skipped nor stored under every view the row map lists.
fn lacking_rows(map: &RowMap, index: &Index) -> usize {
    map.rows
        .iter()
        .filter(|r| {
            r.skipped.is_none()
                && !r.hash.as_ref().is_some_and(|h| {
                    map.views
                        .iter()
                        .all(|v| index.contains(&views::row_key(h, v)))
                })
        })
        .count()
}

/// After a part has recorded itself: when every part of its partition is recorded and every
/// image of the dataset is stored, writes the dataset's row map (the union: byte for byte what
/// an unsharded run writes). Returns whether the row map is written, and what was found.
fn establish_union(
    store: &Store,
    config: &Config,
    plan: &Plan,
    part: Part,
    batch_size: usize,
) -> Result<(bool, String)> {
    let records = parts::read_records(store.dir(), &plan.view, "extract")?;
    let progress = PartsFound::of(records, &plan.key.id(), &plan.fingerprint);
    let Some(all) = progress.complete_of(part.count, batch_size) else {
        let missing = (0..part.count)
            .filter(|k| {
                !progress
                    .partitions
                    .get(&(part.count, batch_size))
                    .is_some_and(|p| p.contains_key(k))
            })
            .collect::<Vec<_>>();
        return Ok((
            false,
            format!(
                "waiting for part{} {} of {}: the last part to finish writes the dataset's row map",
                if missing.len() == 1 { "" } else { "s" },
                parts::list(&missing, 12),
                part.count
            ),
        ));
    };
    let bad = bad_of(&all);
    let map = plan.row_map_batched(config, batch_size, &bad, true);
    // The other parts' shards: a fresh look at the space.
    let index = store.index(&plan.key, "extract")?;
    let lacking = lacking_rows(&map, &index);
    if lacking > 0 {
        return Ok((
            false,
            format!(
                "all {} parts are recorded, but {lacking} rows have no features in the store \
                 (deleted or corrupt shards?): run `extract` without a shard to finish",
                part.count
            ),
        ));
    }
    let path = store.row_map_path(&plan.view);
    let same = store.read_row_map(&plan.view).ok().flatten().as_ref() == Some(&map);
    if !same {
        store.write_row_map(&plan.view, &map)?;
    }
    Ok((
        true,
        format!(
            "all {} parts are in: the dataset's row map {} is written",
            part.count,
            path.display()
        ),
    ))
}

/// Skip reasons by content hash, from part records.
fn bad_of(records: &[&PartRecord]) -> HashMap<String, String> {
    parts::skipped_of(records.iter().copied())
        .into_iter()
        .map(|s| (s.hash.clone(), s.reason.clone()))
        .collect()
}

/// The features of the dataset `plan` describes, from the store `[extract] out`, in dataset
/// row order; an error says exactly what is missing or different and to run `extract`.
///
/// Without the dataset's row map (or with one of an older version of it), the records of a
/// sharded extraction are looked at: when every part of one partition is in, their union is
/// the row map, and it is written for later readers; when some are not, the error names them.
pub fn load_features(config: &Config, plan: &Plan) -> Result<FeatureSet> {
    let dir = &config.extract.out;
    let cache_err = |message: String| Error::Cache {
        path: dir.clone(),
        message,
    };
    let store =
        Store::open_shared(dir, config.extract.lock_wait(), "train-head")?.ok_or_else(|| {
            cache_err("no feature store here: run `cargo run -p extract` first".into())
        })?;
    let progress = PartsFound::of(
        parts::read_records(store.dir(), &plan.view, "train-head")?,
        &plan.key.id(),
        &plan.fingerprint,
    );
    let found = store.read_row_map(&plan.view)?;
    let mut from_parts = None;
    let map = match found {
        Some(map) if map.fingerprint == plan.fingerprint => map,
        found => {
            if let Some(records) = progress.complete() {
                let batch_size = records
                    .first()
                    .map_or(config.extract.batch_size, |r| r.batch_size);
                from_parts = Some(records.len());
                plan.row_map_batched(config, batch_size, &bad_of(&records), true)
            } else if let Some(missing) = progress.describe_missing() {
                return Err(cache_err(format!(
                    "a sharded extraction of this dataset is unfinished: {missing} (records in {}): \
                     run the missing `extract --shard K/N` tasks, or `cargo run -p extract` \
                     without a shard to finish it",
                    parts::records_dir(store.dir(), &plan.view).display()
                )));
            } else if let Some(map) = found {
                return Err(cache_err(format!(
                    "made from other inputs than the config names (the dataset changed since extraction: {}): run `cargo run -p extract` to update it",
                    describe_changes(&map.classes, &map.rows, &plan.dataset.classes, &plan.rows)
                )));
            } else {
                return Err(no_row_map(&store, plan, cache_err)?);
            }
        }
    };
    if map.fingerprint != plan.fingerprint {
        return Err(cache_err(format!(
            "made from other inputs than the config names (the dataset changed since extraction: {}): run `cargo run -p extract` to update it",
            describe_changes(&map.classes, &map.rows, &plan.dataset.classes, &plan.rows)
        )));
    }
    let absent: Vec<String> = views::names(&plan.views)
        .into_iter()
        .filter(|v| !map.views.contains(v))
        .collect();
    if !absent.is_empty() {
        return Err(cache_err(format!(
            "holds the views {:?} of this dataset, not {:?} ([extract] views): run `cargo run -p extract` to extract them",
            map.views, absent
        )));
    }
    let index = store.index(&plan.key, "train-head")?;
    let work = Work::with_views(&plan.hashes, &plan.views, map.batch_size);
    let rows = plan.hashes.len();
    let mut missing_batches = BTreeSet::new();
    let mut missing = 0;
    for (position, (hash, slot)) in work.unique.iter().enumerate() {
        let skipped = map.rows[slot % rows].skipped.is_some();
        if !skipped && !index.contains(hash) {
            missing += 1;
            missing_batches.insert(work.batch_of(position));
        }
    }
    if missing > 0 {
        let listed: Vec<usize> = missing_batches.iter().copied().collect();
        let unfinished = progress
            .describe_missing()
            .map(|m| format!(" (a sharded extraction of it is unfinished: {m})"))
            .unwrap_or_default();
        return Err(cache_err(format!(
            "{}{missing} of {} images of this dataset are not in the store (batch{} {} of {} images){unfinished}: run `cargo run -p extract` to finish it",
            if map.complete { "" } else { "incomplete (extraction was interrupted): " },
            work.unique.len(),
            if missing_batches.len() == 1 { "" } else { "es" },
            parts::list(&listed, 10),
            work.batch_size
        )));
    }
    if let Some(n) = from_parts {
        // Whoever finds every part in establishes the union, for later readers and gc.
        store.write_row_map(&plan.view, &map)?;
        eprintln!(
            "train-head: all {n} parts of the sharded extraction are in: wrote the dataset's row map {}",
            store.row_map_path(&plan.view).display()
        );
    }
    let kept: Vec<usize> = (0..map.rows.len())
        .filter(|&r| map.rows[r].skipped.is_none())
        .collect();
    if kept.is_empty() {
        return Err(Error::EmptyDataset(plan.dataset.source.clone()));
    }
    let hashes: Vec<&str> = kept
        .iter()
        .filter_map(|&r| plan.rows[r].hash.as_deref())
        .collect();
    if hashes.len() != kept.len() {
        return Err(cache_err("a stored row has no content hash".into()));
    }
    // View-major: every kept row's original view, then every kept row's next view, ...
    let keys: Vec<String> = plan
        .views
        .iter()
        .flat_map(|v| hashes.iter().map(|h| v.row_key(h)))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = index.gather(&keys)?;
    let features = Tensor::from_vec(values, (keys.len(), plan.key.dim), &Device::Cpu)?;
    let samples = &plan.dataset.samples;
    Ok(FeatureSet {
        features,
        labels: kept
            .iter()
            .map(|&r| samples[r].label.unwrap_or(0))
            .collect(),
        ids: kept.iter().map(|&r| samples[r].id.clone()).collect(),
        rows: kept,
        key: plan.key.clone(),
        row_map: map,
        views: plan.views.clone(),
    })
}

/// The error for a store without this dataset's row map: the same dataset in another space
/// (saying which inputs differ), or not there at all.
fn no_row_map(store: &Store, plan: &Plan, cache_err: impl Fn(String) -> Error) -> Result<Error> {
    let spaces: HashMap<String, CacheKey> = store.spaces()?.into_iter().collect();
    let other = store
        .row_maps()?
        .into_iter()
        .filter(|(_, m)| m.kind == KIND_DATASET && m.source == plan.source)
        .find_map(|(_, m)| spaces.get(&m.space).cloned());
    Ok(cache_err(match other {
        Some(k) => format!(
            "made from other inputs than the config names ({} differ): run `cargo run -p extract` to extract this dataset with them",
            k.differences(&plan.key).join(", ")
        ),
        None => format!(
            "holds no features of this dataset ({}): run `cargo run -p extract` first",
            plan.source
        ),
    }))
}

/// The backbone as `[extract]` configures it, on `device`.
pub fn load_backbone(
    weights: &Weights,
    device: &Device,
    config: &Config,
) -> Result<Box<dyn Backbone>> {
    let options = BackboneOptions::from_config(&config.extract);
    load_layer(
        &config.backbone.name,
        space_layer(config),
        weights,
        device,
        &options,
    )
}

/// One unit of computation: the images of one planned batch that the store lacks.
pub(crate) struct Job {
    /// (content hash, sample index of its first row).
    pub items: Vec<(String, usize)>,
}

/// A computed batch on its way to the writer: the decodable images' hashes and their
/// features as raw little-endian bytes of the stored dtype.
pub(crate) struct Computed {
    pub hashes: Vec<String>,
    pub data: Vec<u8>,
}

/// What the network did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Images run through the network.
    pub computed: usize,
    /// Undecodable images (skip mode): (content hash, reason).
    pub skipped: Vec<(String, String)>,
}

/// The fixed parts of a computation.
pub(crate) struct Engine<'a> {
    pub model: &'a dyn Backbone,
    pub device: &'a Device,
    pub prep: &'a Preprocessing,
    /// File size and pixel limits of the images read.
    pub limits: &'a InputLimits,
    pub key: &'a CacheKey,
    pub on_bad_image: OnBadImage,
    /// "extract" or "predict", for messages.
    pub program: &'a str,
    /// The views a job item's slot refers to: item `(key, slot)` is view
    /// `views[slot / samples.len()]` of sample `slot % samples.len()` ([`Work::with_views`]).
    pub views: &'a [View],
}

/// Batches the writer may hold before the network waits for the disk.
const WRITE_AHEAD: usize = 2;

/// Runs `jobs` through the network with decoding ahead on a decoder thread and `write` called
/// on a writer thread for every computed batch, in order. The first error (decoding in error
/// mode, the network, `write`) stops all three and is returned.
pub(crate) fn compute_jobs<W>(
    engine: &Engine,
    samples: &[Sample],
    jobs: &[Job],
    mut write: W,
) -> Result<Outcome>
where
    W: FnMut(Computed) -> Result<()> + Send,
{
    let total: usize = jobs.iter().map(|j| j.items.len()).sum();
    let prep = engine.prep;
    let rows = samples.len().max(1);
    let size = prep.input_size as usize;
    std::thread::scope(|scope| {
        // Capacity 1 plus the batch the decoder holds while blocked on `send`: at most two
        // batches decoded ahead of the network.
        let (decoded_tx, decoded_rx) = mpsc::sync_channel::<Vec<Result<Vec<f32>>>>(1);
        scope.spawn(move || {
            for job in jobs {
                let paths: Vec<&Path> = job
                    .items
                    .iter()
                    .map(|(_, s)| samples[s % rows].path.as_path())
                    .collect();
                let mut decoded = prep.load_many_within(&paths, engine.limits);
                for ((_, slot), image) in job.items.iter().zip(decoded.iter_mut()) {
                    match (engine.views.get(slot / rows), image) {
                        (None | Some(View::Original), _) | (_, Err(_)) => {}
                        (Some(view), Ok(pixels)) => *pixels = view.apply(pixels, size),
                    }
                }
                if decoded_tx.send(decoded).is_err() {
                    return; // the network stopped on an error
                }
            }
        });
        let (write_tx, write_rx) = mpsc::sync_channel::<Computed>(WRITE_AHEAD);
        let writer = scope.spawn(move || -> Result<()> {
            for c in write_rx {
                write(c)?;
            }
            Ok(())
        });
        let result = network(engine, samples, jobs, total, decoded_rx, write_tx);
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let outcome = result?;
        written?;
        if outcome.computed + outcome.skipped.len() != total {
            return Err(Error::Cache {
                path: PathBuf::from(engine.program),
                message: "the decoder stopped before every batch was computed".into(),
            });
        }
        Ok(outcome)
    })
}

/// The network's loop on the calling thread. It owns both channel ends it uses, so returning
/// (on success or error) drops them: the decoder then stops at its next send, and the writer
/// after draining what it was given.
fn network(
    engine: &Engine,
    samples: &[Sample],
    jobs: &[Job],
    total: usize,
    decoded: mpsc::Receiver<Vec<Result<Vec<f32>>>>,
    to_writer: mpsc::SyncSender<Computed>,
) -> Result<Outcome> {
    let mut progress = Progress::new(engine.program, "images", total as u64);
    let mut outcome = Outcome::default();
    for (job, pixels) in jobs.iter().zip(decoded.iter()) {
        if let Some(c) = run_batch(engine, samples, job, pixels, &mut outcome)? {
            if to_writer.send(c).is_err() {
                break; // the writer failed: its error is reported by the caller
            }
        }
        progress.inc(job.items.len() as u64);
    }
    progress.finish();
    Ok(outcome)
}

/// Decoded pixels of one job -> features; `None` when every image was undecodable (skip mode).
fn run_batch(
    engine: &Engine,
    samples: &[Sample],
    job: &Job,
    decoded: Vec<Result<Vec<f32>>>,
    outcome: &mut Outcome,
) -> Result<Option<Computed>> {
    let mut pixels = Vec::with_capacity(job.items.len() * engine.prep.len());
    let mut hashes = Vec::with_capacity(job.items.len());
    for ((hash, s), result) in job.items.iter().zip(decoded) {
        let sample = &samples[s % samples.len().max(1)];
        match result {
            Ok(p) => {
                pixels.extend(p);
                hashes.push(hash.clone());
            }
            Err(e) if engine.on_bad_image == OnBadImage::Error => {
                return Err(with_line(e, sample.line))
            }
            Err(e) => {
                eprintln!("{}: skipping {}: {e}", engine.program, sample.id);
                outcome.skipped.push((hash.clone(), e.to_string()));
            }
        }
    }
    if hashes.is_empty() {
        return Ok(None);
    }
    let n = hashes.len();
    let s = engine.prep.input_size as usize;
    let x = Tensor::from_vec(pixels, (n, 3, s, s), engine.device)?;
    let features = engine
        .model
        .forward(&x)?
        .to_dtype(engine.key.store_dtype())?
        .to_device(&Device::Cpu)?;
    let data = raw_bytes(&features)?;
    outcome.computed += n;
    Ok(Some(Computed { hashes, data }))
}

/// The little-endian bytes of a CPU tensor of f32, f16 or bf16 values, in row-major order.
fn raw_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .into_iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .into_iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
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

/// An index over no store (predict without a store).
pub(crate) fn empty_index(key: &CacheKey) -> Index {
    Index::empty(Path::new(""), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(c: char) -> Option<String> {
        Some(c.to_string().repeat(64))
    }

    #[test]
    fn work_is_unique_hashes_in_first_appearance_order_cut_into_batches() {
        let hashes = [h('a'), h('b'), h('a'), None, h('c'), h('d'), h('b'), h('e')];
        let w = Work::new(&hashes, 2);
        let order: Vec<(char, usize)> = w
            .unique
            .iter()
            .map(|(h, r)| (h.chars().next().unwrap_or(' '), *r))
            .collect();
        assert_eq!(order, [('a', 0), ('b', 1), ('c', 4), ('d', 5), ('e', 7)]);
        let sizes: Vec<(usize, usize)> = w.batches().map(|(b, i)| (b, i.len())).collect();
        assert_eq!(sizes, [(0, 2), (1, 2), (2, 1)]);
        assert_eq!(w.batch_of(4), 2);
        // Appending a row adds to the last batch only.
        let mut more = hashes.to_vec();
        more.push(h('f'));
        let w2 = Work::new(&more, 2);
        assert_eq!(w2.unique[..5], w.unique[..]);
    }

    #[test]
    fn an_error_on_either_side_stops_the_pipeline_with_that_error() {
        use crate::features::backbone::BackboneOptions;
        let dir = testkit::temp_dir("pipeline-errors");
        testkit::write_dataset(&dir, 6);
        let path = dir.join("w.safetensors");
        testkit::write_vgg_weights(&path, |_, _| None);
        let weights = Weights::open(path).expect("weights");
        let model = crate::features::backbone::Vgg16Features::load(
            &weights,
            &Device::Cpu,
            &BackboneOptions::default(),
        )
        .expect("model");
        let key = crate::features::store::example_key(32, "f32");
        let samples: Vec<Sample> = (0..6)
            .map(|i| Sample {
                id: format!("img{i:03}.png"),
                path: dir.join(format!("images/img{i:03}.png")),
                label: Some(0),
                line: i + 2,
            })
            .collect();
        let jobs: Vec<Job> = (0..3)
            .map(|b| Job {
                items: (2 * b..2 * b + 2)
                    .map(|s| (format!("{s:064x}"), s))
                    .collect(),
            })
            .collect();
        let limits = crate::data::dataset::InputLimits::default();
        let mut engine = Engine {
            model: &model,
            device: &Device::Cpu,
            prep: &key.preprocessing,
            limits: &limits,
            key: &key,
            on_bad_image: OnBadImage::Error,
            program: "test",
            views: &[View::Original],
        };
        let mut written = 0;
        let all = compute_jobs(&engine, &samples, &jobs, |c: Computed| {
            assert_eq!(c.data.len(), c.hashes.len() * key.dim * 4);
            written += 1;
            Ok(())
        })
        .expect("runs");
        assert_eq!((all.computed, written), (6, 3));
        // The writer fails on its second batch: that error, and no third write.
        let mut calls = 0;
        let err = compute_jobs(&engine, &samples, &jobs, |_: Computed| {
            calls += 1;
            match calls {
                2 => Err(Error::Cache {
                    path: "disk".into(),
                    message: "no space left".into(),
                }),
                _ => Ok(()),
            }
        })
        .expect_err("writer error");
        assert!(err.to_string().contains("no space left"), "{err}");
        assert_eq!(calls, 2);
        // The decoder meets a missing image in the third batch: that error, naming it.
        std::fs::remove_file(&samples[4].path).expect("rm");
        let mut batches = 0;
        let err = compute_jobs(&engine, &samples, &jobs, |_: Computed| {
            batches += 1;
            Ok(())
        })
        .expect_err("decode error");
        let text = err.to_string();
        assert!(
            text.contains("img004.png") && text.contains("line 6"),
            "{text}"
        );
        assert_eq!(batches, 2);
        // Skip mode: the missing image is reported, the rest computed.
        engine.on_bad_image = OnBadImage::Skip;
        let out = compute_jobs(&engine, &samples, &jobs, |_: Computed| Ok(())).expect("skips");
        assert_eq!((out.computed, out.skipped.len()), (5, 1));
        assert_eq!(out.skipped[0].0, format!("{:064x}", 4));
    }

    #[test]
    fn batches_are_partitioned_round_robin_between_tasks() {
        for b in 0..10 {
            assert!(assigned(b, None));
            let owners: Vec<usize> = (0..3).filter(|&k| assigned(b, Some((k, 3)))).collect();
            assert_eq!(owners, vec![b % 3]);
        }
        assert!(!assigned(0, Some((0, 0))));
    }
}
