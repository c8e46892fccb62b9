//! First-use downloads, as torchvision's `download=True` and timm's `pretrained=True` do them:
//! the study's images and labels from a pinned public archive (`[data] source`), and hub weights
//! (`hf:<repo>`, [`hub`]), each fetched once into a cache folder and found there afterwards
//! without network.
//!
//! A dataset source is an archive URL (or a local archive) plus the SHA-256 *content digest*
//! of the files in it ([`archive`] says how it is computed). Config paths written
//! `source:PATH` name PATH inside the archive's top folder; [`source_path`] turns them into
//! paths under `<cache>/data/<name>-<digest prefix>/`, and [`ensure_source`] fetches the
//! archive when one of them is about to be read and that folder does not exist yet:
//! download (resumable, [`http`]) -> unpack into a temporary folder in the cache -> digest check
//! -> rename into place. The folder therefore exists only complete and verified.

pub mod archive;
pub mod http;
pub mod hub;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::data::dataset::hex;
use crate::error::{Error, IoContext, Result};

/// Prefix of config paths that point inside the fetched `[data] source`.
pub const SOURCE_PREFIX: &str = "source:";
/// Environment variable naming the cache folder when `[data] cache` is not set.
pub const CACHE_VAR: &str = "PIPELINE_CACHE_DIR";
/// The cache's folder name under `$XDG_CACHE_HOME` or `~/.cache`.
const CACHE_NAME: &str = "vehicle-transfer";
/// Hex digits of the content digest in the data folder's name.
const DIGEST_PREFIX: usize = 16;

/// The default cache folder: `$PIPELINE_CACHE_DIR`, else `$XDG_CACHE_HOME/vehicle-transfer`,
/// else `~/.cache/vehicle-transfer`; `None` when none of them is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    var(CACHE_VAR)
        .map(PathBuf::from)
        .or_else(|| var("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join(CACHE_NAME)))
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache").join(CACHE_NAME)))
}

/// A `[data] source`: where the archive is, what its content digest must be, and the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// An `http(s)://` URL or a local archive path.
    pub location: String,
    /// The content digest, lower-case hex.
    pub digest: String,
    /// The cache folder.
    pub cache: PathBuf,
}

