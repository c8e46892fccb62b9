//! The index of a space: content hash -> (shard, row), built from the shard headers alone
//! (a few KB per shard, so a few thousand shards index in well under a second), and the
//! gathering of feature rows by content hash with full, checksum-verified shard reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rayon::prelude::*;

use super::shard::{self, is_shard_name, shard_name, ShardHeader};
use super::{list_names, CacheKey, RowMap};
use crate::error::{Error, Result};

/// Where each content hash of one space is stored.
#[derive(Debug, Clone)]
pub struct Index {
    key: CacheKey,
    space: String,
    /// The space's folder.
    dir: PathBuf,
    /// Valid shards, sorted by file name.
    shards: Vec<(PathBuf, ShardHeader)>,
    /// Hash -> (shard, row); when a hash is in several shards, the first by name.
    by_hash: HashMap<String, (usize, usize)>,
}

/// A dataset's features gathered from the store, in dataset row order.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// `[views * n, dim]` f32, view-major: the `n` kept rows under the original view, then
    /// under each further view ([`crate::features::views::expand_rows`]).
    pub features: Tensor,
    /// Per kept row (`n`), as are `rows` and `ids`.
    pub labels: Vec<usize>,
    /// Dataset row of each kept row (skipped rows are absent).
    pub rows: Vec<usize>,
    pub ids: Vec<String>,
    /// The space they live in.
    pub key: CacheKey,
    pub row_map: RowMap,
    /// The views of the feature rows, original first.
    pub views: Vec<crate::features::views::View>,
}

impl Index {
    /// An index with no shards, for the space folder `dir`.
    pub fn empty(dir: &Path, key: &CacheKey) -> Self {
        Self {
            key: key.clone(),
            space: key.id(),
            dir: dir.to_owned(),
            shards: Vec::new(),
            by_hash: HashMap::new(),
        }
    }

    /// Reads every shard header in `space_dir` (in parallel); returns the index of the valid
    /// ones and the invalid ones with the reason. Files not named like shards are ignored.
    pub fn build(space_dir: &Path, key: &CacheKey) -> Result<(Self, Vec<(PathBuf, String)>)> {
        let space = key.id();
        let paths: Vec<PathBuf> = list_names(space_dir)?
            .into_iter()
            .filter(|n| is_shard_name(n))
            .map(|n| space_dir.join(n))
            .collect();
        let read: Vec<Result<std::result::Result<ShardHeader, String>>> = paths
            .par_iter()
            .map(|p| shard::read_header(p, key, &space))
            .collect();
        let mut index = Self::empty(space_dir, key);
        let mut bad = Vec::new();
        for (path, r) in paths.into_iter().zip(read) {
            match r? {
                Ok(h) => {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    if name.as_deref() != Some(shard_name(&space, &h.hashes).as_str()) {
                        bad.push((path, "its name does not match the rows it holds".into()));
                    } else {
                        index.shards.push((path, h));
                    }
                }
                Err(m) => bad.push((path, m)),
            }
        }
        index.rebuild();
        Ok((index, bad))
    }

    fn rebuild(&mut self) {
        self.by_hash.clear();
        for (s, (_, h)) in self.shards.iter().enumerate() {
            for (r, hash) in h.hashes.iter().enumerate() {
                self.by_hash.entry(hash.clone()).or_insert((s, r));
            }
        }
    }

    /// The space's key.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// The valid shards (path, header), sorted by name.
    pub fn shards(&self) -> &[(PathBuf, ShardHeader)] {
        &self.shards
    }

    /// Whether the features of `hash` are stored.
    pub fn contains(&self, hash: &str) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// (shard, row) of `hash`.
    pub fn locate(&self, hash: &str) -> Option<(usize, usize)> {
        self.by_hash.get(hash).copied()
    }

    /// Number of distinct hashes stored.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Adds a shard just written.
    pub fn add(&mut self, path: PathBuf, header: ShardHeader) {
        let s = self.shards.len();
        for (r, hash) in header.hashes.iter().enumerate() {
            self.by_hash.entry(hash.clone()).or_insert((s, r));
        }
        self.shards.push((path, header));
    }

    /// Forgets the shards at these positions (found corrupt by a full read).
    pub fn remove(&mut self, positions: &[usize]) {
        let mut i = 0;
        self.shards.retain(|_| {
            let keep = !positions.contains(&i);
            i += 1;
            keep
        });
        self.rebuild();
    }

    /// Fully reads the shards at `positions` (in parallel) and returns those that fail, with
    /// the reason (checksum, truncation, anything [`shard::decode`] refuses).
    pub fn verify(&self, positions: &[usize]) -> Vec<(usize, String)> {
        positions
            .par_iter()
            .filter_map(|&s| {
                let (path, _) = self.shards.get(s)?;
                shard::read(path, &self.key, &self.space)
                    .err()
                    .map(|e| (s, e.to_string()))
            })
            .collect()
    }

    /// The features of `hashes`, in order, as `[hashes.len() * dim]` f32. Each shard involved
    /// is read once, in full, checksum verified; a hash that is not stored is an error.
    pub fn gather(&self, hashes: &[&str]) -> Result<Vec<f32>> {
        let dim = self.key.dim;
        let mut by_shard: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        for (i, h) in hashes.iter().enumerate() {
            let (s, r) = self.locate(h).ok_or_else(|| Error::Cache {
                path: self.space_dir(),
                message: format!("no features for content hash {h}"),
            })?;
            by_shard.entry(s).or_default().push((i, r));
        }
        let mut groups: Vec<(usize, Vec<(usize, usize)>)> = by_shard.into_iter().collect();
        groups.sort_by_key(|g| g.0);
        let total = hashes.len().checked_mul(dim).ok_or_else(|| Error::Cache {
            path: self.space_dir(),
            message: "too many features to gather".into(),
        })?;
        let mut out = vec![0f32; total];
        // A few shards in flight at a time: parallel reads, bounded memory.
        let width = rayon::current_num_threads().max(1) * 2;
        for chunk in groups.chunks(width) {
            let read: Vec<Result<(ShardHeader, Vec<f32>)>> = chunk
                .par_iter()
                .map(|(s, _)| shard::read(&self.shards[*s].0, &self.key, &self.space))
                .collect();
            for ((s, rows), shard) in chunk.iter().zip(read) {
                let (header, values) = shard?;
                for &(i, r) in rows {
                    // The file must still be the one indexed (it is, unless replaced by hand).
                    let row = values.get(r * dim..(r + 1) * dim);
                    match (header.hashes.get(r), row) {
                        (Some(h), Some(row)) if h == hashes[i] => {
                            out[i * dim..(i + 1) * dim].copy_from_slice(row)
                        }
                        _ => {
                            return Err(Error::Cache {
                                path: self.shards[*s].0.clone(),
                                message: "changed since it was indexed".into(),
                            })
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn space_dir(&self) -> PathBuf {
        self.dir.clone()
    }
}
