//! `extract` as one task of N (`--shard K/N`): which part a task is, where that came from (the
//! flag, the config, or the scheduler's environment), and the records the parts leave in the
//! store so that whoever finds all of them can establish the union.
//!
//! The partition: the dataset's distinct content hashes in first-appearance order are cut into
//! batches of `[extract] batch_size` ([`super::extract::Work`]); batch `b` is part `b mod N`'s
//! work ([`super::extract::assigned`]). Shard file names and bytes depend only on (space, batch
//! contents), so N parts write disjoint files whose union is, file for file and byte for byte,
//! what one unsharded run writes.
//!
//! Where a part comes from, first match wins:
//! 1. `--shard K/N` on the command line;
//! 2. `[extract] shard = "K/N"` (e.g. `--set extract.shard="2/4"`);
//! 3. a Slurm job array: `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of
//!    `SLURM_ARRAY_TASK_COUNT` (the ids must be contiguous: `--array=0-3`, `--array=5-8`, a
//!    `%` throttle is fine; `SLURM_ARRAY_TASK_MAX` is checked when present);
//! 4. a Kubernetes Indexed Job: `JOB_COMPLETION_INDEX` of [`COUNT_VAR`] (the Job's
//!    `completions`, which Kubernetes does not export) or `[extract] shard_count`.
//!
//! Without any of them the run is unsharded. A malformed value is [`Error::Shard`] naming its
//! origin (the flag, the key, or the variables and their values).
//!
//! Part records: a part that has finished writes `parts/<view>/part-K-of-N.json`
//! ([`PartRecord`]: the dataset's fingerprint, the batch size, and the bad images of its
//! batches), after its shards. The row map `datasets/<view>.json` of the whole dataset, the
//! file `train-head` reads, is written by whoever finds every part of one partition recorded
//! and every image stored: the last part to finish, or else `train-head` or an unsharded
//! `extract`. The records hold no times, so two runs of the same part write the same bytes;
//! only an exclusive-lock run (unsharded `extract`, `--gc`) deletes them, once the row map
//! they add up to is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ExtractConfig;
use crate::error::{Error, IoContext, Result};
use crate::features::store::{
    atomic_write, is_hex, list_names, remove_file, temporary_target, Store, FORMAT_VERSION,
};

/// Environment variable with the number of parts of a Kubernetes Indexed Job (set it to the
/// Job's `completions`; Kubernetes exports only the index).
pub const COUNT_VAR: &str = "PIPELINE_SHARD_COUNT";
/// The Slurm array task's id.
pub const SLURM_ID: &str = "SLURM_ARRAY_TASK_ID";
/// Number of tasks in the Slurm array.
pub const SLURM_COUNT: &str = "SLURM_ARRAY_TASK_COUNT";
/// Lowest task id of the Slurm array.
pub const SLURM_MIN: &str = "SLURM_ARRAY_TASK_MIN";
/// Highest task id of the Slurm array.
pub const SLURM_MAX: &str = "SLURM_ARRAY_TASK_MAX";
/// The pod's index in a Kubernetes Indexed Job.
pub const K8S_INDEX: &str = "JOB_COMPLETION_INDEX";
/// The store folder of the part records.
pub const PARTS: &str = "parts";
/// The `kind` of a part record.
pub const RECORD_KIND: &str = "extract part";
/// Most parts a partition may have (keeps record names and messages bounded).
pub const MAX_PARTS: usize = 1 << 20;

/// Task `index` of `count` (counted from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Part {
    /// A part, checked: `count` in 1..=[`MAX_PARTS`], `index < count`.
    pub fn new(index: usize, count: usize) -> std::result::Result<Self, String> {
        if count == 0 {
            return Err("the number of parts N must be at least 1".into());
        }
        if count > MAX_PARTS {
            return Err(format!("at most {MAX_PARTS} parts"));
        }
        if index >= count {
            return Err(format!(
                "part {index} of {count} does not exist (parts are counted from 0: 0..={})",
                count - 1
            ));
        }
        Ok(Self { index, count })
    }

    /// Parses `K/N` (decimal, 0 <= K < N).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let usage = || format!("`{text}` is not K/N (task K of N, counted from 0, e.g. 2/4)");
        let (k, n) = text.trim().split_once('/').ok_or_else(usage)?;
        let k = number(k.trim()).ok_or_else(usage)?;
        let n = number(n.trim()).ok_or_else(usage)?;
        Self::new(k, n).map_err(|m| format!("`{text}`: {m}"))
    }

    /// The `tuple` form [`super::extract::assigned`] takes.
    pub fn pair(self) -> (usize, usize) {
        (self.index, self.count)
    }
}

