//! Where images and labels come from: a label CSV plus an image folder (read with polars), or a
//! folder per class (every image under it, sub-folders included). Produces the list of samples
//! and the class names in a stable order; no pixel is decoded here.
//!
//! Also the one place image files are read ([`read_image_file`]): only regular files (a FIFO
//! named in the CSV would block a reader for ever, so it is never opened) and only up to
//! `[data] max_file_bytes`; content hashing and decoding both go through it.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use polars::prelude::*;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::config::{DataConfig, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_IMAGE_PIXELS};
use crate::error::{Error, IoContext, Result};

/// One image of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The name the user knows it by: the CSV cell, or the path below the root folder with `/`
    /// separators (`class/file.jpg`, `class/sub/file.jpg`; for an unlabelled folder
    /// `file.jpg`, `sub/file.jpg`).
    pub id: String,
    /// The file on disk.
    pub path: PathBuf,
    /// Class index into [`Dataset::classes`]; `None` for unlabelled images.
    pub label: Option<usize>,
    /// Line of the CSV (the header is line 1), 0 for folder datasets; for error messages.
    pub line: usize,
}

/// An ordered list of samples and the names of their classes.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    /// Class names in index order.
    pub classes: Vec<String>,
    /// The CSV or the root folder, for messages.
    pub source: PathBuf,
    /// How large a file of this dataset may be read and decoded (`[data]`).
    pub limits: InputLimits,
}

/// How large an image file may be read and decoded: files beyond these are bad images, so one
/// hostile or broken file cannot exhaust memory (`[data] max_file_bytes`, `max_image_pixels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Largest file read, in bytes.
    pub max_file_bytes: u64,
    /// Largest image decoded, in pixels (width x height).
    pub max_image_pixels: u64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

impl InputLimits {
    /// The limits `[data]` sets.
    pub fn from_config(cfg: &DataConfig) -> Self {
        Self {
            max_file_bytes: cfg.max_file_bytes,
            max_image_pixels: cfg.max_image_pixels,
        }
    }
}

impl Dataset {
    /// Loads the labelled dataset that `[data]` describes.
    pub fn load(cfg: &DataConfig) -> Result<Self> {
        // Data from `[data] source` is downloaded on first use; local data is left alone.
        let paths = [&cfg.csv, &cfg.images, &cfg.root].into_iter().flatten();
        crate::data::fetch::ensure_source(cfg, paths.map(PathBuf::as_path))?;
        let ds = match (&cfg.csv, &cfg.images, &cfg.root) {
            (Some(csv), Some(images), _) => {
                from_csv(csv, images, &cfg.image_column, Some(&cfg.label_column), cfg)?
            }
            (_, _, Some(root)) => from_folders(root, cfg)?,
            _ => {
                return Err(Error::InvalidValue {
                    key: "data".into(),
                    message: "set either `csv` and `images`, or `root`".into(),
                })
            }
        };
        if ds.samples.is_empty() {
            return Err(Error::EmptyDataset(ds.source));
        }
        Ok(Dataset {
            limits: InputLimits::from_config(cfg),
            ..ds
        })
    }

    /// Loads an unlabelled list of images: a CSV of names (resolved against `images`, else the
    /// CSV's folder; only `image_column` is read) or every image under a folder, sub-folders
    /// included, each known by its path below the folder.
    pub fn load_unlabelled(
        input: &Path,
        images: Option<&Path>,
        image_column: &str,
    ) -> Result<Self> {
        let samples = if input.is_dir() {
            list_images_under(input)?
                .into_iter()
                .map(|(id, path)| Sample {
                    id,
                    path,
                    label: None,
                    line: 0,
                })
                .collect()
        } else {
            let images = images.or(input.parent()).unwrap_or(Path::new("."));
            let cfg = DataConfig::default();
            from_csv(input, images, image_column, None, &cfg)?.samples
        };
        if samples.is_empty() {
            return Err(Error::EmptyDataset(input.to_owned()));
        }
        Ok(Self {
            samples,
            classes: Vec::new(),
            source: input.to_owned(),
            limits: InputLimits::default(),
        })
    }

