//! Row maps (`datasets/<view-id>.json`): how a dataset's rows map onto content-addressed
//! features. One row map per view: a (kind, source, space) triple, where the source is the
//! canonical path of the label CSV and image folder (or the class-folder root, or predict's
//! input). A later extraction of the same source in the same space replaces it.
//!
//! The row map holds no times: two extractions of the same inputs write identical bytes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::shard::MAX_SHARD_ROWS;
use super::{is_hex, FORMAT_VERSION};
use crate::data::dataset::hex;
use crate::error::{Error, Result};
use crate::features::views::{is_original_only, row_key, View};

/// Row maps of labelled datasets (`extract`).
pub const KIND_DATASET: &str = "dataset";
/// Row maps of `predict` inputs (unlabelled), so that `--gc` keeps their features.
pub const KIND_PREDICT: &str = "predict";

/// One dataset row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    /// The name the user knows the image by (CSV cell, `class/file`).
    pub id: String,
    /// Class index (labelled datasets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<usize>,
    /// SHA-256 of the image's bytes; absent when the file could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Why the image has no features (`on_bad_image = "skip"`); absent for stored rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Counts derived from the rows (checked on read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    /// Rows of the dataset.
    pub rows: usize,
    /// Distinct content hashes among them.
    pub unique: usize,
    /// Rows with features (rows minus skipped).
    pub stored: usize,
    /// Rows left out as bad images.
    pub skipped: usize,
}

/// A dataset view's row map. Field order is the serialised order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowMap {
    pub format: u32,
    /// [`KIND_DATASET`] or [`KIND_PREDICT`].
    pub kind: String,
    /// Canonical description of where the rows come from (information, and part of the view).
    pub source: String,
    /// The space id the features live in.
    pub space: String,
    /// The weights as configured (information only: the space holds their SHA-256).
    pub weights: String,
    /// Class names in index order (empty for predict inputs).
    pub classes: Vec<String>,
    /// Unique images per planned batch.
    pub batch_size: usize,
    /// SHA-256 over the classes and every row's (id, label, hash): equal fingerprints mean
    /// the same dataset.
    pub fingerprint: String,
    /// The augmented views extracted of every row ([`crate::features::views`]): "original"
    /// first. Left out of the file when it is the original view alone, so a store without
    /// views is written exactly as before views existed.
    #[serde(
        default = "crate::features::views::original_only",
        skip_serializing_if = "is_original_only"
    )]
    pub views: Vec<String>,
    /// True once every row's features are stored or its skip reason is recorded.
    pub complete: bool,
    pub counts: Counts,
    pub rows: Vec<Row>,
    /// The program that wrote it.
    pub written_by: String,
}

/// The id of a view: 16 hex digits of SHA-256 over (kind, source, space).
pub fn view_id(kind: &str, source: &str, space: &str) -> String {
    let text = serde_json::to_vec(&(kind, source, space)).unwrap_or_default();
    hex(&Sha256::digest(text))[..16].to_string()
}

/// The fingerprint of (classes, rows): only ids, labels and hashes count, not skip reasons.
pub fn fingerprint(classes: &[String], rows: &[Row]) -> String {
    let mut d = Sha256::new();
    d.update(serde_json::to_vec(classes).unwrap_or_default());
    d.update(b"\n");
    for r in rows {
        d.update(serde_json::to_vec(&(&r.id, r.label, &r.hash)).unwrap_or_default());
        d.update(b"\n");
    }
    hex(&d.finalize())
}

/// The counts the rows imply.
pub fn count(rows: &[Row]) -> Counts {
    let unique: HashSet<&str> = rows.iter().filter_map(|r| r.hash.as_deref()).collect();
    let skipped = rows.iter().filter(|r| r.skipped.is_some()).count();
    Counts {
        rows: rows.len(),
        unique: unique.len(),
        stored: rows.len() - skipped,
        skipped,
    }
}