/// A decimal number of ASCII digits only (no sign, no spaces).
fn number(s: &str) -> Option<usize> {
    (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// A part and where it came from, for the log and for errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub part: Part,
    /// "--shard 2/4", "[extract] shard = \"2/4\"", "Slurm array (SLURM_ARRAY_TASK_ID=5, ...)".
    pub origin: String,
}

/// Works out this task's part: `--shard` (`cli`) > `[extract] shard` > a Slurm array > a
/// Kubernetes Indexed Job (`env` looks variables up; an empty value counts as unset).
/// `Ok(None)`: unsharded.
pub fn resolve(
    cli: Option<&str>,
    config: &ExtractConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Assignment>> {
    let bad = |origin: String, message: String| Error::Shard { origin, message };
    if let Some(text) = cli {
        let part = Part::parse(text).map_err(|m| bad("--shard".into(), m))?;
        return Ok(Some(Assignment {
            part,
            origin: format!("--shard {part}"),
        }));
    }
    if let Some(text) = &config.shard {
        let part = Part::parse(text).map_err(|m| bad("config key `extract.shard`".into(), m))?;
        return Ok(Some(Assignment {
            part,
            origin: format!("[extract] shard = \"{part}\""),
        }));
    }
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if var(SLURM_ID).is_some() {
        return slurm(&var).map(Some);
    }
    if let Some(index) = var(K8S_INDEX) {
        return kubernetes(&index, config.shard_count, &var).map(Some);
    }
    Ok(None)
}

/// [`resolve`] with the process environment.
pub fn resolve_from_process(
    cli: Option<&str>,
    config: &ExtractConfig,
) -> Result<Option<Assignment>> {
    resolve(cli, config, &|name| std::env::var(name).ok())
}

/// A Slurm array task: index `ID - MIN` of `COUNT`, the ids contiguous.
fn slurm(var: &dyn Fn(&str) -> Option<String>) -> Result<Assignment> {
    let names = [SLURM_ID, SLURM_MIN, SLURM_COUNT, SLURM_MAX];
    let values: Vec<Option<String>> = names.iter().map(|n| var(n)).collect();
    let shown: Vec<String> = names
        .iter()
        .zip(&values)
        .filter_map(|(n, v)| v.as_ref().map(|v| format!("{n}={v}")))
        .collect();
    let origin = format!("Slurm array ({})", shown.join(", "));
    let bad = |message: String| Error::Shard {
        origin: origin.clone(),
        message,
    };
    let get = |i: usize| -> Result<Option<usize>> {
        match &values[i] {
            None => Ok(None),
            Some(v) => number(v.trim())
                .map(Some)
                .ok_or_else(|| bad(format!("{} `{v}` is not a number", names[i]))),
        }
    };
    let need = |i: usize| -> Result<usize> {
        get(i)?.ok_or_else(|| {
            bad(format!(
                "{} is not set: extract takes its part from {SLURM_ID}, {SLURM_MIN} and \
                 {SLURM_COUNT}, which `sbatch --array` sets",
                names[i]
            ))
        })
    };
    let (id, min, count, max) = (need(0)?, need(1)?, need(2)?, get(3)?);
    if let Some(max) = max {
        if max < min || max - min + 1 != count {
            return Err(bad(format!(
                "the array's task ids are not contiguous ({count} ids from {min} to {max}): \
                 submit it as --array=A-B, without a step or gaps (a %limit is fine)"
            )));
        }
    }
    if id < min {
        return Err(bad(format!(
            "task id {id} is below the array's lowest id {min}"
        )));
    }
    let part =
        Part::new(id - min, count).map_err(|m| bad(format!("{SLURM_ID} - {SLURM_MIN}: {m}")))?;
    Ok(Assignment { part, origin })
}

/// A Kubernetes Indexed Job's pod: `JOB_COMPLETION_INDEX` of [`COUNT_VAR`] or
/// `[extract] shard_count` (equal when both are set).
fn kubernetes(
    index: &str,
    configured: Option<usize>,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<Assignment> {
    let index_text = format!("{K8S_INDEX}={index}");
    let from_env = var(COUNT_VAR);
    let mut shown = vec![index_text.clone()];
    if let Some(c) = &from_env {
        shown.push(format!("{COUNT_VAR}={c}"));
    }
    if let Some(c) = configured {
        shown.push(format!("[extract] shard_count = {c}"));
    }
    let origin = format!("Kubernetes Indexed Job ({})", shown.join(", "));
    let bad = |message: String| Error::Shard {
        origin: origin.clone(),
        message,
    };
    let k = number(index.trim())
        .ok_or_else(|| bad(format!("{K8S_INDEX} `{index}` is not a number")))?;
    let env_count = match &from_env {
        Some(c) => Some(
            number(c.trim()).ok_or_else(|| bad(format!("{COUNT_VAR} `{c}` is not a number")))?,
        ),
        None => None,
    };
    let count = match (env_count, configured) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(format!(
                "{COUNT_VAR} and `extract.shard_count` disagree ({a} and {b}): set one, equal \
                 to the Job's completions"
            )))
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => {
            return Err(bad(format!(
                "the number of parts is unknown: set {COUNT_VAR} (or `extract.shard_count`) to \
                 the Job's completions; Kubernetes exports only the index"
            )))
        }
    };
    let part = Part::new(k, count).map_err(bad)?;
    Ok(Assignment { part, origin })
}

/// What a finished part leaves in the store: `parts/<view>/part-K-of-N.json`. Field order is
/// the serialised order; no times, so the same part of the same inputs gives the same bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRecord {
    pub format: u32,
    /// [`RECORD_KIND`].
    pub kind: String,
    /// The row map's view id (the record's folder).
    pub view: String,
    /// The space id.
    pub space: String,
    /// The dataset's fingerprint (classes and rows), as the row map has it.
    pub fingerprint: String,
    /// Unique images per batch of the partition.
    pub batch_size: usize,
    /// K.
    pub part: usize,
    /// N.
    pub parts: usize,
    /// Batches of this part.
    pub batches: usize,
    /// Distinct images in those batches.
    pub images: usize,
    /// Images of those batches that could not be decoded (`on_bad_image = "skip"`), sorted by
    /// content hash.
    pub skipped: Vec<Skipped>,
    /// The program that wrote it.
    pub written_by: String,
}

