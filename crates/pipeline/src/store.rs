//! The feature cache on disk: `manifest.json` plus `shard-NNNNN.safetensors` files, one per
//! batch of dataset rows.
//!
//! Invariants:
//! - Every file is written to a temporary sibling and renamed ([`atomic_write`]), so a file
//!   either exists whole or not at all.
//! - Each shard carries the digest of the [`CacheKey`] it was made for and the dataset rows it
//!   covers, so a resumed run keeps exactly the shards that are still valid: no row is missing
//!   or duplicated whatever moment a run was killed.
//! - The manifest says `complete: true` only after every shard is on disk.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dataset::hex;
use crate::error::{Error, IoContext, Result};
use crate::preprocess::Preprocessing;

/// Version of the on-disk layout; a cache of another version is rebuilt.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";

/// Everything the cached features depend on. Two runs with equal keys produce equal caches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    pub format: u32,
    /// SHA-256 over every row's name, label and file-content hash, in order.
    pub dataset_fingerprint: String,
    /// The CSV or root folder (informative; the fingerprint decides).
    pub dataset_source: String,
    pub classes: Vec<String>,
    /// Rows in the dataset (before skipping bad images).
    pub rows: usize,
    pub backbone: String,
    /// The configured weights (a path or `hf:` name).
    pub weights: String,
    pub weights_sha256: String,
    pub preprocessing: Preprocessing,
    /// "f32", "f16" or "bf16".
    pub dtype: String,
    /// The forward pass's arithmetic: "f32", "tf32", "f16" or "bf16".
    #[serde(default = "f32_name")]
    pub compute: String,
    /// Rows per shard (the extraction batch size).
    pub shard_rows: usize,
}

impl CacheKey {
    /// Short digest stored in every shard.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(&json))[..16].to_string()
    }

    /// Names of the fields that differ, for "inputs changed" messages.
    pub fn differences(&self, other: &CacheKey) -> Vec<&'static str> {
        let mut d = Vec::new();
        let mut check = |same: bool, name| {
            if !same {
                d.push(name);
            }
        };
        check(self.format == other.format, "format");
        check(
            self.dataset_fingerprint == other.dataset_fingerprint && self.rows == other.rows,
            "dataset",
        );
        check(self.classes == other.classes, "classes");
        check(self.backbone == other.backbone, "backbone");
        check(self.weights_sha256 == other.weights_sha256, "weights");
        check(self.preprocessing == other.preprocessing, "preprocessing");
        check(self.dtype == other.dtype, "dtype");
        check(self.compute == other.compute, "compute");
        check(self.shard_rows == other.shard_rows, "batch_size");
        d
    }

    /// Number of shards the dataset is cut into.
    pub fn shard_count(&self) -> usize {
        self.rows.div_ceil(self.shard_rows)
    }
}

/// Caches written before `compute` existed were computed in f32.
fn f32_name() -> String {
    "f32".into()
}

/// An image left out of the cache, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
}

/// `manifest.json`: what the cache holds and what it was made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: CacheKey,
    pub complete: bool,
    /// Length of one feature vector.
    pub dim: usize,
    /// Rows actually stored (dataset rows minus skipped images); set when complete.
    pub count: usize,
    pub skipped: Vec<Skipped>,
    /// The program that wrote it.
    pub written_by: String,
}

/// One shard's contents in memory.
#[derive(Debug, Clone)]
pub struct Shard {
    /// `[n, dim]`, in the cache's dtype, on the CPU.
    pub features: Tensor,
    /// Class index per row (-1 when unlabelled).
    pub labels: Vec<i64>,
    /// Dataset row index per row.
    pub rows: Vec<i64>,
    pub ids: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// A cache directory.
pub struct FeatureStore {
    pub dir: PathBuf,
}

/// The whole cache, loaded.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// `[n, dim]` f32.
    pub features: Tensor,
    pub labels: Vec<usize>,
    /// Dataset row of each feature row.
    pub rows: Vec<usize>,
    pub ids: Vec<String>,
    pub manifest: Manifest,
}