impl RowMap {
    /// Compact canonical JSON plus a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and validates row-map bytes; errors name `path`.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |m: String| Error::Cache {
            path: path.to_owned(),
            message: m,
        };
        let map: RowMap = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        map.validate().map_err(bad)?;
        Ok(map)
    }

    /// Every field checked against the others.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT_VERSION {
            return Err(format!(
                "format {} (expected {FORMAT_VERSION})",
                self.format
            ));
        }
        if self.kind != KIND_DATASET && self.kind != KIND_PREDICT {
            return Err(format!("unknown kind `{}`", self.kind));
        }
        if !is_hex(&self.space, 16) {
            return Err("`space` is not 16 hex digits".into());
        }
        if self.batch_size == 0 || self.batch_size > MAX_SHARD_ROWS {
            return Err(format!(
                "batch_size {} outside 1..={MAX_SHARD_ROWS}",
                self.batch_size
            ));
        }
        for (i, r) in self.rows.iter().enumerate() {
            let line = |m: &str| format!("row {i} (`{}`): {m}", r.id);
            match (r.label, self.kind.as_str()) {
                (Some(l), KIND_DATASET) if l >= self.classes.len() => {
                    return Err(line(&format!(
                        "label {l} but there are {} classes",
                        self.classes.len()
                    )))
                }
                (None, KIND_DATASET) => return Err(line("no label")),
                (Some(_), KIND_PREDICT) => return Err(line("a label in a predict row map")),
                _ => {}
            }
            match &r.hash {
                Some(h) if !is_hex(h, 64) => return Err(line("hash is not 64 hex digits")),
                None if r.skipped.is_none() => {
                    return Err(line("neither a content hash nor a skip reason"))
                }
                _ => {}
            }
        }
        if self.views.first().map(String::as_str) != Some("original") {
            return Err(format!(
                "views {:?} do not start with \"original\"",
                self.views
            ));
        }
        for (i, v) in self.views.iter().enumerate() {
            if View::from_name(v).is_none() || self.views[..i].contains(v) {
                return Err(format!("view `{v}` is unknown or repeated"));
            }
        }
        if count(&self.rows) != self.counts {
            return Err(format!(
                "counts {:?} do not match the rows ({:?})",
                self.counts,
                count(&self.rows)
            ));
        }
        if fingerprint(&self.classes, &self.rows) != self.fingerprint {
            return Err("fingerprint does not match the rows (edited or corrupt)".into());
        }
        Ok(())
    }

    /// The store keys this row map references: every row's content hash under every view
    /// ([`row_key`]; the original view's key is the hash itself).
    pub fn row_keys(&self) -> Vec<String> {
        self.views
            .iter()
            .flat_map(|v| {
                self.rows
                    .iter()
                    .filter_map(move |r| Some(row_key(r.hash.as_deref()?, v)))
            })
            .collect()
    }

    /// The skipped rows: (id, reason).
    pub fn skipped(&self) -> Vec<(&str, &str)> {
        self.rows
            .iter()
            .filter_map(|r| r.skipped.as_deref().map(|s| (r.id.as_str(), s)))
            .collect()
    }

    /// Skip reasons recorded per content hash (a later run need not decode these again).
    pub fn bad_hashes(&self) -> HashMap<&str, &str> {
        self.rows
            .iter()
            .filter_map(|r| Some((r.hash.as_deref()?, r.skipped.as_deref()?)))
            .collect()
    }
}

/// "2 rows changed, 1 added, 3 removed" between an older row list and a newer one (matched
/// by id); "classes changed" when they differ.
pub fn describe_changes(
    old_classes: &[String],
    old: &[Row],
    new_classes: &[String],
    new: &[Row],
) -> String {
    let before: HashMap<&str, (Option<usize>, Option<&str>)> = old
        .iter()
        .map(|r| (r.id.as_str(), (r.label, r.hash.as_deref())))
        .collect();
    let now: HashSet<&str> = new.iter().map(|r| r.id.as_str()).collect();
    let (mut changed, mut added) = (0, 0);
    for r in new {
        match before.get(r.id.as_str()) {
            None => added += 1,
            Some(&(label, hash)) if label != r.label || hash != r.hash.as_deref() => changed += 1,
            Some(_) => {}
        }
    }
    let removed = before.keys().filter(|id| !now.contains(*id)).count();
    let mut parts = Vec::new();
    if old_classes != new_classes {
        parts.push("classes changed".to_string());
    }
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    if changed > 0 {
        parts.push(format!("{changed} row{} changed", plural(changed)));
    }
    if added > 0 {
        parts.push(format!("{added} row{} added", plural(added)));
    }
    if removed > 0 {
        parts.push(format!("{removed} row{} removed", plural(removed)));
    }
    if parts.is_empty() {
        parts.push("rows reordered".into());
    }
    parts.join(", ")
}