/// A bad image of a part: its content hash and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skipped {
    pub hash: String,
    pub reason: String,
}

impl PartRecord {
    /// Compact JSON plus a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and validates record bytes found at `path` (whose name and folder must agree
    /// with the contents).
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |m: String| Error::Cache {
            path: path.to_owned(),
            message: m,
        };
        let r: PartRecord = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        r.validate().map_err(&bad)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let folder = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let part = Part {
            index: r.part,
            count: r.parts,
        };
        if name.as_deref() != Some(record_name(part).as_str()) || folder.as_deref() != Some(&r.view)
        {
            return Err(bad(format!(
                "records part {part} of view {}: not what its name and folder say",
                r.view
            )));
        }
        Ok(r)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT_VERSION || self.kind != RECORD_KIND {
            return Err(format!(
                "not a part record of format {FORMAT_VERSION} (kind `{}`, format {})",
                self.kind, self.format
            ));
        }
        Part::new(self.part, self.parts)?;
        if !is_hex(&self.view, 16) || !is_hex(&self.space, 16) || !is_hex(&self.fingerprint, 64) {
            return Err("`view`, `space` or `fingerprint` is not hex of the right length".into());
        }
        if self.batch_size == 0 {
            return Err("batch_size 0".into());
        }
        if let Some(s) = self.skipped.iter().find(|s| !is_hex(&s.hash, 64)) {
            return Err(format!("skipped hash `{}` is not 64 hex digits", s.hash));
        }
        if self.skipped.len() > self.images {
            return Err("more skipped images than images".into());
        }
        Ok(())
    }

    /// Which part.
    pub fn part(&self) -> Part {
        Part {
            index: self.part,
            count: self.parts,
        }
    }
}

/// `part-K-of-N.json`.
pub fn record_name(part: Part) -> String {
    format!("part-{}-of-{}.json", part.index, part.count)
}

/// `<store>/parts/<view>`.
pub fn records_dir(store: &Path, view: &str) -> PathBuf {
    store.join(PARTS).join(view)
}