impl Source {
    /// The source `[data]` configures, or `None` without `source`. Errors name the key.
    pub fn from_config(cfg: &DataConfig) -> Result<Option<Self>> {
        let Some(location) = cfg.source.clone() else {
            return Ok(None);
        };
        let digest = cfg
            .source_digest
            .as_deref()
            .ok_or_else(|| invalid("data.source_digest", "`data.source` needs it"))?
            .to_ascii_lowercase();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "data.source_digest",
                "must be 64 hex digits (a SHA-256)",
            ));
        }
        let scheme = location
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase());
        if scheme.is_some_and(|s| s != "http" && s != "https") {
            return Err(invalid(
                "data.source",
                "must be an http(s):// URL or a local .zip file",
            ));
        }
        let cache = cfg
            .cache
            .clone()
            .or_else(default_cache_dir)
            .ok_or_else(|| {
                invalid(
                    "data.cache",
                    &format!("no cache folder: set `data.cache` or ${CACHE_VAR} (no $HOME either)"),
                )
            })?;
        Ok(Some(Self {
            location,
            digest,
            cache,
        }))
    }

    /// Where the archive's top folder is unpacked: `<cache>/data/<name>-<digest prefix>`.
    pub fn dir(&self) -> PathBuf {
        self.cache.join("data").join(format!(
            "{}-{}",
            source_name(&self.location),
            &self.digest[..DIGEST_PREFIX]
        ))
    }

    fn is_remote(&self) -> bool {
        let l = self.location.to_ascii_lowercase();
        l.starts_with("http://") || l.starts_with("https://")
    }

    /// Fetches, unpacks and verifies the archive unless [`Source::dir`] already exists; returns
    /// that folder.
    pub fn ensure(&self) -> Result<PathBuf> {
        let dir = self.dir();
        if dir.is_dir() {
            return Ok(dir);
        }
        let data = self.cache.join("data");
        fs::create_dir_all(&data).at(&data)?;
        let archive = if self.is_remote() {
            let dest = self
                .cache
                .join("downloads")
                .join(format!("{}.zip", file_name(&dir)));
            if !dest.is_file() {
                eprintln!(
                    "fetch: downloading {} into {}",
                    self.location,
                    self.cache.display()
                );
                http::download(&self.location, &dest, None).map_err(offline_hint)?;
            }
            dest
        } else {
            PathBuf::from(&self.location)
        };
        let partial = data.join(format!(".partial-{}", file_name(&dir)));
        remove_dir_if_present(&partial)?;
        fs::create_dir_all(&partial).at(&partial)?;
        if let Err(e) = self.unpack_and_check(&archive, &partial) {
            // Nothing half-done stays: the unpacked files always, the download when it is ours.
            let _ = fs::remove_dir_all(&partial);
            if self.is_remote() {
                let _ = fs::remove_file(&archive);
            }
            return Err(e);
        }
        if let Err(e) = fs::rename(&partial, &dir) {
            // Another run may have finished the same fetch first.
            let _ = fs::remove_dir_all(&partial);
            if !dir.is_dir() {
                return Err(Error::Io {
                    path: dir,
                    source: e,
                });
            }
        }
        if self.is_remote() {
            fs::remove_file(&archive).at(&archive)?;
        }
        eprintln!("fetch: {} ready in {}", self.location, dir.display());
        Ok(dir)
    }

    fn unpack_and_check(&self, archive: &Path, into: &Path) -> Result<()> {
        eprintln!("fetch: unpacking {}", archive.display());
        archive::unzip(archive, into).map_err(|e| self.deleted_note(e))?;
        let (found, files) = archive::content_digest(into)?;
        if found != self.digest {
            let action = if self.is_remote() {
                "the download and the files unpacked from it were deleted (check `data.source` \
                 and `data.source_digest`)"
            } else {
                "the files unpacked from it were deleted (check `data.source` and \
                 `data.source_digest`)"
            };
            return Err(Error::Checksum {
                what: format!("content of {} ({files} files)", self.location),
                expected: self.digest.clone(),
                found,
                action: action.into(),
            });
        }
        eprintln!("fetch: {files} files, content digest {found} as pinned");
        Ok(())
    }

    /// An unreadable archive of ours is deleted so the next run downloads it again: say so.
    fn deleted_note(&self, e: Error) -> Error {
        match e {
            Error::Archive { path, message } if self.is_remote() => Error::Archive {
                message: format!(
                    "{message}; the download was deleted, run again to download it afresh"
                ),
                path,
            },
            e => e,
        }
    }
}

/// Adds what to do without internet to a failed download.
fn offline_hint(e: Error) -> Error {
    match e {
        Error::Download { url, message } => Error::Download {
            url,
            message: format!(
                "{message}. Without internet, point `data.csv` and `data.images` at a local copy \
                 (a config layer: PIPELINE_CONFIG_LAYER=configs/shared.toml for ../shared), or \
                 set `data.source` to a downloaded copy of the archive"
            ),
        },
        e => e,
    }
}

/// The path `source:REST` names: `REST` inside the source's folder. `None` for other paths.
pub fn source_path(source: &Source, path: &Path) -> Option<PathBuf> {
    let text = path.to_str()?;
    let rest = text.strip_prefix(SOURCE_PREFIX)?;
    Some(source.dir().join(rest.trim_start_matches('/')))
}

/// Whether the config path is written `source:...`.
pub fn is_source_path(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with(SOURCE_PREFIX))
}