impl FeatureStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST)
    }

    pub fn shard_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("shard-{index:05}.safetensors"))
    }

    /// The manifest, `None` when absent; an unreadable one is an error.
    pub fn manifest(&self) -> Result<Option<Manifest>> {
        let path = self.manifest_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.err(format!("{MANIFEST} is unreadable: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let json = serde_json::to_vec_pretty(m).map_err(|e| self.err(e.to_string()))?;
        atomic_write(&self.manifest_path(), &json)
    }

    /// Removes every file this store could have written (never anything else), so the cache
    /// starts empty.
    pub fn clear(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name == MANIFEST
                || (name.starts_with("shard-") && name.ends_with(".safetensors"))
                || name.ends_with(".tmp");
            if ours {
                std::fs::remove_file(e.path()).at(e.path())?;
            }
        }
        Ok(())
    }

    /// Removes temporary files left by a killed run.
    pub fn remove_temporaries(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                std::fs::remove_file(e.path()).at(e.path())?;
            }
        }
        Ok(())
    }

    /// Writes one shard atomically.
    pub fn write_shard(&self, index: usize, key: &CacheKey, shard: &Shard) -> Result<()> {
        let n = shard.ids.len();
        let labels = Tensor::from_vec(shard.labels.clone(), n, &Device::Cpu)?;
        let rows = Tensor::from_vec(shard.rows.clone(), n, &Device::Cpu)?;
        let meta: HashMap<String, String> = [
            ("key", key.digest()),
            ("shard", index.to_string()),
            ("image_ids", to_json(&shard.ids)),
            ("classes", to_json(&key.classes)),
            ("skipped", to_json(&shard.skipped)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let tensors = [
            ("features", &shard.features),
            ("labels", &labels),
            ("rows", &rows),
        ];
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| self.err(format!("serialising shard {index}: {e}")))?;
        atomic_write(&self.shard_path(index), &bytes)
    }

    /// Reads a shard made for `key`; an error says what is wrong with it.
    pub fn read_shard(&self, index: usize, key: &CacheKey) -> Result<Shard> {
        let path = self.shard_path(index);
        let bytes = std::fs::read(&path).at(&path)?;
        let bad = |m: String| Error::Cache {
            path: path.clone(),
            message: m,
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("no `{k}` metadata")))
        };
        if field("key")? != key.digest() {
            return Err(bad("made from other inputs".into()));
        }
        let parse = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(&field(k)?).map_err(|e| bad(format!("`{k}`: {e}")))
        };
        let ids: Vec<String> =
            serde_json::from_value(parse("image_ids")?).map_err(|e| bad(e.to_string()))?;
        let skipped: Vec<Skipped> =
            serde_json::from_value(parse("skipped")?).map_err(|e| bad(e.to_string()))?;
        let load = |name: &str| -> Result<Tensor> {
            use candle_core::safetensors::Load;
            let view = st.tensor(name).map_err(|e| bad(format!("`{name}`: {e}")))?;
            Ok(view.load(&Device::Cpu)?)
        };
        let features = load("features")?;
        let labels = load("labels")?.to_vec1::<i64>()?;
        let rows = load("rows")?.to_vec1::<i64>()?;
        let start = index * key.shard_rows;
        let expected = key.shard_rows.min(key.rows - start);
        let n = ids.len();
        if labels.len() != n
            || rows.len() != n
            || features.dim(0)? != n
            || n + skipped.len() != expected
        {
            return Err(bad(format!(
                "holds {n} rows + {} skipped, expected {expected}",
                skipped.len()
            )));
        }
        if rows
            .iter()
            .any(|&r| r < start as i64 || r >= (start + expected) as i64)
        {
            return Err(bad("rows outside the shard's range".into()));
        }
        Ok(Shard {
            features,
            labels,
            rows,
            ids,
            skipped,
        })
    }

    /// Loads a complete cache as f32 features with labels, ids and dataset rows.
    pub fn load(&self) -> Result<FeatureSet> {
        let manifest = self.manifest()?.ok_or_else(|| {
            self.err("no feature cache here: run `cargo run -p extract` first".into())
        })?;
        if !manifest.complete {
            return Err(self.err(
                "the cache is incomplete (extraction was interrupted): run `cargo run -p extract` to finish it"
                    .into(),
            ));
        }
        let key = &manifest.key;
        let mut features = Vec::new();
        let (mut labels, mut rows, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..key.shard_count() {
            let s = self.read_shard(i, key)?;
            if s.ids.is_empty() {
                continue;
            }
            features.push(s.features.to_dtype(DType::F32)?);
            labels.extend(s.labels.iter().map(|&l| l.max(0) as usize));
            rows.extend(s.rows.iter().map(|&r| r as usize));
            ids.extend(s.ids);
        }
        if ids.len() != manifest.count || features.is_empty() {
            return Err(self.err(format!(
                "holds {} rows, the manifest says {}",
                ids.len(),
                manifest.count
            )));
        }
        let features = Tensor::cat(&features, 0)?;
        Ok(FeatureSet {
            features,
            labels,
            rows,
            ids,
            manifest,
        })
    }

    fn err(&self, message: String) -> Error {
        Error::Cache {
            path: self.dir.clone(),
            message,
        }
    }
}

/// JSON text for shard metadata (serialising these plain types cannot fail).
fn to_json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Writes `bytes` to `path` through a temporary sibling, flushed and renamed, so that `path`
/// never holds a partial file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).at(&tmp)?;
    f.write_all(bytes).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    drop(f);
    std::fs::rename(&tmp, path).at(path)
}