/// Writes a part's record (atomically; a shared lock suffices).
pub fn write_record(store: &Store, record: &PartRecord) -> Result<PathBuf> {
    let path = records_dir(store.dir(), &record.view).join(record_name(record.part()));
    atomic_write(&path, &record.to_json())?;
    Ok(path)
}

/// The part records of `view` that can be read; each one that cannot is reported on stderr
/// (for `program`) and left out, so it counts as missing.
pub fn read_records(store: &Path, view: &str, program: &str) -> Result<Vec<PartRecord>> {
    let dir = records_dir(store, view);
    let mut out = Vec::new();
    for name in list_names(&dir)? {
        if !is_record_name(&name) {
            continue;
        }
        let path = dir.join(&name);
        let read = std::fs::read(&path)
            .at(&path)
            .and_then(|b| PartRecord::from_json(&b, &path));
        match read {
            Ok(r) if r.view == view => out.push(r),
            Ok(_) => {}
            Err(e) => eprintln!("{program}: ignoring part record: {e}"),
        }
    }
    Ok(out)
}

/// Whether `name` is a record's name (`part-K-of-N.json`, K < N).
pub fn is_record_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("part-")
        .and_then(|r| r.strip_suffix(".json"))
    else {
        return false;
    };
    let Some((k, n)) = rest.split_once("-of-") else {
        return false;
    };
    match (number(k), number(n)) {
        (Some(k), Some(n)) => Part::new(k, n).is_ok_and(|p| record_name(p) == name),
        _ => false,
    }
}

/// The records of one dataset version, grouped by partition.
#[derive(Debug, Clone, Default)]
pub struct PartsFound {
    /// (N, batch size) -> the parts recorded.
    pub partitions: BTreeMap<(usize, usize), BTreeMap<usize, PartRecord>>,
}

impl PartsFound {
    /// Groups `records` of the dataset version `fingerprint` in `space`.
    pub fn of(records: Vec<PartRecord>, space: &str, fingerprint: &str) -> Self {
        let mut partitions: BTreeMap<(usize, usize), BTreeMap<usize, PartRecord>> = BTreeMap::new();
        for r in records {
            if r.fingerprint == fingerprint && r.space == space {
                partitions
                    .entry((r.parts, r.batch_size))
                    .or_default()
                    .insert(r.part, r);
            }
        }
        Self { partitions }
    }

    /// Whether no part of this version is recorded.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// A partition with every part recorded: its records.
    pub fn complete(&self) -> Option<Vec<&PartRecord>> {
        self.partitions
            .iter()
            .find(|((n, _), parts)| parts.len() == *n)
            .map(|(_, parts)| parts.values().collect())
    }

    /// The records of partition `(n, batch_size)`, when every part of it is recorded.
    pub fn complete_of(&self, n: usize, batch_size: usize) -> Option<Vec<&PartRecord>> {
        self.partitions
            .get(&(n, batch_size))
            .filter(|parts| parts.len() == n)
            .map(|parts| parts.values().collect())
    }

    /// "parts 1, 3 of 4 have not finished" for the partition closest to done; `None` when
    /// some partition is complete or none is recorded.
    pub fn describe_missing(&self) -> Option<String> {
        if self.complete().is_some() {
            return None;
        }
        let ((n, batch), parts) = self
            .partitions
            .iter()
            .max_by_key(|((n, _), parts)| (parts.len(), std::cmp::Reverse(*n)))?;
        let missing: Vec<usize> = (0..*n).filter(|k| !parts.contains_key(k)).collect();
        Some(format!(
            "part{} {} of {n} (batches of {batch}) {} not finished",
            if missing.len() == 1 { "" } else { "s" },
            list(&missing, 12),
            if missing.len() == 1 { "has" } else { "have" }
        ))
    }
}

/// The union of the bad images of `records`.
pub fn skipped_of<'a>(records: impl IntoIterator<Item = &'a PartRecord>) -> BTreeSet<&'a Skipped> {
    records.into_iter().flat_map(|r| r.skipped.iter()).collect()
}

/// "1, 3, 5 and 7 more".
pub fn list(items: &[usize], shown: usize) -> String {
    let mut s: Vec<String> = items.iter().take(shown).map(|i| i.to_string()).collect();
    if items.len() > shown {
        s.push(format!("{} more", items.len() - shown));
        let last = s.pop().unwrap_or_default();
        return format!("{} and {last}", s.join(", "));
    }
    s.join(", ")
}