/// Fetches `[data] source` if one of `paths` lies in its folder and the folder is not there
/// yet; does nothing for datasets that do not use the source. Call before reading `paths`.
///
/// `Config::load` sets `cache` whenever it resolves a `source:` path, so a config without a
/// cache has no paths in a source folder: then the source is not looked at at all (a layer
/// pointing the data at local copies leaves the file's `source` set but unused).
pub fn ensure_source<'p>(
    cfg: &DataConfig,
    paths: impl IntoIterator<Item = &'p Path>,
) -> Result<()> {
    if cfg.source.is_none() || cfg.cache.is_none() {
        return Ok(());
    }
    let Some(source) = Source::from_config(cfg)? else {
        return Ok(());
    };
    let dir = source.dir();
    if paths.into_iter().any(|p| p.starts_with(&dir)) {
        source.ensure()?;
    }
    Ok(())
}

/// A short folder name for a source: the repository of a GitHub archive URL
/// (`…/<owner>/<repo>/archive/<ref>.zip`), else the archive's file name without extension.
fn source_name(location: &str) -> String {
    let path = location.split(['?', '#']).next().unwrap_or(location);
    // A URL's path, without scheme and host.
    let path = match path.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p),
        None => path,
    };
    let parts: Vec<&str> = path.split(['/', '\\']).filter(|p| !p.is_empty()).collect();
    let name = match parts.as_slice() {
        [.., _owner, repo, "archive", _] => repo.to_string(),
        [.., last] => {
            let lower = last.to_ascii_lowercase();
            let cut = [".tar.gz", ".tgz", ".zip"]
                .iter()
                .find(|ext| lower.ends_with(*ext))
                .map_or(0, |ext| ext.len());
            last[..last.len() - cut].to_string()
        }
        [] => String::new(),
    };
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() || clean.starts_with('.') {
        format!("data{clean}")
    } else {
        clean
    }
}

/// SHA-256 of a file's bytes, hex, read in blocks (weights files are hundreds of MB).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).at(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            path: dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn invalid(key: &str, message: &str) -> Error {
    Error::InvalidValue {
        key: key.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(location: &str) -> Source {
        Source {
            location: location.into(),
            digest: "ab".repeat(32),
            cache: PathBuf::from("/c"),
        }
    }

    #[test]
    fn folder_names_come_from_the_url() {
        let gh = "https://github.com/William-Hing/CNN-Image-Classification/archive/65a66b0.zip";
        assert_eq!(source_name(gh), "CNN-Image-Classification");
        assert_eq!(source_name("http://127.0.0.1:9/study.zip?x=1"), "study");
        assert_eq!(source_name("/data/My Set.tar.gz"), "My_Set");
        assert_eq!(source_name("http://127.0.0.1:9/archive/study.zip"), "study");
        assert_eq!(source_name("http://h/"), "data");
        assert_eq!(source_name(".zip"), "data");
        assert_eq!(
            source(gh).dir(),
            PathBuf::from("/c/data/CNN-Image-Classification-abababababababab")
        );
    }

    #[test]
    fn source_paths_resolve_inside_the_source_folder() {
        let s = source("http://h/study.zip");
        assert_eq!(
            source_path(&s, Path::new("source:E/train.csv")),
            Some(PathBuf::from("/c/data/study-abababababababab/E/train.csv"))
        );
        assert_eq!(source_path(&s, Path::new("E/train.csv")), None);
        assert!(is_source_path(Path::new("source:x")));
        assert!(!is_source_path(Path::new("x/source:y")));
    }

    #[test]
    fn source_settings_are_checked_and_named() {
        let mut cfg = DataConfig {
            source: Some("http://h/a.zip".into()),
            ..DataConfig::default()
        };
        let err = Source::from_config(&cfg).expect_err("no digest");
        assert!(err.to_string().contains("data.source_digest"), "{err}");
        cfg.source_digest = Some("xyz".into());
        let err = Source::from_config(&cfg).expect_err("bad digest");
        assert!(err.to_string().contains("64 hex"), "{err}");
        cfg.source_digest = Some("AB".repeat(32));
        cfg.cache = Some("/c".into());
        let s = Source::from_config(&cfg).expect("valid").expect("some");
        assert_eq!(s.digest, "ab".repeat(32));
        cfg.source = None;
        assert_eq!(Source::from_config(&cfg).expect("valid"), None);
    }
}
