//! The library's one error type. Every variant names the file, row, key or tensor it is about,
//! so a binary can print it as-is and exit non-zero.

use std::path::PathBuf;

/// Everything that can go wrong in the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML, or a value has the wrong type.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A config key (file or `--set`) is not one the pipeline knows.
    #[error("{path}: unknown config key `{key}`")]
    UnknownKey { path: PathBuf, key: String },
    /// A config value is of the right type but not acceptable.
    #[error("config key `{key}`: {message}")]
    InvalidValue { key: String, message: String },
    /// A command-line argument (or a `--set` item) could not be understood.
    #[error("{argument}: {message}")]
    Usage { argument: String, message: String },
    /// `extract`'s part (`--shard K/N`, `[extract] shard`, a Slurm array or a Kubernetes
    /// Indexed Job) is malformed; `origin` names where it came from, with the values.
    #[error("shard from {origin}: {message}")]
    Shard { origin: String, message: String },
    /// The label CSV could not be parsed.
    #[error("{path}: {message}")]
    Csv { path: PathBuf, message: String },
    /// A table (predictions, metrics) could not be built: `table` names it.
    #[error("{table} table: {message}")]
    Table { table: String, message: String },
    /// A named column is not in the CSV.
    #[error("{path}: no column `{column}` (columns: {available})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    /// A row of the dataset is wrong (empty cell, unknown label, path escaping the images dir).
    #[error("{path}, line {line}: {message}")]
    BadRow {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A dataset being scored has labels the trained run has no class for (`evaluate`).
    #[error(
        "{dataset}: {} the run {run} was not trained on: {}; its classes are [{}]",
        if unknown.len() == 1 { "a label" } else { "labels" },
        unknown.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        known.join(", ")
    )]
    UnknownClasses {
        /// The CSV or the class-folder tree.
        dataset: PathBuf,
        /// The run directory.
        run: PathBuf,
        /// The run's classes.
        known: Vec<String>,
        /// Every unknown label with where it occurs.
        unknown: Vec<UnknownLabel>,
    },
    /// The dataset has no usable rows.
    #[error("{0}: the dataset is empty")]
    EmptyDataset(PathBuf),
    /// An image file could not be read or decoded.
    #[error("image {path}: {message}")]
    BadImage { path: PathBuf, message: String },
    /// A weights file is missing a tensor, or has one of the wrong shape.
    #[error("weights {path}: tensor `{tensor}`: {message}")]
    Weights {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// A weights file could not be opened as safetensors, or found on the hub.
    #[error("weights {source_name}: {message}")]
    WeightsSource {
        source_name: String,
        message: String,
    },
    /// The feature store (or one of its files) is absent, incomplete, corrupt, or holds
    /// features of other inputs than the config names.
    #[error("feature store {path}: {message}")]
    Cache { path: PathBuf, message: String },
    /// `[extract] out` names a folder holding files the feature store did not write.
    #[error(
        "{path} is not a feature store and not empty (it holds {entries}): \
         choose an empty or new folder for `extract.out`; nothing in it was changed"
    )]
    ForeignFolder { path: PathBuf, entries: String },
    /// The store's lock stayed taken longer than `[extract] lock_timeout`.
    #[error(
        "{path}: still locked by another process after {seconds} s \
         (`extract.lock_timeout`); try again when it has finished"
    )]
    LockTimeout { path: PathBuf, seconds: u64 },
    /// A download failed: unreachable server, an HTTP error status, a transfer that kept
    /// breaking off.
    #[error("download {url}: {message}")]
    Download { url: String, message: String },
    /// A fetched archive could not be read, or holds an entry the pipeline refuses (absolute
    /// path, `..`, link).
    #[error("archive {path}: {message}")]
    Archive { path: PathBuf, message: String },
    /// Downloaded content does not have the SHA-256 it must have; `action` says what was done
    /// with it (deleted, so the next run downloads it afresh).
    #[error("{what}: SHA-256 {found}, expected {expected}; {action}")]
    Checksum {
        what: String,
        expected: String,
        found: String,
        action: String,
    },
    /// A model was given tensors of the wrong shape or type, or was built with an impossible
    /// shape (a programming or file error; `model` names the model or op).
    #[error("{model}: {message}")]
    Model { model: String, message: String },
    /// A split with no training or no validation rows.
    #[error("the split has {train} training and {val} validation rows: both sides need at least one (is the dataset too small?)")]
    EmptySplit { train: usize, val: usize },
    /// A class that only appears in validation.
    #[error("class {class} is in validation (row {row}) but has no training row: its only copies are in groups of duplicate files labelled otherwise; fix the conflicting labels")]
    ClassWithoutTraining { class: usize, row: usize },
    /// The loss became NaN or infinite.
    #[error("training diverged: the {} loss is {loss} at epoch {epoch}{} (learning rate {lr:e}): try a lower learning rate", if step.is_some() { "training" } else { "validation" }, step.map(|s| format!(", step {s}")).unwrap_or_default())]
    Diverged {
        epoch: usize,
        /// The step within the epoch; `None` for the validation loss.
        step: Option<usize>,
        loss: f64,
        lr: f64,
    },
    /// The configured device cannot be used (no CUDA build, no driver, no GPU).
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The CPU fast path rejected its input.
    #[error(transparent)]
    FastConv(#[from] fastconv::Error),
}

/// A label of a scored dataset that the trained run does not know, and where it occurs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLabel {
    pub label: String,
    pub at: LabelPlace,
}

/// Where a label occurs in a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelPlace {
    /// Lines of the label CSV (the header is line 1).
    Lines(Vec<usize>),
    /// A class folder.
    Folder(PathBuf),
}

/// Lines listed in a message before the rest are only counted.
const LINES_SHOWN: usize = 8;

impl std::fmt::Display for UnknownLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.at {
            LabelPlace::Folder(dir) => write!(f, "`{}` (folder {})", self.label, dir.display()),
            LabelPlace::Lines(lines) => {
                let shown: Vec<String> = lines
                    .iter()
                    .take(LINES_SHOWN)
                    .map(usize::to_string)
                    .collect();
                let more = match lines.len().saturating_sub(LINES_SHOWN) {
                    0 => String::new(),
                    n => format!(" and {n} more"),
                };
                let word = if lines.len() == 1 { "line" } else { "lines" };
                write!(f, "`{}` ({word} {}{more})", self.label, shown.join(", "))
            }
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