    /// The same dataset with other file limits (e.g. `[data]`'s for an unlabelled input).
    pub fn with_limits(self, limits: InputLimits) -> Self {
        Self { limits, ..self }
    }

    /// The content hash of every sample's file under this dataset's limits (see
    /// [`content_hashes_within`]).
    pub fn content_hashes(&self) -> Vec<Result<ContentHash>> {
        content_hashes_within(&self.samples, &self.limits)
    }

    /// Labels of every sample (all labelled datasets have them).
    pub fn labels(&self) -> Vec<usize> {
        self.samples.iter().map(|s| s.label.unwrap_or(0)).collect()
    }
}

/// The wanted columns of a CSV, read as text (trimmed), and which rows are blank.
struct CsvTable {
    /// One entry per wanted column, one cell per data row.
    columns: Vec<Vec<Option<String>>>,
    /// Per data row: every cell of the row (all columns, not only the wanted ones) is empty.
    blank: Vec<bool>,
}

/// Reads the CSV's columns as text, so integer and string labels are handled alike.
fn read_csv_columns(csv: &Path, columns: &[&str]) -> Result<CsvTable> {
    match std::fs::metadata(csv) {
        Ok(m) if m.is_file() => {}
        Ok(m) => {
            return Err(Error::Csv {
                path: csv.to_owned(),
                message: format!("the label file is {}, not a regular file", kind_of(&m)),
            })
        }
        Err(e) => {
            return Err(Error::Io {
                path: csv.to_owned(),
                source: std::io::Error::new(e.kind(), format!("label file: {e}")),
            })
        }
    }
    let csv_err = |e: PolarsError| Error::Csv {
        path: csv.to_owned(),
        message: e.to_string(),
    };
    let df = CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .try_into_reader_with_file_path(Some(csv.to_owned()))
        .and_then(|r| r.finish())
        .map_err(csv_err)?;
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let text = |col: &str| -> Result<Vec<Option<String>>> {
        let c = df
            .column(col)
            .and_then(|c| c.str().cloned())
            .map_err(csv_err)?;
        Ok(c.iter().map(|v| v.map(|s| s.trim().to_string())).collect())
    };
    // polars keeps a blank line as a row of empty cells (the line numbers stay right); such
    // rows are not data.
    let mut blank = vec![true; df.height()];
    for name in &names {
        for (b, cell) in blank.iter_mut().zip(text(name)?) {
            *b &= cell.is_none_or(|c| c.is_empty());
        }
    }
    let columns = columns
        .iter()
        .map(|col| {
            if !names.iter().any(|n| n == col) {
                return Err(Error::MissingColumn {
                    path: csv.to_owned(),
                    column: col.to_string(),
                    available: names.join(", "),
                });
            }
            text(col)
        })
        .collect::<Result<_>>()?;
    Ok(CsvTable { columns, blank })
}