/// Deletes the records of `view` for the dataset version `fingerprint` (an unsharded run or
/// gc wrote the row map they add up to) and temporaries of killed writers; exclusive lock
/// only. Returns how many records were deleted.
pub fn remove_superseded(store: &Store, view: &str, fingerprint: &str) -> Result<usize> {
    if !store.exclusive() {
        return Ok(0);
    }
    let dir = records_dir(store.dir(), view);
    let mut removed = 0;
    for name in list_names(&dir)? {
        let path = dir.join(&name);
        if temporary_target(&name).is_some_and(is_record_name) {
            remove_file(&path)?;
        } else if is_record_name(&name) {
            let superseded = std::fs::read(&path)
                .ok()
                .and_then(|b| PartRecord::from_json(&b, &path).ok())
                .is_some_and(|r| r.fingerprint == fingerprint);
            if superseded {
                remove_file(&path)?;
                removed += 1;
            }
        }
    }
    // Each only succeeds when nothing is left in it.
    let _ = std::fs::remove_dir(&dir);
    let _ = std::fs::remove_dir(store.dir().join(PARTS));
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn resolved(
        cli: Option<&str>,
        cfg: &ExtractConfig,
        vars: &[(&str, &str)],
    ) -> Result<Option<Assignment>> {
        resolve(cli, cfg, &env(vars))
    }

    fn part(
        cli: Option<&str>,
        cfg: &ExtractConfig,
        vars: &[(&str, &str)],
    ) -> Option<(usize, usize)> {
        resolved(cli, cfg, vars)
            .expect("resolves")
            .map(|a| a.part.pair())
    }

    fn err(cli: Option<&str>, cfg: &ExtractConfig, vars: &[(&str, &str)]) -> String {
        match resolved(cli, cfg, vars) {
            Ok(a) => panic!("expected an error, got {a:?}"),
            Err(e) => e.to_string(),
        }
    }

    const SLURM: [(&str, &str); 4] = [
        ("SLURM_ARRAY_TASK_ID", "6"),
        ("SLURM_ARRAY_TASK_MIN", "4"),
        ("SLURM_ARRAY_TASK_MAX", "7"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];

    #[test]
    fn parses_k_of_n() {
        assert_eq!(Part::parse("2/4").map(Part::pair), Ok((2, 4)));
        assert_eq!(Part::parse(" 0 / 1 ").map(Part::pair), Ok((0, 1)));
        for bad in [
            "4/4", "1/0", "0/0", "-1/4", "+1/4", "a/4", "1/b", "1", "1/2/3", "", "/", "1.0/2",
        ] {
            assert!(Part::parse(bad).is_err(), "{bad} should be refused");
        }
        assert!(Part::parse("5/4")
            .expect_err("5/4")
            .contains("counted from 0"));
        assert_eq!(Part::parse("2/4").map(|p| p.to_string()), Ok("2/4".into()));
    }

    #[test]
    fn flag_beats_config_beats_slurm_beats_kubernetes() {
        let mut cfg = ExtractConfig::default();
        let k8s = [("JOB_COMPLETION_INDEX", "1"), ("PIPELINE_SHARD_COUNT", "3")];
        let both: Vec<(&str, &str)> = SLURM.iter().chain(k8s.iter()).copied().collect();
        assert_eq!(part(None, &cfg, &[]), None, "no variables: unsharded");
        assert_eq!(part(None, &cfg, &k8s), Some((1, 3)));
        assert_eq!(
            part(None, &cfg, &both),
            Some((2, 4)),
            "Slurm before Kubernetes"
        );
        cfg.shard = Some("0/2".into());
        assert_eq!(
            part(None, &cfg, &both),
            Some((0, 2)),
            "the config before the environment"
        );
        assert_eq!(
            part(Some("5/9"), &cfg, &both),
            Some((5, 9)),
            "the flag before all"
        );
        let a = resolved(Some("5/9"), &cfg, &both)
            .expect("ok")
            .expect("sharded");
        assert_eq!(a.origin, "--shard 5/9");
        let a = resolved(None, &cfg, &both).expect("ok").expect("sharded");
        assert_eq!(a.origin, "[extract] shard = \"0/2\"");
        // A malformed flag is an error even when the config would be fine.
        let e = err(Some("2/2"), &cfg, &[]);
        assert!(e.contains("--shard") && e.contains("2/2"), "{e}");
        cfg.shard = Some("two of four".into());
        let e = err(None, &cfg, &[]);
        assert!(
            e.contains("extract.shard") && e.contains("two of four"),
            "{e}"
        );
    }

    #[test]
    fn slurm_arrays_are_indexed_from_their_lowest_id() {
        let cfg = ExtractConfig::default();
        assert_eq!(part(None, &cfg, &SLURM), Some((2, 4)));
        let a = resolved(None, &cfg, &SLURM).expect("ok").expect("sharded");
        assert!(
            a.origin
                .starts_with("Slurm array (SLURM_ARRAY_TASK_ID=6, SLURM_ARRAY_TASK_MIN=4"),
            "{}",
            a.origin
        );
        // MAX is optional.
        assert_eq!(
            part(
                None,
                &cfg,
                &SLURM[..2]
                    .iter()
                    .chain(&SLURM[3..])
                    .copied()
                    .collect::<Vec<_>>()
            ),
            Some((2, 4))
        );
        // Empty variables count as unset.
        assert_eq!(part(None, &cfg, &[("SLURM_ARRAY_TASK_ID", "")]), None);
        // Other SLURM_* variables without the array id: a plain job, unsharded.
        assert_eq!(
            part(
                None,
                &cfg,
                &[("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_JOB_ID", "7")]
            ),
            None
        );
    }

    #[test]
    fn malformed_slurm_arrays_are_errors_naming_the_variables() {
        let cfg = ExtractConfig::default();
        let with = |name: &str, value: &str| -> Vec<(String, String)> {
            SLURM
                .iter()
                .filter(|(k, _)| *k != name)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain((!value.is_empty()).then(|| (name.to_string(), value.to_string())))
                .collect()
        };
        let run = |vars: Vec<(String, String)>| {
            let refs: Vec<(&str, &str)> =
                vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            err(None, &cfg, &refs)
        };
        // Stepped array 0-6:2 (ids 0, 2, 4, 6).
        let e = run(vec![
            ("SLURM_ARRAY_TASK_ID".into(), "2".into()),
            ("SLURM_ARRAY_TASK_MIN".into(), "0".into()),
            ("SLURM_ARRAY_TASK_MAX".into(), "6".into()),
            ("SLURM_ARRAY_TASK_COUNT".into(), "4".into()),
        ]);
        assert!(
            e.contains("not contiguous") && e.contains("SLURM_ARRAY_TASK_MAX=6"),
            "{e}"
        );
        let e = run(with("SLURM_ARRAY_TASK_COUNT", ""));
        assert!(e.contains("SLURM_ARRAY_TASK_COUNT is not set"), "{e}");
        let e = run(with("SLURM_ARRAY_TASK_MIN", ""));
        assert!(e.contains("SLURM_ARRAY_TASK_MIN is not set"), "{e}");
        let e = run(with("SLURM_ARRAY_TASK_ID", "six"));
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID `six` is not a number"),
            "{e}"
        );
        let e = run(with("SLURM_ARRAY_TASK_ID", "3"));
        assert!(e.contains("below the array's lowest id 4"), "{e}");
        let e = run(with("SLURM_ARRAY_TASK_ID", "9"));
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID=9") && e.contains("part 5 of 4"),
            "{e}"
        );
        let e = run(vec![
            ("SLURM_ARRAY_TASK_ID".into(), "0".into()),
            ("SLURM_ARRAY_TASK_MIN".into(), "0".into()),
            ("SLURM_ARRAY_TASK_COUNT".into(), "0".into()),
        ]);
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn kubernetes_indexed_jobs_need_a_count() {
        let mut cfg = ExtractConfig::default();
        assert_eq!(
            part(
                None,
                &cfg,
                &[("JOB_COMPLETION_INDEX", "0"), ("PIPELINE_SHARD_COUNT", "1")]
            ),
            Some((0, 1))
        );
        let e = err(None, &cfg, &[("JOB_COMPLETION_INDEX", "2")]);
        assert!(
            e.contains("JOB_COMPLETION_INDEX=2") && e.contains("PIPELINE_SHARD_COUNT"),
            "{e}"
        );
        cfg.shard_count = Some(4);
        assert_eq!(
            part(None, &cfg, &[("JOB_COMPLETION_INDEX", "3")]),
            Some((3, 4))
        );
        assert_eq!(
            part(
                None,
                &cfg,
                &[("JOB_COMPLETION_INDEX", "3"), ("PIPELINE_SHARD_COUNT", "4")]
            ),
            Some((3, 4))
        );
        let e = err(
            None,
            &cfg,
            &[("JOB_COMPLETION_INDEX", "3"), ("PIPELINE_SHARD_COUNT", "5")],
        );
        assert!(e.contains("disagree (5 and 4)"), "{e}");
        let e = err(None, &cfg, &[("JOB_COMPLETION_INDEX", "4")]);
        assert!(e.contains("part 4 of 4 does not exist"), "{e}");
        let e = err(None, &cfg, &[("JOB_COMPLETION_INDEX", "x")]);
        assert!(
            e.contains("JOB_COMPLETION_INDEX `x` is not a number"),
            "{e}"
        );
        cfg.shard_count = None;
        let e = err(
            None,
            &cfg,
            &[
                ("JOB_COMPLETION_INDEX", "1"),
                ("PIPELINE_SHARD_COUNT", "zero"),
            ],
        );
        assert!(e.contains("PIPELINE_SHARD_COUNT `zero`"), "{e}");
        // `shard_count` alone does not shard.
        cfg.shard_count = Some(4);
        assert_eq!(part(None, &cfg, &[]), None);
    }

    #[test]
    fn record_names_round_trip_and_others_are_not_records() {
        let p = Part::new(3, 12).expect("part");
        assert_eq!(record_name(p), "part-3-of-12.json");
        assert!(is_record_name("part-3-of-12.json"));
        for other in [
            "part-12-of-12.json",
            "part-03-of-12.json",
            "part-1-of-2.json.9-9.tmp",
            "x.json",
            "part--of-2.json",
        ] {
            assert!(!is_record_name(other), "{other}");
        }
        assert_eq!(list(&[1, 3], 12), "1, 3");
        assert_eq!(list(&[1, 2, 3, 4], 2), "1, 2 and 2 more");
    }

    #[test]
    fn progress_finds_a_complete_partition_and_names_missing_parts() {
        let rec = |k: usize, n: usize, fp: char| PartRecord {
            format: FORMAT_VERSION,
            kind: RECORD_KIND.into(),
            view: "a".repeat(16),
            space: "b".repeat(16),
            fingerprint: fp.to_string().repeat(64),
            batch_size: 2,
            part: k,
            parts: n,
            batches: 1,
            images: 2,
            skipped: Vec::new(),
            written_by: "test".into(),
        };
        let space = "b".repeat(16);
        let fp = "c".repeat(64);
        let p = PartsFound::of(
            vec![rec(0, 4, 'c'), rec(2, 4, 'c'), rec(1, 4, 'd')],
            &space,
            &fp,
        );
        assert!(p.complete().is_none());
        assert_eq!(
            p.describe_missing().as_deref(),
            Some("parts 1, 3 of 4 (batches of 2) have not finished")
        );
        let p = PartsFound::of(vec![rec(0, 4, 'c'), rec(0, 1, 'c')], &space, &fp);
        assert_eq!(p.complete().map(|r| r.len()), Some(1));
        assert_eq!(p.describe_missing(), None);
        assert!(PartsFound::of(vec![rec(0, 1, 'd')], &space, &fp).is_empty());
        // The JSON round-trips, and a record must sit where its contents say.
        let r = rec(1, 4, 'c');
        let dir = std::env::temp_dir().join(format!("parts-unit-{}", std::process::id()));
        let path = dir.join("a".repeat(16)).join("part-1-of-4.json");
        assert_eq!(
            PartRecord::from_json(&r.to_json(), &path).ok(),
            Some(r.clone())
        );
        let wrong = dir.join("a".repeat(16)).join("part-2-of-4.json");
        assert!(PartRecord::from_json(&r.to_json(), &wrong).is_err());
        let mut bad = r.clone();
        bad.part = 4;
        assert!(PartRecord::from_json(
            &bad.to_json(),
            &dir.join("a".repeat(16)).join("part-4-of-4.json")
        )
        .is_err());
    }
}
