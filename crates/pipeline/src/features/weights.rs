//! Pretrained weights: a local `.safetensors` file or a Hugging Face hub repository
//! (`hf:<owner>/<repo>`, fetched into hf-hub's local cache and checked by `fetch::hub`).
//! Tensors are handed out by name with their shape checked, so a wrong file fails naming the
//! tensor.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::dataset::hex;
use crate::data::preprocess::Partial;
use crate::error::{Error, IoContext, Result};

/// Where weights come from: `[backbone] weights`, parsed once when the config is loaded (a bad
/// value is a config error naming the key). In the TOML it stays one string, and it is written
/// back as one ([`std::fmt::Display`]): the path, or `hf:<owner>/<repo>[/<file>]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum WeightsSource {
    Local(PathBuf),
    /// A hub model repository and the file in it (default `model.safetensors`).
    Hub {
        repo: String,
        file: String,
    },
}

/// The hub file `hf:<owner>/<repo>` names when it names none.
const DEFAULT_HUB_FILE: &str = "model.safetensors";

impl WeightsSource {
    /// `hf:owner/repo`, `hf:owner/repo/file.safetensors`, or a local path; an error names
    /// `backbone.weights`.
    pub fn parse(s: &str) -> Result<Self> {
        Self::from_spelling(s).map_err(|message| Error::InvalidValue {
            key: "backbone.weights".into(),
            message,
        })
    }

    /// [`WeightsSource::parse`] with the reason as text (the config loader adds the key).
    fn from_spelling(s: &str) -> std::result::Result<Self, String> {
        let Some(rest) = s.strip_prefix("hf:") else {
            if s.trim().is_empty() {
                return Err("empty: expected a .safetensors path or hf:<owner>/<repo>".into());
            }
            return Ok(Self::Local(PathBuf::from(s)));
        };
        let bad = |why: &str| {
            format!("`{s}`: {why}: expected hf:<owner>/<repo> or hf:<owner>/<repo>/<file>")
        };
        let mut parts = rest.splitn(3, '/');
        let owner = parts.next().unwrap_or_default();
        let name = parts.next().unwrap_or_default();
        let file = parts.next().unwrap_or(DEFAULT_HUB_FILE);
        // A repository id is two plain path segments; a file is a relative path inside it.
        let plain =
            |p: &str| !p.is_empty() && p != "." && p != ".." && !p.contains(char::is_whitespace);
        if !plain(owner) || !plain(name) {
            return Err(bad("no repository"));
        }
        if !file.split('/').all(plain) {
            return Err(bad("not a file inside the repository"));
        }
        Ok(Self::Hub {
            repo: format!("{owner}/{name}"),
            file: file.to_string(),
        })
    }

    /// The local file: the path itself, or the hub file from the hf-hub cache (`HF_HOME`),
    /// downloaded from `HF_ENDPOINT` (default huggingface.co) and checked on first use.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            Self::Local(p) => Ok(p.clone()),
            Self::Hub { repo, file } => crate::data::fetch::hub::Hub::from_env()?.file(repo, file),
        }
    }

    /// Preprocessing known for this source without reading it (hub weights of known repos).
    pub fn known_preprocessing(&self) -> Partial {
        match self {
            Self::Hub { repo, .. } => Partial::known(repo).unwrap_or_default(),
            Self::Local(_) => Partial::default(),
        }
    }
}

impl TryFrom<String> for WeightsSource {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        Self::from_spelling(&s)
    }
}

impl From<WeightsSource> for String {
    fn from(w: WeightsSource) -> String {
        w.to_string()
    }
}

impl std::fmt::Display for WeightsSource {
    /// The config spelling: the path, or `hf:<repo>` (`hf:<repo>/<file>` for another file than
    /// `model.safetensors`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, file } if file == DEFAULT_HUB_FILE => write!(f, "hf:{repo}"),
            Self::Hub { repo, file } => write!(f, "hf:{repo}/{file}"),
        }
    }
}

/// A safetensors file read into memory, with its hash and metadata.
pub struct Weights {
    pub path: PathBuf,
    bytes: Vec<u8>,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    pub metadata: HashMap<String, String>,
}

impl Weights {
    /// Reads and checks a safetensors file.
    pub fn open(path: PathBuf) -> Result<Self> {
        let bytes = std::fs::read(&path).at(&path)?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::WeightsSource {
            source_name: path.display().to_string(),
            message: format!("not a safetensors file: {e}"),
        })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let sha256 = hex(&Sha256::digest(&bytes));
        Ok(Self {
            path,
            bytes,
            sha256,
            metadata,
        })
    }

    /// Names of every tensor in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = SafeTensors::deserialize(&self.bytes)
            .map(|st| st.names().into_iter().map(str::to_string).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Whether the file has a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .map(|st| st.names().contains(&name))
            .unwrap_or(false)
    }

    /// The tensor `name` as f32 on `device`; an error names it when absent or of another shape.
    pub fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let err = |message: String| Error::Weights {
            path: self.path.clone(),
            tensor: name.to_string(),
            message,
        };
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| err(e.to_string()))?;
        let view = st.tensor(name).map_err(|_| err("missing".into()))?;
        if view.shape() != shape {
            return Err(err(format!(
                "shape {:?}, expected {:?}",
                view.shape(),
                shape
            )));
        }
        let t = view.load(device).map_err(|e| err(e.to_string()))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_and_local_sources() {
        assert_eq!(
            WeightsSource::parse("hf:timm/vgg16.tv_in1k").expect("hub"),
            WeightsSource::Hub {
                repo: "timm/vgg16.tv_in1k".into(),
                file: "model.safetensors".into()
            }
        );
        assert_eq!(
            WeightsSource::parse("hf:a/b/sub/w.safetensors").expect("hub file"),
            WeightsSource::Hub {
                repo: "a/b".into(),
                file: "sub/w.safetensors".into()
            }
        );
        assert_eq!(
            WeightsSource::parse("w/x.safetensors").expect("local"),
            WeightsSource::Local("w/x.safetensors".into())
        );
    }

    #[test]
    fn malformed_sources_are_errors_naming_the_key_and_value() {
        for bad in [
            "hf:",
            "hf:timm",
            "hf:timm/",
            "hf:/x",
            "hf:a/b/",
            "hf:a/b/../c",
            "hf:a b/c",
            "",
        ] {
            let err = WeightsSource::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("backbone.weights"), "{bad}: {err}");
            if !bad.is_empty() {
                assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
            }
        }
    }

    #[test]
    fn the_config_spelling_round_trips() {
        for text in [
            "hf:timm/vgg16.tv_in1k",
            "hf:a/b/sub/w.safetensors",
            "/w/x.safetensors",
        ] {
            let w = WeightsSource::try_from(text.to_string()).expect(text);
            assert_eq!(w.to_string(), text);
            assert_eq!(String::from(w), text);
        }
        // The default file is implied, as in the config's own spelling.
        let w = WeightsSource::parse("hf:a/b/model.safetensors").expect("hub");
        assert_eq!(w.to_string(), "hf:a/b");
    }
}
