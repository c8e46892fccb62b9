//! Hugging Face hub files (`hf:<owner>/<repo>[/<file>]`) through hf-hub's cache, which
//! downloads resumably (`<blob>.part`, then a rename) and lays files out as the Python client
//! does (`$HF_HOME/hub/models--<owner>--<repo>/{blobs,snapshots,refs}`).
//!
//! hf-hub does not check what it downloaded, and asserts and unwraps in its download path. So
//! here a fresh download is checked against the hub's LFS etag (the blob's SHA-256, which is
//! also its file name) and, for repositories in [`PINNED`], against the SHA-256 the study's
//! weights are known by; a mismatch deletes the file. A panic inside hf-hub becomes an error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use super::http::RETRIES;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The default hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Known files and their SHA-256: (repo, file, sha256). `timm/vgg16.tv_in1k` is torchvision's
/// ImageNet VGG16 (`vgg16-397923af.pth`) as safetensors, revision
/// b8d8aa2dd860af9233c8c67385a8097fd6c35d3f (528 MB, classifier included).
pub const PINNED: &[(&str, &str, &str)] = &[(
    "timm/vgg16.tv_in1k",
    "model.safetensors",
    "57b026918159a6bf9faf8405c3a551903768e7138989d9c6224a14227203fad8",
)];

/// Where hub files come from and where they are cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hub {
    /// Server, default [`DEFAULT_ENDPOINT`] (`$HF_ENDPOINT`).
    pub endpoint: String,
    /// hf-hub's cache: `$HF_HOME/hub`, default `~/.cache/huggingface/hub`.
    pub cache: PathBuf,
}

impl Hub {
    /// The hub as hf-hub and the Python client see it: `HF_ENDPOINT`, `HF_HOME`.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let home = var("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
            .ok_or_else(|| Error::WeightsSource {
                source_name: "hf:".into(),
                message: "no hf-hub cache folder: set HF_HOME (no $HOME either)".into(),
            })?;
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        Ok(Self::new(endpoint, &home))
    }

    /// A hub at `endpoint` with the cache under `hf_home` (as `HF_HOME`).
    pub fn new(endpoint: impl Into<String>, hf_home: &Path) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache: hf_home.join("hub"),
        }
    }

    /// The local path of `file` in `repo`: from the cache, or downloaded and checked.
    pub fn file(&self, repo: &str, file: &str) -> Result<PathBuf> {
        let name = format!("hf:{repo}/{file}");
        let err = |message: String| Error::WeightsSource {
            source_name: name.clone(),
            message,
        };
        let cache = hf_hub::Cache::new(self.cache.clone());
        if let Some(path) = cache.model(repo.to_string()).get(file) {
            return Ok(path);
        }
        eprintln!(
            "fetch: downloading {name} from {} into {}",
            self.endpoint,
            self.cache.display()
        );
        let download = || {
            let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
                .with_endpoint(self.endpoint.clone())
                .with_retries(RETRIES as usize)
                .build()?;
            api.model(repo.to_string())
                .download_with_progress(file, HubProgress::default())
        };
        let path = match catch_unwind(AssertUnwindSafe(download)) {
            Ok(Ok(path)) => path,
            Ok(Err(e)) => {
                return Err(err(format!(
                    "{e} (no network? set HF_ENDPOINT to a mirror, put the file in the hf-hub \
                     cache {}, or set a local path)",
                    self.cache.display()
                )))
            }
            Err(panic) => return Err(err(format!("hf-hub failed: {}", panic_text(&panic)))),
        };
        self.verify(&name, repo, file, &path)?;
        Ok(path)
    }

    /// Checks a fresh download against its etag and any pinned SHA-256; deletes it when wrong.
    fn verify(&self, name: &str, repo: &str, file: &str, path: &Path) -> Result<()> {
        let blob = std::fs::canonicalize(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let etag = blob
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let mut expected = Vec::new();
        // LFS files are named by their SHA-256; small git files by a git SHA-1 (not checkable).
        if is_sha256(&etag) {
            expected.push((etag.clone(), "the hub's etag"));
        }
        if let Some(pinned) = pinned_sha256(repo, file) {
            expected.push((pinned.to_string(), "the pinned SHA-256 of these weights"));
        }
        if expected.is_empty() {
            return Ok(());
        }
        let found = super::sha256_file(&blob)?;
        for (want, what) in expected {
            if found != want {
                let _ = std::fs::remove_file(&blob);
                let _ = std::fs::remove_file(path);
                return Err(Error::Checksum {
                    what: format!("{name} from {}", self.endpoint),
                    expected: want,
                    found,
                    action: format!(
                        "it does not match {what}, so the download ({}) was deleted",
                        blob.display()
                    ),
                });
            }
        }
        eprintln!("fetch: {name}: SHA-256 {found} verified");
        Ok(())
    }
}

/// hf-hub's progress callbacks shown through [`Progress`]: a bar on a terminal, a log line
/// every ~5% otherwise.
#[derive(Default)]
struct HubProgress {
    bar: Option<Progress>,
    bytes: u64,
    total_mib: u64,
    reported_mib: u64,
    step_mib: u64,
}

impl hf_hub::api::Progress for HubProgress {
    fn init(&mut self, size: usize, filename: &str) {
        // Called again when a broken transfer is resumed; `update` then adds what was there.
        let total_mib = (size as u64).div_ceil(1 << 20);
        self.bar = Some(Progress::new(
            &format!("download {filename}"),
            "MiB",
            total_mib,
        ));
        self.bytes = 0;
        self.total_mib = total_mib;
        self.reported_mib = 0;
        self.step_mib = total_mib.div_ceil(20).max(1);
    }

    fn update(&mut self, size: usize) {
        self.bytes += size as u64;
        let mib = self.bytes >> 20;
        if let Some(bar) = self.bar.as_mut() {
            if mib >= self.reported_mib + self.step_mib {
                bar.inc(mib - self.reported_mib);
                self.reported_mib = mib;
            }
        }
    }

    /// Called when the transfer completed.
    fn finish(&mut self) {
        if let Some(mut bar) = self.bar.take() {
            if self.total_mib > self.reported_mib {
                bar.inc(self.total_mib - self.reported_mib);
            }
            bar.finish();
        }
    }
}

/// The pinned SHA-256 of a hub file, if it is one of [`PINNED`].
pub fn pinned_sha256(repo: &str, file: &str) -> Option<&'static str> {
    PINNED
        .iter()
        .find(|(r, f, _)| *r == repo && *f == file)
        .map(|(_, _, sha)| *sha)
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn study_weights_are_pinned() {
        let sha = pinned_sha256("timm/vgg16.tv_in1k", "model.safetensors").expect("pinned");
        assert!(is_sha256(sha));
        assert_eq!(pinned_sha256("timm/vgg16.tv_in1k", "other.bin"), None);
    }

    #[test]
    fn endpoint_and_cache_follow_hf_conventions() {
        let hub = Hub::new("http://127.0.0.1:9/", Path::new("/h"));
        assert_eq!(hub.endpoint, "http://127.0.0.1:9");
        assert_eq!(hub.cache, PathBuf::from("/h/hub"));
    }
}
