//! The feature store: frozen-backbone features addressed by content, not by file name.
//!
//! Layout under `[extract] out` (format 2):
//!
//! ```text
//! STORE.json                         marker: {"kind": "vehicle-transfer feature store", "format": 2}
//! .lock                              advisory lock (exclusive: extract, gc; shared: readers)
//! spaces/<space-id>/space.json       the CacheKey: backbone, weights SHA-256, preprocessing,
//!                                    stored dtype, compute precision, feature dim
//! spaces/<space-id>/shard-<32 hex>.safetensors
//!                                    up to one batch of feature rows + each row's content hash
//! datasets/<view-id>.json            a row map: per dataset row, its id, label and content hash
//! ```
//!
//! An image's features are found by (space, SHA-256 of the image's bytes); a dataset is a row
//! map onto them. So the spelling of paths, the working directory, appended rows, duplicates
//! and removed rows never cost a recomputation.
//!
//! Invariants:
//! - A folder is the store's only when it holds the marker (or is empty, or holds the old
//!   format-1 layout, which is recognised file by file and replaced). The store only ever
//!   deletes files whose names follow its own patterns, and only under the exclusive lock.
//! - Every file is written to a uniquely named temporary sibling, fsynced, renamed, and the
//!   folder fsynced ([`atomic_write`]): a file exists whole or not at all, whatever moment a
//!   process is killed, and two writers of the same file never share a temporary.
//! - A shard's name is a digest of its space and its rows' content hashes in order, and its
//!   bytes are a function of the same inputs: identical work gives identical names and bytes.
//! - Every field read back is validated ([`shard`], [`rowmap`], [`CacheKey::from_json`]); a
//!   corrupt or hostile file is an [`Error::Cache`] naming it, never a panic.

pub mod gc;
pub mod index;
pub mod lock;
pub mod rowmap;
pub mod shard;
pub mod v1;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ChannelOrder;
use crate::data::dataset::hex;
use crate::data::preprocess::Preprocessing;
use crate::error::{Error, IoContext, Result};

pub use gc::GcReport;
pub use index::{FeatureSet, Index};
pub use lock::{LockKind, StoreLock};
pub use rowmap::{Counts, Row, RowMap};
pub use shard::ShardHeader;

/// Version of the on-disk layout written by this program.
pub const FORMAT_VERSION: u32 = 2;
/// The marker file that makes a folder a store.
pub const MARKER: &str = "STORE.json";
/// The `kind` the marker names.
pub const MARKER_KIND: &str = "vehicle-transfer feature store";
/// The advisory lock file.
pub const LOCK: &str = ".lock";
/// Folder of the spaces.
pub const SPACES: &str = "spaces";
/// Folder of the row maps.
pub const DATASETS: &str = "datasets";
/// A space's description inside its folder.
pub const SPACE_FILE: &str = "space.json";
/// Suffix of every temporary file (`<final name>.<pid>-<n>.tmp`).
pub const TMP_SUFFIX: &str = ".tmp";

/// The stored feature types.
pub const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];
/// The compute precisions.
pub const COMPUTES: [&str; 4] = ["f32", "tf32", "f16", "bf16"];

/// A feature space: everything an image's features depend on besides its bytes. Images with
/// equal content in equal spaces have equal features; the space id names its folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKey {
    /// The store format ([`FORMAT_VERSION`]).
    pub format: u32,
    /// "vgg16".
    pub backbone: String,
    /// SHA-256 of the weights file (the spelling of its path is not part of the key).
    pub weights_sha256: String,
    pub preprocessing: Preprocessing,
    /// The stored type: "f32", "f16" or "bf16".
    pub dtype: String,
    /// The forward pass's arithmetic: "f32", "tf32", "f16" or "bf16".
    pub compute: String,
    /// Length of one feature vector.
    pub dim: usize,
    /// Which activations: the backbone's output (the default, left out of the JSON so that
    /// the ids of existing spaces stay as they were) or VGG16's block-4 pool (`"pool4"`, what
    /// a fine-tuned block 5 reads).
    #[serde(default, skip_serializing_if = "Layer::is_output")]
    pub layer: Layer,
}