fn from_csv(
    csv: &Path,
    images: &Path,
    image_column: &str,
    label_column: Option<&str>,
    cfg: &DataConfig,
) -> Result<Dataset> {
    let mut wanted = vec![image_column];
    wanted.extend(label_column);
    let table = read_csv_columns(csv, &wanted)?;
    let row_err = |line: usize, message: String| Error::BadRow {
        path: csv.to_owned(),
        line,
        message,
    };
    // (line, image cell, label cell) of every non-blank row; the header is line 1.
    let mut rows: Vec<(usize, Option<String>, Option<String>)> = Vec::new();
    let mut cols = table.columns.into_iter();
    let names = cols.next().unwrap_or_default();
    let labels = cols.next();
    let mut labels_iter = labels.into_iter().flatten();
    for (i, (name, blank)) in names.into_iter().zip(&table.blank).enumerate() {
        let label = labels_iter.next().flatten();
        if !blank {
            rows.push((i + 2, name, label));
        }
    }
    // Classes come from every row, so a `limit` smoke run keeps the full class list.
    let classes = match label_column {
        None => None,
        Some(_) => {
            let seen: Vec<&str> = rows
                .iter()
                .filter_map(|(_, _, l)| l.as_deref())
                .filter(|l| !l.is_empty())
                .collect();
            Some(Classes::new(cfg.classes.as_deref(), &seen)?)
        }
    };
    if let Some(limit) = cfg.limit {
        rows.truncate(limit);
    }
    let mut samples = Vec::with_capacity(rows.len());
    for (line, name, label) in rows {
        let name = name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| row_err(line, format!("empty `{image_column}`")))?;
        check_relative(&name).map_err(|m| row_err(line, m))?;
        let label = match (&classes, label_column) {
            (Some(classes), Some(label_column)) => {
                let t = label
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| row_err(line, format!("empty `{label_column}`")))?;
                Some(classes.index(&t).ok_or_else(|| {
                    row_err(
                        line,
                        format!(
                            "label `{t}` is not one of the classes [{}]",
                            classes.names.join(", ")
                        ),
                    )
                })?)
            }
            _ => None,
        };
        samples.push(Sample {
            path: images.join(&name),
            id: name,
            label,
            line,
        });
    }
    Ok(Dataset {
        samples,
        classes: classes.map(|c| c.names).unwrap_or_default(),
        source: csv.to_owned(),
        limits: InputLimits::default(),
    })
}

/// The largest integer an f64 label holds exactly (2^53): beyond it, `1e16` and `1e16 + 1`
/// would be one class.
const MAX_EXACT_F64_INTEGER: f64 = 9_007_199_254_740_992.0;

/// The integer a label cell stands for (`1`, `+1`, ` 01`, `1.0`, `1e0` are all 1), or `None`
/// for anything else (text, fractions, `nan`, `inf`, integers too large to compare exactly).
fn integer_label(text: &str) -> Option<i64> {
    let t = text.trim();
    if let Ok(v) = t.parse::<i64>() {
        return Some(v);
    }
    let v: f64 = t.parse().ok()?;
    (v.is_finite() && v.fract() == 0.0 && v.abs() <= MAX_EXACT_F64_INTEGER).then_some(v as i64)
}

/// What a label cell is compared by: its integer value, or its trimmed text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum LabelKey {
    Integer(i64),
    Text(String),
}

/// The classes of a labelled CSV and the lookup from a label cell to its class index.
///
/// Labels compare as integers when every label (and every configured class, if any) is an
/// integer value, so `1`, `1.0` and ` 01` are one class, named "1"; otherwise as trimmed text.
/// Classes seen in the data are sorted by that key (numerically, or as text).
struct Classes {
    names: Vec<String>,
    keys: Vec<LabelKey>,
    numeric: bool,
}

impl Classes {
    fn new(configured: Option<&[String]>, labels: &[&str]) -> Result<Self> {
        let numeric = labels.iter().all(|l| integer_label(l).is_some())
            && configured.is_none_or(|c| c.iter().all(|c| integer_label(c).is_some()));
        let key = |s: &str| label_key(s, numeric);
        let (names, keys) = match configured {
            Some(configured) => {
                let keys: Vec<LabelKey> = configured.iter().map(|c| key(c)).collect();
                for (i, k) in keys.iter().enumerate() {
                    if let Some(j) = keys[..i].iter().position(|o| o == k) {
                        return Err(Error::InvalidValue {
                            key: "data.classes".into(),
                            message: format!(
                                "`{}` and `{}` are the same class",
                                configured[j], configured[i]
                            ),
                        });
                    }
                }
                (configured.to_vec(), keys)
            }
            None => {
                let keys: BTreeSet<LabelKey> = labels.iter().map(|l| key(l)).collect();
                let keys: Vec<LabelKey> = keys.into_iter().collect();
                let names = keys
                    .iter()
                    .map(|k| match k {
                        LabelKey::Integer(v) => v.to_string(),
                        LabelKey::Text(t) => t.clone(),
                    })
                    .collect();
                (names, keys)
            }
        };
        Ok(Self {
            names,
            keys,
            numeric,
        })
    }

