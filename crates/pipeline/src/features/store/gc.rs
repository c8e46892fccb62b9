//! `extract --gc`: deletes the shards no row map references, under the exclusive lock.
//!
//! What is kept: every row map under `datasets/` (one per dataset source and space, replaced by
//! each extraction of that source; predict inputs have theirs), and every shard holding at
//! least one content hash some row map of its space lists (under any of the views that row map
//! records: see [`super::RowMap::row_keys`]). What is deleted: shards none of
//! whose rows is referenced, invalid shards (they would be recomputed anyway), stale
//! temporaries, and the `space.json` and folder of a space left with no shard and no row map.
//! Nothing is deleted that lacks the store's naming patterns; other files are listed and left
//! alone. An unreadable row map stops gc before anything is deleted: without it, gc cannot
//! know what is referenced.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use super::shard::{is_shard_name, read_header, shard_name};
use super::{
    is_hex, list_names, remove_file, sync_dir, temporary_target, CacheKey, Store, DATASETS, SPACES,
    SPACE_FILE,
};
use crate::error::{Error, Result};

/// What gc did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    /// Files deleted (shards, temporaries, empty spaces' descriptions).
    pub freed_files: usize,
    pub freed_bytes: u64,
    /// Shards deleted (of `freed_files`).
    pub freed_shards: usize,
    pub kept_shards: usize,
    pub kept_bytes: u64,
    /// Row maps that decided what is referenced.
    pub row_maps: usize,
    /// Files in the store's folders that it did not write (left alone).
    pub left_alone: Vec<PathBuf>,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gc: freed {} files ({} shards, {}), kept {} shards ({}) referenced by {} row maps",
            self.freed_files,
            self.freed_shards,
            human_bytes(self.freed_bytes),
            self.kept_shards,
            human_bytes(self.kept_bytes),
            self.row_maps
        )?;
        if !self.left_alone.is_empty() {
            write!(
                f,
                "; left alone {} files the store did not write",
                self.left_alone.len()
            )?;
        }
        Ok(())
    }
}

/// "12.3 MB", "512 B".
pub fn human_bytes(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        _ => format!("{:.2} GB", b as f64 / 1e9),
    }
}

/// Deletes one of the store's files and counts it.
fn free(path: PathBuf, shard: bool, report: &mut GcReport) -> Result<()> {
    let bytes = size(&path);
    remove_file(&path)?;
    report.freed_files += 1;
    report.freed_bytes += bytes;
    if shard {
        report.freed_shards += 1;
    }
    Ok(())
}

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Runs gc on a store opened with the exclusive lock.
pub fn run(store: &Store, program: &str) -> Result<GcReport> {
    if !store.exclusive() {
        return Err(Error::Cache {
            path: store.dir().to_owned(),
            message: "gc needs the exclusive lock".into(),
        });
    }
    let maps = store.row_maps()?;
    // Every view's rows count (a view's row key is derived from the image's hash).
    let mut referenced: HashMap<&str, HashSet<String>> = HashMap::new();
    for (_, m) in &maps {
        let set = referenced.entry(m.space.as_str()).or_default();
        set.extend(m.row_keys());
    }
    let mut report = GcReport {
        row_maps: maps.len(),
        ..GcReport::default()
    };
    let spaces_dir = store.dir().join(SPACES);
    for space in list_names(&spaces_dir)? {
        let dir = spaces_dir.join(&space);
        if !is_hex(&space, 16) || !dir.is_dir() {
            report.left_alone.push(dir);
            continue;
        }
        let key_path = dir.join(SPACE_FILE);
        let key = match std::fs::read(&key_path) {
            Ok(bytes) => Some(CacheKey::from_json(&bytes, &key_path)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Error::Io {
                    path: key_path,
                    source: e,
                })
            }
        };
        let wanted = referenced.get(space.as_str());
        let mut kept = 0;
        for name in list_names(&dir)? {
            let path = dir.join(&name);
            if name == SPACE_FILE {
                continue;
            }
            if temporary_target(&name).is_some_and(|t| t == SPACE_FILE || is_shard_name(t)) {
                free(path, false, &mut report)?;
                continue;
            }
            if !is_shard_name(&name) {
                report.left_alone.push(path);
                continue;
            }
            let Some(key) = &key else {
                // Without its space description a shard cannot be checked: keep it.
                eprintln!(
                    "{program}: {} has no {SPACE_FILE}: keeping its shards",
                    dir.display()
                );
                kept += 1;
                report.kept_shards += 1;
                report.kept_bytes += size(&path);
                continue;
            };
            let header = match read_header(&path, key, &space)? {
                Ok(h) if shard_name(&space, &h.hashes) == name => h,
                Ok(_) | Err(_) => {
                    free(path, true, &mut report)?;
                    continue;
                }
            };
            let used = wanted.is_some_and(|w| header.hashes.iter().any(|h| w.contains(h.as_str())));
            if used {
                kept += 1;
                report.kept_shards += 1;
                report.kept_bytes += header.file_len() as u64;
            } else {
                free(path, true, &mut report)?;
            }
        }
        if kept == 0 && wanted.is_none() && key.is_some() {
            free(key_path, false, &mut report)?;
            // Only succeeds when nothing else is left in the folder.
            let _ = std::fs::remove_dir(&dir);
        }
        sync_dir(&dir).or_else(|_| sync_dir(&spaces_dir))?;
    }
    let datasets = store.dir().join(DATASETS);
    for name in list_names(&datasets)? {
        if temporary_target(&name)
            .is_some_and(|t| t.strip_suffix(".json").is_some_and(|v| is_hex(v, 16)))
        {
            free(datasets.join(name), false, &mut report)?;
        } else if !name.strip_suffix(".json").is_some_and(|v| is_hex(v, 16)) {
            report.left_alone.push(datasets.join(name));
        }
    }
    Ok(report)
}