/// The activations a space stores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// The backbone's feature vector (VGG16: pool5, flattened).
    #[default]
    Output,
    /// VGG16's block-4 max-pool output, `[512, s/16, s/16]` flattened in C,H,W order.
    Pool4,
}

impl Layer {
    /// Whether this is the default (not written to `space.json`).
    pub fn is_output(&self) -> bool {
        *self == Layer::Output
    }

    /// Length of one stored row for `backbone` at input side `size`; `None` where the layer
    /// does not exist for that backbone (pool4 is VGG16's).
    pub fn dim(&self, backbone: &str, size: u32) -> Option<usize> {
        match self {
            Layer::Output => crate::features::backbone::spec(backbone)
                .ok()
                .map(|b| (b.feature_dim)(size)),
            Layer::Pool4 => (backbone == "vgg16").then(|| 512 * (size as usize / 16).pow(2)),
        }
    }
}

/// The subset of a head run's `cache_key.json` that `predict` needs; runs trained on a
/// format-1 cache wrote a larger key without `dim`, runs of this version write a [`CacheKey`].
#[derive(Debug, Clone, Deserialize)]
struct RunKey {
    backbone: String,
    weights_sha256: String,
    preprocessing: Preprocessing,
    dtype: String,
    #[serde(default = "f32_name")]
    compute: String,
    #[serde(default)]
    layer: Layer,
}

/// Format-1 keys written before `compute` existed were computed in f32.
fn f32_name() -> String {
    "f32".into()
}

impl CacheKey {
    /// The space id: the first 16 hex digits of the SHA-256 of the canonical JSON (fields in
    /// declaration order, compact).
    pub fn id(&self) -> String {
        hex(&Sha256::digest(self.canonical_json()))[..16].to_string()
    }

    /// The canonical JSON text (what `space.json` holds, what the id hashes).
    pub fn canonical_json(&self) -> Vec<u8> {
        // Plain strings, numbers and arrays: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Names of the fields that differ, for "made from other inputs" messages.
    pub fn differences(&self, other: &CacheKey) -> Vec<&'static str> {
        let mut d = Vec::new();
        let mut check = |same: bool, name| {
            if !same {
                d.push(name);
            }
        };
        check(self.format == other.format, "format");
        check(self.backbone == other.backbone, "backbone");
        check(self.weights_sha256 == other.weights_sha256, "weights");
        check(self.preprocessing == other.preprocessing, "preprocessing");
        check(self.dtype == other.dtype, "dtype");
        check(self.compute == other.compute, "compute");
        check(self.dim == other.dim, "dim");
        check(self.layer == other.layer, "layer");
        d
    }

    /// The candle type of the stored features.
    pub fn store_dtype(&self) -> candle_core::DType {
        match self.dtype.as_str() {
            "f16" => candle_core::DType::F16,
            "bf16" => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        }
    }

    /// Bytes per stored feature value.
    pub fn value_bytes(&self) -> usize {
        if self.dtype == "f32" {
            4
        } else {
            2
        }
    }