    /// The class index of a label cell, `None` when it is not one of the classes.
    fn index(&self, label: &str) -> Option<usize> {
        let key = label_key(label, self.numeric);
        self.keys.iter().position(|k| *k == key)
    }
}

/// The key a label cell compares by: its integer value when labels are `numeric`.
fn label_key(label: &str, numeric: bool) -> LabelKey {
    match integer_label(label) {
        Some(v) if numeric => LabelKey::Integer(v),
        _ => LabelKey::Text(label.trim().to_string()),
    }
}

/// For each of `names` (class names of a dataset), the index of the same class among `known`
/// (a trained run's classes), or `None` when the run has no such class. Names compare as a
/// label cell does with configured classes: as integers when every name on both sides is an
/// integer value (`1.0` is class `1`), else as trimmed text.
pub fn match_classes(known: &[String], names: &[String]) -> Vec<Option<usize>> {
    let numeric = known
        .iter()
        .chain(names)
        .all(|s| integer_label(s).is_some());
    let keys: Vec<LabelKey> = known.iter().map(|k| label_key(k, numeric)).collect();
    names
        .iter()
        .map(|n| {
            let key = label_key(n, numeric);
            keys.iter().position(|k| *k == key)
        })
        .collect()
}

/// The configured classes, or the labels seen, sorted numerically when they are all integers
/// and as text otherwise, so the order does not depend on row order.
pub fn class_order<'a>(
    configured: Option<&[String]>,
    seen: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    if let Some(c) = configured {
        return c.to_vec();
    }
    let set: BTreeSet<&str> = seen.collect();
    let mut classes: Vec<String> = set.into_iter().map(str::to_string).collect();
    if classes.iter().all(|c| c.parse::<i64>().is_ok()) {
        classes.sort_by_key(|c| c.parse::<i64>().unwrap_or(0));
    }
    classes
}

/// Rejects names that could reach outside the images folder (`..`, absolute paths).
fn check_relative(name: &str) -> std::result::Result<(), String> {
    let ok = Path::new(name)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(())
    } else {
        Err(format!("image path `{name}` escapes the images directory"))
    }
}

fn from_folders(root: &Path, cfg: &DataConfig) -> Result<Dataset> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .at(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !file_name(p).starts_with('.'))
        .collect();
    dirs.sort();
    let names: Vec<String> = dirs.iter().map(|d| file_name(d)).collect();
    let classes = class_order(cfg.classes.as_deref(), names.iter().map(String::as_str));
    let mut samples = Vec::new();
    for (dir, name) in dirs.iter().zip(&names) {
        let label = classes
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| Error::BadRow {
                path: dir.clone(),
                line: 0,
                message: format!(
                    "folder `{name}` is not one of the classes [{}]",
                    classes.join(", ")
                ),
            })?;
        for (below, path) in list_images_under(dir)? {
            samples.push(Sample {
                id: format!("{name}/{below}"),
                path,
                label: Some(label),
                line: 0,
            });
        }
    }
    if let Some(limit) = cfg.limit {
        samples.truncate(limit);
    }
    Ok(Dataset {
        samples,
        classes,
        source: root.to_owned(),
        limits: InputLimits::default(),
    })
}

/// Whether a file name is one of an image (jpg, jpeg, png; any case).
fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// Every image file (jpg, jpeg, png) under `dir`, sub-folders included, as (path below `dir`
/// with `/` separators, file), sorted by that path so the order does not depend on the file
/// system. Hidden entries (`.name`) are left out, as are folders already visited through a
/// symbolic link (a link cycle would otherwise never end).
fn list_images_under(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    let mut visited = std::collections::HashSet::new();
    walk_images(dir, "", &mut visited, &mut found)?;
    found.sort();
    Ok(found)
}

