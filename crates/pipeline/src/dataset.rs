//! Where images and labels come from: a label CSV plus an image folder (read with polars), or a
//! folder per class. Produces the list of samples and the class names in a stable order; no
//! pixel is read here.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use polars::prelude::*;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::error::{Error, IoContext, Result};

/// One image of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The name the user knows it by: the CSV cell, or `class/file` for folders.
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
}

impl Dataset {
    /// Loads the labelled dataset that `[data]` describes.
    pub fn load(cfg: &DataConfig) -> Result<Self> {
        // Data from `[data] source` is downloaded on first use; local data is left alone.
        let paths = [&cfg.csv, &cfg.images, &cfg.root].into_iter().flatten();
        crate::fetch::ensure_source(cfg, paths.map(PathBuf::as_path))?;
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
        Ok(ds)
    }

    /// Loads an unlabelled list of images: a CSV of names (resolved against `images`; only
    /// `image_column` is read) or every image in a folder.
    pub fn load_unlabelled(
        input: &Path,
        images: Option<&Path>,
        image_column: &str,
    ) -> Result<Self> {
        let samples = if input.is_dir() {
            list_images(input)?
                .into_iter()
                .map(|path| Sample {
                    id: file_name(&path),
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
        })
    }

    /// Labels of every sample (all labelled datasets have them).
    pub fn labels(&self) -> Vec<usize> {
        self.samples.iter().map(|s| s.label.unwrap_or(0)).collect()
    }
}

/// Reads the CSV's columns as text, so integer and string labels are handled alike.
fn read_csv_columns(csv: &Path, columns: &[&str]) -> Result<Vec<Vec<Option<String>>>> {
    if !csv.is_file() {
        return Err(Error::Io {
            path: csv.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "label file not found"),
        });
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
    columns
        .iter()
        .map(|col| {
            if !names.iter().any(|n| n == col) {
                return Err(Error::MissingColumn {
                    path: csv.to_owned(),
                    column: col.to_string(),
                    available: names.join(", "),
                });
            }
            let c = df
                .column(col)
                .and_then(|c| c.str().cloned())
                .map_err(csv_err)?;
            Ok(c.iter().map(|v| v.map(|s| s.trim().to_string())).collect())
        })
        .collect()
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
    let mut cols = read_csv_columns(csv, &wanted)?;
    let mut names = cols.remove(0);
    let mut labels = cols.pop();
    // Classes come from every row, so a `limit` smoke run keeps the full class list.
    let all_classes = labels.as_ref().map(|l| {
        class_order(
            cfg.classes.as_deref(),
            l.iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .map(String::as_str),
        )
    });
    if let Some(limit) = cfg.limit {
        names.truncate(limit);
        if let Some(l) = labels.as_mut() {
            l.truncate(limit);
        }
    }
    let row_err = |i: usize, message: String| Error::BadRow {
        path: csv.to_owned(),
        line: i + 2,
        message,
    };
    let mut samples = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let name = name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| row_err(i, format!("empty `{image_column}`")))?;
        check_relative(&name).map_err(|m| row_err(i, m))?;
        samples.push(Sample {
            path: images.join(&name),
            id: name,
            label: None,
            line: i + 2,
        });
    }
    let classes = match labels {
        None => Vec::new(),
        Some(labels) => {
            let label_column = label_column.unwrap_or_default();
            let mut texts = Vec::with_capacity(labels.len());
            for (i, l) in labels.into_iter().enumerate() {
                texts.push(
                    l.filter(|l| !l.is_empty())
                        .ok_or_else(|| row_err(i, format!("empty `{label_column}`")))?,
                );
            }
            let classes = all_classes.unwrap_or_default();
            for (i, (s, t)) in samples.iter_mut().zip(&texts).enumerate() {
                let idx = classes.iter().position(|c| c == t).ok_or_else(|| {
                    row_err(
                        i,
                        format!(
                            "label `{t}` is not one of the classes [{}]",
                            classes.join(", ")
                        ),
                    )
                })?;
                s.label = Some(idx);
            }
            classes
        }
    };
    Ok(Dataset {
        samples,
        classes,
        source: csv.to_owned(),
    })
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
        for path in list_images(dir)? {
            samples.push(Sample {
                id: format!("{name}/{}", file_name(&path)),
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
    })
}

/// The image files (jpg, jpeg, png) of a folder, sorted by name.
fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                })
        })
        .collect();
    files.sort();
    Ok(files)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// SHA-256 of a file's bytes, hex.
pub type ContentHash = String;

/// The content hash of every sample's file (in parallel), `Err` naming the file when it cannot
/// be read.
pub fn content_hashes(samples: &[Sample]) -> Vec<Result<ContentHash>> {
    samples
        .par_iter()
        .map(|s| {
            let bytes = std::fs::read(&s.path).map_err(|e| Error::BadImage {
                path: s.path.clone(),
                message: e.to_string(),
            })?;
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

    #[test]
    fn escaping_paths_are_rejected() {
        assert!(check_relative("a/b.jpg").is_ok());
        assert!(check_relative("../x.jpg").is_err());
        assert!(check_relative("a/../../x.jpg").is_err());
        assert!(check_relative("/etc/passwd").is_err());
    }
}