    /// Every field checked: a key read from disk is trusted only after this.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT_VERSION {
            return Err(format!(
                "format {} (this program reads {FORMAT_VERSION})",
                self.format
            ));
        }
        if crate::features::backbone::spec(&self.backbone).is_err() {
            return Err(format!("unknown backbone `{}`", self.backbone));
        }
        if !is_hex(&self.weights_sha256, 64) {
            return Err("`weights_sha256` is not 64 hex digits".into());
        }
        if !DTYPES.contains(&self.dtype.as_str()) {
            return Err(format!("unknown dtype `{}`", self.dtype));
        }
        if !COMPUTES.contains(&self.compute.as_str()) {
            return Err(format!("unknown compute `{}`", self.compute));
        }
        let p = &self.preprocessing;
        if !(32..=MAX_INPUT_SIZE).contains(&p.input_size) {
            return Err(format!(
                "input_size {} outside 32..={MAX_INPUT_SIZE}",
                p.input_size
            ));
        }
        let numbers = [p.input_scale]
            .into_iter()
            .chain(p.mean)
            .chain(p.std)
            .all(f32::is_finite);
        if !numbers || p.std.contains(&0.0) {
            return Err("preprocessing numbers must be finite, std non-zero".into());
        }
        let Some(expected) = self.layer.dim(&self.backbone, p.input_size) else {
            return Err(format!(
                "layer {:?} does not exist in backbone `{}`",
                self.layer, self.backbone
            ));
        };
        if self.dim != expected {
            return Err(format!(
                "dim {} but input_size {} gives {expected}",
                self.dim, p.input_size
            ));
        }
        Ok(())
    }

    /// Parses and validates `space.json` bytes; errors name `path`.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |m: String| Error::Cache {
            path: path.to_owned(),
            message: m,
        };
        let key: CacheKey = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        key.validate().map_err(bad)?;
        Ok(key)
    }

    /// The space a head run was trained in, from its `cache_key.json` (this version's
    /// [`CacheKey`] or a format-1 cache key).
    pub fn from_run_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |m: String| Error::Cache {
            path: path.to_owned(),
            message: m,
        };
        let k: RunKey = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        crate::features::backbone::spec(&k.backbone).map_err(|e| bad(e.to_string()))?;
        let dim = k
            .layer
            .dim(&k.backbone, k.preprocessing.input_size)
            .ok_or_else(|| bad(format!("no layer {:?} in `{}`", k.layer, k.backbone)))?;
        let key = CacheKey {
            format: FORMAT_VERSION,
            backbone: k.backbone,
            weights_sha256: k.weights_sha256,
            preprocessing: k.preprocessing,
            dtype: k.dtype,
            compute: k.compute,
            dim,
            layer: k.layer,
        };
        key.validate().map_err(bad)?;
        Ok(key)
    }
}

/// Largest input side a stored space may name (keeps `dim` and allocations bounded).
pub const MAX_INPUT_SIZE: u32 = 8192;

/// Whether `s` is exactly `len` lower-case hex digits.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The marker file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    pub kind: String,
    pub format: u32,
}

impl Marker {
    /// This version's marker.
    pub fn current() -> Self {
        Self {
            kind: MARKER_KIND.into(),
            format: FORMAT_VERSION,
        }
    }

    /// Parses marker bytes: `Ok(format)` for a store marker, an error naming `path` otherwise.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<u32> {
        let bad = |m: String| Error::Cache {
            path: path.to_owned(),
            message: m,
        };
        let m: Marker = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a feature store marker: {e}")))?;
        if m.kind != MARKER_KIND {
            return Err(bad(format!(
                "not a feature store marker (kind `{}`)",
                m.kind
            )));
        }
        Ok(m.format)
    }
}

/// What a folder holds, before the store touches it.
#[derive(Debug, Clone, PartialEq)]
pub enum Folder {
    /// Nothing there yet.
    Absent,
    /// Empty (or only this store's lock / temporaries from a killed first run).
    Empty,
    /// A store of this format.
    Ours,
    /// The format-1 cache; the files to remove when upgrading it.
    V1(Vec<PathBuf>),
    /// Something else: the first few entries, for the message.
    Foreign(Vec<String>),
}

/// How many foreign entries an error lists.
const FOREIGN_LISTED: usize = 5;

