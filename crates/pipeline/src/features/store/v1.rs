//! Recognising the format-1 cache (`manifest.json` + `shard-NNNNN.safetensors`, keyed by the
//! spelling of paths) so that `extract` can replace it by a format-2 store.
//!
//! A folder is a format-1 cache only when every entry is accounted for: a `manifest.json`
//! that parses as the format-1 manifest with `key.format == 1`, shards named
//! `shard-<digits>.safetensors` whose `key` metadata equals that manifest key's digest, their
//! `.tmp` siblings, and this store's own lock and marker temporaries. Any other entry makes
//! the folder foreign, and then nothing in it is touched.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::shard::{header_len, MAX_HEADER_BYTES};
use super::{is_temporary_of, remove_file, sync_dir, LOCK, MARKER};
use crate::config::{ChannelOrder, ResizeMode};
use crate::data::dataset::hex;
use crate::error::Result;

const MANIFEST: &str = "manifest.json";

/// The format-1 preprocessing record, field for field (its serialisation feeds the digest).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct V1Preprocessing {
    input_size: u32,
    input_scale: f32,
    mean: [f32; 3],
    std: [f32; 3],
    channel_order: ChannelOrder,
    resize: ResizeMode,
}

/// The format-1 cache key, field for field and in order: its compact JSON's SHA-256 is the
/// digest each format-1 shard recorded. `compute` did not exist in the first format-1 caches.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct V1Key {
    format: u32,
    dataset_fingerprint: String,
    dataset_source: String,
    classes: Vec<String>,
    rows: usize,
    backbone: String,
    weights: String,
    weights_sha256: String,
    preprocessing: V1Preprocessing,
    dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compute: Option<String>,
    shard_rows: usize,
}

#[derive(Debug, Clone, Deserialize)]
struct V1Manifest {
    key: V1Key,
    #[allow(dead_code)]
    complete: bool,
    #[allow(dead_code)]
    dim: usize,
    #[allow(dead_code)]
    count: usize,
}

impl V1Key {
    fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(&json))[..16].to_string()
    }
}

/// `shard-<digits>.safetensors`.
fn is_v1_shard(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The `key` metadata of a format-1 shard (reading only its header); `None` when it has none
/// or is not a safetensors file.
fn shard_key(path: &Path) -> Result<Option<String>> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Ok(None);
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut first8 = [0u8; 8];
    if f.read_exact(&mut first8).is_err() {
        return Ok(None);
    }
    let Ok(n) = header_len(&first8, len) else {
        return Ok(None);
    };
    let mut header = vec![0u8; n.min(MAX_HEADER_BYTES)];
    if f.read_exact(&mut header).is_err() {
        return Ok(None);
    }
    let value: serde_json::Value = match serde_json::from_slice(&header) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    Ok(value
        .get("__metadata__")
        .and_then(|m| m.get("key"))
        .and_then(|k| k.as_str())
        .map(str::to_string))
}

/// What a folder is, seen as a format-1 cache.
#[derive(Debug, Clone, PartialEq)]
pub enum V1 {
    /// No format-1 manifest.
    No,
    /// A format-1 cache and nothing else: the files to remove, the manifest last, so that an
    /// upgrade killed half-way still leaves a recognisable format-1 cache.
    Cache(Vec<PathBuf>),
    /// A format-1 manifest beside entries that are not part of its cache (listed).
    WithOthers(Vec<String>),
}

/// Classifies `dir`, whose sorted entry names are `names`.
pub fn recognise(dir: &Path, names: &[String]) -> Result<V1> {
    if !names.iter().any(|n| n == MANIFEST) {
        return Ok(V1::No);
    }
    let Ok(bytes) = std::fs::read(dir.join(MANIFEST)) else {
        return Ok(V1::No);
    };
    let Ok(manifest) = serde_json::from_slice::<V1Manifest>(&bytes) else {
        return Ok(V1::No);
    };
    if manifest.key.format != 1 {
        return Ok(V1::No);
    }
    let digest = manifest.key.digest();
    let mut files = Vec::new();
    let mut others = Vec::new();
    for name in names {
        let path = dir.join(name);
        let ours = name == MANIFEST || name == LOCK || is_temporary_of(name, MARKER);
        let ok = if ours {
            true
        } else if let Some(target) = name.strip_suffix(".tmp") {
            target == MANIFEST || is_v1_shard(target)
        } else if is_v1_shard(name) {
            path.is_file() && shard_key(&path)?.as_deref() == Some(digest.as_str())
        } else {
            false
        };
        if !ok {
            others.push(name.clone());
        } else if !ours {
            files.push(path);
        }
    }
    if !others.is_empty() {
        return Ok(V1::WithOthers(others));
    }
    files.push(dir.join(MANIFEST));
    Ok(V1::Cache(files))
}

/// Removes the recognised format-1 files (and only those).
pub fn remove(dir: &Path, files: &[PathBuf]) -> Result<()> {
    for f in files {
        remove_file(f)?;
    }
    sync_dir(dir)
}