fn walk_images(
    dir: &Path,
    prefix: &str,
    visited: &mut std::collections::HashSet<PathBuf>,
    found: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    if !visited.insert(dir.canonicalize().at(dir)?) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        let name = file_name(&path);
        if name.starts_with('.') {
            continue;
        }
        let below = format!("{prefix}{name}");
        if path.is_dir() {
            walk_images(&path, &format!("{below}/"), visited, found)?;
        } else if path.is_file() && is_image_name(&path) {
            found.push((below, path));
        }
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// SHA-256 of a file's bytes, hex.
pub type ContentHash = String;

/// What kind of file system entry `m` is, for messages ("a folder", "a FIFO", ...).
fn kind_of(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Reads an image file's bytes: only a regular file (a symbolic link to one is fine), and only
/// up to `limits.max_file_bytes`. Anything else is [`Error::BadImage`] naming the file, so
/// `on_bad_image = "skip"` skips it.
///
/// The type is checked with `metadata` before opening: opening a FIFO blocks until a writer
/// appears, which could be never.
pub fn read_image_file(path: &Path, limits: &InputLimits) -> Result<Vec<u8>> {
    use std::io::Read;
    let bad = |message: String| Error::BadImage {
        path: path.to_owned(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad(format!("is {}, not an image file", kind_of(&meta))));
    }
    let too_big = |size: u64| {
        bad(format!(
            "the file is {size} bytes, above `data.max_file_bytes` = {}",
            limits.max_file_bytes
        ))
    };
    if meta.len() > limits.max_file_bytes {
        return Err(too_big(meta.len()));
    }
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    // The file may have grown since `metadata`: read at most one byte past the limit.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limits.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The content hash of every sample's file with the default [`InputLimits`].
pub fn content_hashes(samples: &[Sample]) -> Vec<Result<ContentHash>> {
    content_hashes_within(samples, &InputLimits::default())
}

/// The content hash of every sample's file (in parallel), `Err` naming the file when it cannot
/// be read or is beyond `limits`: not a regular file, too many bytes, or a header announcing
/// more than `max_image_pixels` pixels. Checking the pixels here, not only when decoding, makes
/// the limits part of the dataset fingerprint: a file left out under one limit is hashed as
/// unreadable, so changing the limit changes the cache key.
pub fn content_hashes_within(samples: &[Sample], limits: &InputLimits) -> Vec<Result<ContentHash>> {
    samples
        .par_iter()
        .map(|s| {
            let bytes = read_image_file(&s.path, limits)?;
            crate::data::preprocess::check_pixels(&s.path, &bytes, limits)?;
            Ok(hex(&Sha256::digest(&bytes)))
        })
        .collect()
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_classes_sort_numerically() {
        let c = class_order(None, ["10", "2", "1", "2"].into_iter());
        assert_eq!(c, vec!["1", "2", "10"]);
        let c = class_order(None, ["cat", "ant", "bee"].into_iter());
        assert_eq!(c, vec!["ant", "bee", "cat"]);
    }

    /// A CSV in a fresh folder (named so that no expected word of a message can come from the
    /// path); returns its path.
    fn csv_file(test: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pipeline-ds-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("rows.csv");
        std::fs::write(&path, text).expect("write csv");
        path
    }

    fn labelled(csv: &Path, classes: Option<Vec<String>>) -> Result<Dataset> {
        let cfg = DataConfig {
            classes,
            ..DataConfig::default()
        };
        from_csv(csv, Path::new("imgs"), "image", Some("label"), &cfg)
    }

    #[test]
    fn blank_lines_are_ignored_and_line_numbers_stay_right() {
        let csv = csv_file(
            "blank",
            "image,label,note\na.png,x,\n\n,,\n   ,  ,\nb.png,y,hi\n\n\n",
        );
        let ds = labelled(&csv, None).expect("blank lines are skipped");
        let got: Vec<(&str, usize, Option<usize>)> = ds
            .samples
            .iter()
            .map(|s| (s.id.as_str(), s.line, s.label))
            .collect();
        assert_eq!(got, vec![("a.png", 2, Some(0)), ("b.png", 6, Some(1))]);
        // A row with another cell filled is not blank: its empty image cell is an error
        // naming the line.
        let csv = csv_file("half-blank", "image,label,note\na.png,x,\n,,a note\n");
        let err = labelled(&csv, None).expect_err("missing image").to_string();
        assert!(err.contains("line 3") && err.contains("`image`"), "{err}");
        // `limit` counts data rows, not blank lines.
        let csv = csv_file(
            "blank-limit",
            "image,label\n\na.png,x\n\nb.png,y\nc.png,x\n",
        );
        let cfg = DataConfig {
            limit: Some(2),
            ..DataConfig::default()
        };
        let ds = from_csv(&csv, Path::new("imgs"), "image", Some("label"), &cfg).expect("ok");
        let ids: Vec<&str> = ds.samples.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a.png", "b.png"]);
    }

    #[test]
    fn integer_valued_labels_are_one_class_each() {
        let csv = csv_file(
            "numeric",
            "image,label\na.png,1\nb.png,1.0\nc.png, 01\nd.png,10\ne.png,2\nf.png,-0\ng.png,+2\n",
        );
        let ds = labelled(&csv, None).expect("numeric labels");
        assert_eq!(ds.classes, ["0", "1", "2", "10"]);
        assert_eq!(ds.labels(), [1, 1, 1, 3, 2, 0, 2]);
        // With configured classes written differently, the values still match.
        let ds = labelled(
            &csv,
            Some(vec!["0".into(), "01".into(), "2.0".into(), "10".into()]),
        )
        .expect("configured numeric classes");
        assert_eq!(ds.labels(), [1, 1, 1, 3, 2, 0, 2]);
        let err = labelled(&csv, Some(vec!["1".into(), "1.0".into()]))
            .expect_err("duplicate classes")
            .to_string();
        assert!(
            err.contains("data.classes") && err.contains("same class"),
            "{err}"
        );
        // One non-integer label makes every label text: `1` and `1.0` are then two classes.
        let csv = csv_file("mixed", "image,label\na.png,1\nb.png,1.0\nc.png,1.5\n");
        let ds = labelled(&csv, None).expect("text labels");
        assert_eq!(ds.classes, ["1", "1.0", "1.5"]);
        let csv = csv_file("words", "image,label\na.png, car\nb.png,nan\nc.png,car \n");
        let ds = labelled(&csv, None).expect("text labels");
        assert_eq!(ds.classes, ["car", "nan"]);
        assert_eq!(ds.labels(), [0, 1, 0]);
    }

    #[test]
    fn integer_labels_parse_exactly() {
        assert_eq!(integer_label(" 01"), Some(1));
        assert_eq!(integer_label("1e1"), Some(10));
        assert_eq!(integer_label("-3.0"), Some(-3));
        assert_eq!(
            integer_label("9007199254740993"),
            Some(9_007_199_254_740_993)
        );
        for not in ["1.5", "nan", "inf", "-inf", "1e300", "x", "", "0x10"] {
            assert_eq!(integer_label(not), None, "{not}");
        }
    }

    #[test]
    fn files_beyond_the_size_limit_or_not_regular_are_bad_images() {
        let csv = csv_file("size-limit", "x\n");
        let dir = csv.parent().expect("dir");
        let file = dir.join("big.png");
        std::fs::write(&file, vec![7u8; 100]).expect("write");
        let limits = InputLimits {
            max_file_bytes: 99,
            ..InputLimits::default()
        };
        let err = read_image_file(&file, &limits).expect_err("too big");
        assert!(
            matches!(err, Error::BadImage { .. })
                && err.to_string().contains("big.png")
                && err.to_string().contains("max_file_bytes"),
            "{err}"
        );
        let limits = InputLimits {
            max_file_bytes: 100,
            ..InputLimits::default()
        };
        assert_eq!(
            read_image_file(&file, &limits).expect("at the limit").len(),
            100
        );
        let err = read_image_file(dir, &limits).expect_err("a folder");
        assert!(err.to_string().contains("folder"), "{err}");
    }

    #[test]
    fn a_csv_that_is_not_a_regular_file_is_an_error_naming_it() {
        let csv = csv_file("csv-dir", "x\n");
        let err = read_csv_columns(csv.parent().expect("dir"), &["image"])
            .err()
            .expect("a folder is no CSV")
            .to_string();
        assert!(
            err.contains("folder") && err.contains("label file"),
            "{err}"
        );
    }

    /// `root/<rel>` files of a few bytes (names only matter here).
    fn tree(test: &str, files: &[&str]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("pipeline-ds-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, b"x").expect("write");
        }
        root
    }

    #[test]
    fn folders_are_read_recursively_with_ids_below_the_root() {
        let root = tree(
            "nested",
            &[
                "b.png",
                "sub/deeper/c.JPG",
                "sub/a.jpeg",
                "sub/notes.txt",
                ".hidden/x.png",
                "sub/.y.png",
            ],
        );
        let ds = Dataset::load_unlabelled(&root, None, "image").expect("folder");
        let ids: Vec<&str> = ds.samples.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["b.png", "sub/a.jpeg", "sub/deeper/c.JPG"]);
        assert_eq!(ds.samples[2].path, root.join("sub/deeper/c.JPG"));
        // A link back up the tree is followed once, not for ever.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&root, root.join("sub/loop")).expect("symlink");
            let ds = Dataset::load_unlabelled(&root, None, "image").expect("with a cycle");
            assert_eq!(ds.samples.len(), 3);
        }
        // Class folders: every image below each class, the class from the top folder.
        let root = tree(
            "nested-classes",
            &["car/x.png", "car/2019/y.png", "van/z/w.png", "van/v.png"],
        );
        let cfg = DataConfig {
            root: Some(root.clone()),
            ..DataConfig::default()
        };
        let ds = Dataset::load(&cfg).expect("classes");
        let got: Vec<(&str, Option<usize>)> = ds
            .samples
            .iter()
            .map(|s| (s.id.as_str(), s.label))
            .collect();
        assert_eq!(
            got,
            [
                ("car/2019/y.png", Some(0)),
                ("car/x.png", Some(0)),
                ("van/v.png", Some(1)),
                ("van/z/w.png", Some(1)),
            ]
        );
    }

    #[test]
    fn classes_match_a_runs_by_value_or_text() {
        let known: Vec<String> = vec!["0".into(), "1".into()];
        let names: Vec<String> = vec!["1.0".into(), "01".into(), "0".into(), "7".into()];
        assert_eq!(
            match_classes(&known, &names),
            [Some(1), Some(1), Some(0), None]
        );
        let known: Vec<String> = vec!["ambulance".into(), "car".into()];
        let names: Vec<String> = vec![" car".into(), "Car".into(), "truck".into()];
        assert_eq!(match_classes(&known, &names), [Some(1), None, None]);
        // One text name on either side makes every comparison textual.
        let known: Vec<String> = vec!["1".into(), "x".into()];
        assert_eq!(
            match_classes(&known, &["1.0".to_string(), "1".to_string()]),
            [None, Some(0)]
        );
    }

    #[test]
    fn escaping_paths_are_rejected() {
        assert!(check_relative("a/b.jpg").is_ok());
        assert!(check_relative("../x.jpg").is_err());
        assert!(check_relative("a/../../x.jpg").is_err());
        assert!(check_relative("/etc/passwd").is_err());
    }
}