/// Looks at `dir` without changing anything.
pub fn inspect(dir: &Path) -> Result<Folder> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Folder::Absent),
        Err(e) => {
            if dir.exists() && !dir.is_dir() {
                return Err(Error::Cache {
                    path: dir.to_owned(),
                    message: "is a file, not a folder: choose a folder for `extract.out`".into(),
                });
            }
            return Err(Error::Io {
                path: dir.to_owned(),
                source: e,
            });
        }
    };
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        let e = e.at(dir)?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    if names.iter().any(|n| n == MARKER) {
        let path = dir.join(MARKER);
        let bytes = std::fs::read(&path).at(&path)?;
        let format = Marker::parse(&bytes, &path)?;
        if format != FORMAT_VERSION {
            return Err(Error::Cache {
                path,
                message: format!(
                    "a feature store of format {format}; this program reads format {FORMAT_VERSION}"
                ),
            });
        }
        return Ok(Folder::Ours);
    }
    let leftover = |n: &String| n == LOCK || is_temporary_of(n, MARKER);
    if names.iter().all(leftover) {
        return Ok(Folder::Empty);
    }
    match v1::recognise(dir, &names)? {
        v1::V1::Cache(files) => return Ok(Folder::V1(files)),
        // What keeps it from being a format-1 cache is what the user must see.
        v1::V1::WithOthers(others) => {
            return Ok(Folder::Foreign(
                others.into_iter().take(FOREIGN_LISTED + 1).collect(),
            ))
        }
        v1::V1::No => {}
    }
    let foreign: Vec<String> = names
        .into_iter()
        .filter(|n| !leftover(n))
        .take(FOREIGN_LISTED + 1)
        .collect();
    Ok(Folder::Foreign(foreign))
}

/// The error for a folder with content that is not the store's.
pub(crate) fn foreign_error(dir: &Path, entries: &[String]) -> Error {
    let mut listed: Vec<String> = entries.iter().take(FOREIGN_LISTED).cloned().collect();
    if entries.len() > FOREIGN_LISTED {
        listed.push("...".into());
    }
    Error::ForeignFolder {
        path: dir.to_owned(),
        entries: listed.join(", "),
    }
}

/// An open store, with its lock held for as long as it lives.
pub struct Store {
    dir: PathBuf,
    lock: StoreLock,
}

impl Store {
    /// Opens `dir` for writing with the exclusive lock (waiting for it, at most `timeout`),
    /// making it a store when it is absent or empty and upgrading the format-1 layout. A
    /// folder with other content is [`Error::ForeignFolder`], and nothing in it is touched.
    pub fn open_exclusive(dir: &Path, timeout: Option<Duration>, program: &str) -> Result<Self> {
        match inspect(dir)? {
            Folder::Foreign(entries) => return Err(foreign_error(dir, &entries)),
            Folder::Absent | Folder::Empty => {
                // (`atomic_write` creates the folder, fsyncing its parent.)
                // Written before the lock exists, so that a kill at any later moment leaves a
                // folder that is recognisably ours. Two first runs write identical bytes.
                write_marker(dir)?;
            }
            Folder::Ours | Folder::V1(_) => {}
        }
        let lock = StoreLock::acquire(dir, LockKind::Exclusive, timeout, program)?;
        // Another process may have changed the folder while this one waited.
        match inspect(dir)? {
            Folder::Ours => {}
            Folder::Absent | Folder::Empty => write_marker(dir)?,
            Folder::V1(files) => {
                eprintln!(
                    "{program}: old feature cache (format 1) in {}: rebuilding it in format {FORMAT_VERSION}",
                    dir.display()
                );
                v1::remove(dir, &files)?;
                write_marker(dir)?;
            }
            Folder::Foreign(entries) => return Err(foreign_error(dir, &entries)),
        }
        let store = Self {
            dir: dir.to_owned(),
            lock,
        };
        store.remove_temporaries()?;
        Ok(store)
    }

