//! Pretrained weights: a local `.safetensors` file or a Hugging Face hub repository
//! (`hf:<owner>/<repo>`, fetched into hf-hub's local cache and checked by `fetch::hub`).
//! Tensors are handed out by name with their shape checked, so a wrong file fails naming the
//! tensor.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::data::dataset::hex;
use crate::data::preprocess::Partial;
use crate::error::{Error, IoContext, Result};

/// Where weights come from, parsed from `[backbone] weights`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    Local(PathBuf),
    /// A hub model repository and the file in it (default `model.safetensors`).
    Hub {
        repo: String,
        file: String,
    },
}

impl WeightsSource {
    /// `hf:owner/repo`, `hf:owner/repo/file.safetensors`, or a local path.
    pub fn parse(s: &str) -> Self {
        match s.strip_prefix("hf:") {
            Some(rest) => {
                let mut parts = rest.splitn(3, '/');
                let owner = parts.next().unwrap_or_default();
                let name = parts.next().unwrap_or_default();
                let file = parts.next().unwrap_or("model.safetensors");
                Self::Hub {
                    repo: format!("{owner}/{name}"),
                    file: file.to_string(),
                }
            }
            None => Self::Local(PathBuf::from(s)),
        }
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
            WeightsSource::parse("hf:timm/vgg16.tv_in1k"),
            WeightsSource::Hub {
                repo: "timm/vgg16.tv_in1k".into(),
                file: "model.safetensors".into()
            }
        );
        assert_eq!(
            WeightsSource::parse("hf:a/b/sub/w.safetensors"),
            WeightsSource::Hub {
                repo: "a/b".into(),
                file: "sub/w.safetensors".into()
            }
        );
        assert_eq!(
            WeightsSource::parse("w/x.safetensors"),
            WeightsSource::Local("w/x.safetensors".into())
        );
    }
}