    /// Opens an existing store for reading (and content-addressed shard writes) with the
    /// shared lock: `None` when `dir` does not exist or is empty. A folder that is not a
    /// store is [`Error::ForeignFolder`].
    pub fn open_shared(
        dir: &Path,
        timeout: Option<Duration>,
        program: &str,
    ) -> Result<Option<Self>> {
        match inspect(dir)? {
            Folder::Absent | Folder::Empty => return Ok(None),
            Folder::V1(_) => {
                return Err(Error::Cache {
                    path: dir.to_owned(),
                    message: format!(
                        "an old feature cache (format 1): run `cargo run -p extract` to rebuild it in format {FORMAT_VERSION}"
                    ),
                })
            }
            Folder::Foreign(entries) => return Err(foreign_error(dir, &entries)),
            Folder::Ours => {}
        }
        let lock = StoreLock::acquire(dir, LockKind::Shared, timeout, program)?;
        Ok(Some(Self {
            dir: dir.to_owned(),
            lock,
        }))
    }

    /// Opens `dir` for adding shards with the shared lock (`extract --shard K/N`: many tasks at
    /// once, none deleting anything), making it a store when it is absent or empty. A folder
    /// with other content is [`Error::ForeignFolder`]; a format-1 cache must be upgraded by an
    /// unsharded `extract` first (that deletes files, which needs the exclusive lock).
    pub fn open_shared_writable(
        dir: &Path,
        timeout: Option<Duration>,
        program: &str,
    ) -> Result<Self> {
        let check = |dir: &Path| -> Result<()> {
            match inspect(dir)? {
                Folder::Ours => Ok(()),
                // Tasks starting together write identical marker bytes.
                Folder::Absent | Folder::Empty => write_marker(dir),
                Folder::V1(_) => Err(Error::Cache {
                    path: dir.to_owned(),
                    message: format!(
                        "an old feature cache (format 1): run `extract` once without a shard to \
                         rebuild it in format {FORMAT_VERSION}"
                    ),
                }),
                Folder::Foreign(entries) => Err(foreign_error(dir, &entries)),
            }
        };
        check(dir)?;
        let lock = StoreLock::acquire(dir, LockKind::Shared, timeout, program)?;
        // An exclusive holder may have changed the folder while this one waited.
        check(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            lock,
        })
    }

    /// The store's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this handle holds the exclusive lock.
    pub fn exclusive(&self) -> bool {
        self.lock.kind() == LockKind::Exclusive
    }

    /// The folder of a space.
    pub fn space_dir(&self, space: &str) -> PathBuf {
        self.dir.join(SPACES).join(space)
    }

    /// The path of a row map.
    pub fn row_map_path(&self, view: &str) -> PathBuf {
        self.dir.join(DATASETS).join(format!("{view}.json"))
    }

    /// Writes the space's `space.json` unless it is there already; an existing one must
    /// describe the same space.
    pub fn ensure_space(&self, key: &CacheKey) -> Result<()> {
        let path = self.space_dir(&key.id()).join(SPACE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let found = CacheKey::from_json(&bytes, &path)?;
                if found != *key {
                    return Err(Error::Cache {
                        path,
                        message: format!(
                            "describes another space ({} differ)",
                            found.differences(key).join(", ")
                        ),
                    });
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                atomic_write(&path, &key.canonical_json())
            }
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    /// The spaces in the store with their keys (a space folder without a valid `space.json`
    /// is an error naming it).
    pub fn spaces(&self) -> Result<Vec<(String, CacheKey)>> {
        let mut out = Vec::new();
        for name in list_names(&self.dir.join(SPACES))? {
            if !is_hex(&name, 16) {
                continue;
            }
            let path = self.space_dir(&name).join(SPACE_FILE);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // A space folder made by a run killed before it wrote space.json.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::Io { path, source: e }),
            };
            let key = CacheKey::from_json(&bytes, &path)?;
            if key.id() != name {
                return Err(Error::Cache {
                    path,
                    message: format!("describes space {}, not {name}", key.id()),
                });
            }
            out.push((name, key));
        }
        Ok(out)
    }

    /// Reads the index of a space: every shard header, validated. With the exclusive lock,
    /// invalid shards are deleted (they are the store's own files, and will be recomputed);
    /// with the shared lock they are left alone and ignored. Each one is reported.
    pub fn index(&self, key: &CacheKey, program: &str) -> Result<Index> {
        let (index, bad) = Index::build(&self.space_dir(&key.id()), key)?;
        for (path, reason) in bad {
            if self.exclusive() {
                eprintln!(
                    "{program}: removing invalid shard {}: {reason}",
                    path.display()
                );
                remove_file(&path)?;
            } else {
                eprintln!(
                    "{program}: ignoring invalid shard {}: {reason}",
                    path.display()
                );
            }
        }
        Ok(index)
    }

    /// Writes one shard (features `[hashes.len(), key.dim]` as raw little-endian bytes of
    /// `key.dtype`); returns its path and header. Identical inputs give the same name and bytes,
    /// so a concurrent writer of the same shard is harmless.
    pub fn write_shard(
        &self,
        key: &CacheKey,
        hashes: Vec<String>,
        data: &[u8],
    ) -> Result<(PathBuf, ShardHeader)> {
        let space = key.id();
        let (name, bytes, header) =
            shard::encode(key, &space, hashes, data).map_err(|m| Error::Cache {
                path: self.space_dir(&space),
                message: m,
            })?;
        let path = self.space_dir(&space).join(name);
        atomic_write(&path, &bytes)?;
        Ok((path, header))
    }

    /// Deletes one shard that failed a full read (exclusive lock only).
    pub fn remove_shard(&self, path: &Path) -> Result<()> {
        if !self.exclusive() {
            return Ok(());
        }
        let ours = path.parent().is_some_and(|p| p.starts_with(&self.dir))
            && path
                .file_name()
                .is_some_and(|n| shard::is_shard_name(&n.to_string_lossy()));
        if ours {
            remove_file(path)?;
        }
        Ok(())
    }

    /// The row map of `view`, `None` when there is none.
    pub fn read_row_map(&self, view: &str) -> Result<Option<RowMap>> {
        let path = self.row_map_path(view);
        match std::fs::read(&path) {
            Ok(bytes) => RowMap::from_json(&bytes, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    /// Writes the row map of `view`.
    pub fn write_row_map(&self, view: &str, map: &RowMap) -> Result<()> {
        atomic_write(&self.row_map_path(view), &map.to_json())
    }

    /// Every row map in the store, with its view id (an unreadable one is an error naming it).
    pub fn row_maps(&self) -> Result<Vec<(String, RowMap)>> {
        let dir = self.dir.join(DATASETS);
        let mut out = Vec::new();
        for name in list_names(&dir)? {
            let Some(view) = name.strip_suffix(".json").filter(|v| is_hex(v, 16)) else {
                continue;
            };
            let path = dir.join(&name);
            let bytes = std::fs::read(&path).at(&path)?;
            out.push((view.to_string(), RowMap::from_json(&bytes, &path)?));
        }
        Ok(out)
    }

    /// Deletes shards no row map references (see [`gc`]); exclusive lock only.
    pub fn gc(&self, program: &str) -> Result<GcReport> {
        gc::run(self, program)
    }

    /// Removes temporaries left by killed runs: only names of the form
    /// `<store file>.<pid>-<n>.tmp`, only where the store writes, only with the exclusive lock
    /// (a writer holding the shared lock may be writing one right now).
    fn remove_temporaries(&self) -> Result<()> {
        if !self.exclusive() {
            return Ok(());
        }
        let root = self.dir.clone();
        for name in list_names(&root)? {
            if is_temporary_of(&name, MARKER) {
                remove_file(&root.join(name))?;
            }
        }
        let datasets = root.join(DATASETS);
        for name in list_names(&datasets)? {
            if temporary_target(&name)
                .is_some_and(|t| t.strip_suffix(".json").is_some_and(|v| is_hex(v, 16)))
            {
                remove_file(&datasets.join(name))?;
            }
        }
        for space in list_names(&root.join(SPACES))? {
            if !is_hex(&space, 16) {
                continue;
            }
            let dir = root.join(SPACES).join(&space);
            for name in list_names(&dir)? {
                if temporary_target(&name)
                    .is_some_and(|t| t == SPACE_FILE || shard::is_shard_name(t))
                {
                    remove_file(&dir.join(name))?;
                }
            }
        }
        Ok(())
    }
}

fn write_marker(dir: &Path) -> Result<()> {
    let bytes = serde_json::to_vec(&Marker::current()).unwrap_or_default();
    atomic_write(&dir.join(MARKER), &bytes)
}

/// The names in a folder, sorted; none when it does not exist.
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                path: dir.to_owned(),
                source: e,
            })
        }
    };
    let mut names = Vec::new();
    for e in entries {
        names.push(e.at(dir)?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// The final name a temporary stands for: `x.json.123-4.tmp` -> `x.json`.
pub fn temporary_target(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(TMP_SUFFIX)?;
    let (target, tag) = stem.rsplit_once('.')?;
    let (pid, n) = tag.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n)).then_some(target)
}

fn is_temporary_of(name: &str, target: &str) -> bool {
    temporary_target(name) == Some(target)
}

/// Numbers the temporaries of this process, so two threads never share one.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The number in the next temporary's name: a random per-process start plus a counter, so
/// that processes on different machines sharing the store (where pids coincide: containers'
/// processes often all have pid 1) do not pick the same temporary either.
fn tmp_serial() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // `RandomState` is seeded from the operating system's random source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        // Below 2^63, so the counter cannot wrap for the life of a process.
        h.finish() >> 1
    });
    start + TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Writes `bytes` to `path` atomically: a uniquely named temporary sibling
/// (`<name>.<pid>-<n>.tmp`) is written and fsynced, renamed over `path`, and the folder is
/// fsynced so the rename itself survives a crash. `path` never holds a partial file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        // New folders must survive a crash too: fsync the parent of each one created.
        let mut existing = dir.as_path();
        while let Some(parent) = existing.parent().filter(|_| !existing.is_dir()) {
            existing = parent;
        }
        std::fs::create_dir_all(&dir).at(&dir)?;
        let mut created: Vec<&Path> = dir.ancestors().take_while(|a| *a != existing).collect();
        created.reverse();
        for d in created {
            if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
    }
    let n = tmp_serial();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}-{n}{TMP_SUFFIX}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // `create_new`: should another writer ever pick the same name, fail (leaving its file
    // alone) rather than share the file.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .at(&tmp)?;
    let written = (|| {
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)
    })();
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io {
            path: path.to_owned(),
            source: e,
        });
    }
    sync_dir(&dir)
}

/// fsyncs a folder, so renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
    }
    #[cfg(not(unix))]
    {
        // Windows cannot open a folder as a file; NTFS journals renames.
        let _ = dir;
        Ok(())
    }
}

/// A space key for tests and examples: VGG16 at `input_size`, Oxford preprocessing.
pub fn example_key(input_size: u32, dtype: &str) -> CacheKey {
    CacheKey {
        format: FORMAT_VERSION,
        backbone: "vgg16".into(),
        weights_sha256: "0".repeat(64),
        preprocessing: Preprocessing {
            input_size,
            input_scale: 255.0,
            mean: [123.68, 116.779, 103.939],
            std: [1.0, 1.0, 1.0],
            channel_order: ChannelOrder::Rgb,
            resize: crate::config::ResizeMode::Squash,
        },
        dtype: dtype.into(),
        compute: "f32".into(),
        dim: crate::features::backbone::Vgg16Features::feature_dim(input_size),
        layer: Layer::Output,
    }
}
