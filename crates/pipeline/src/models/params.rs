//! A model's tensors, registered in one place: candle-nn's [`VarMap`] holds every parameter and
//! buffer by name, so saving, loading, snapshots and the optimiser's list all come from it and
//! nothing is listed by hand.
//!
//! Parameters are initialised from the pipeline's seeded [`Rng`] (candle cannot seed CPU
//! tensors), in the order a model registers them. Buffers (batch-norm running statistics) live
//! in the same map but are not handed to the optimiser.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarMap;
use safetensors::SafeTensors;

use crate::error::{Error, IoContext, Result};
use crate::training::rng::Rng;

/// Every tensor of one model, by name.
pub struct Params {
    map: VarMap,
    /// Names of the non-trained tensors (buffers).
    buffers: Mutex<BTreeSet<String>>,
    dtype: DType,
    device: Device,
}

impl Params {
    /// An empty registry whose tensors take `dtype` and live on `device`.
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self {
            map: VarMap::new(),
            buffers: Mutex::new(BTreeSet::new()),
            dtype,
            device: device.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Registers `t` (converted to the registry's dtype and device) as parameter `name`.
    pub fn tensor(&self, name: &str, t: &Tensor) -> Result<Var> {
        let var = Var::from_tensor(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        let mut map = self.lock()?;
        if map.contains_key(name) {
            return Err(Error::Model {
                model: "params".into(),
                message: format!("`{name}` is registered twice"),
            });
        }
        map.insert(name.to_string(), var.clone());
        Ok(var)
    }

    /// A parameter drawn from U(-bound, bound) by `rng` (PyTorch's default init of linear and
    /// conv layers uses `bound = 1 / sqrt(fan_in)` for both weight and bias).
    pub fn uniform(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        bound: f32,
        rng: &mut Rng,
    ) -> Result<Var> {
        let shape = shape.into();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| (rng.uniform_f32() * 2.0 - 1.0) * bound)
            .collect();
        self.tensor(name, &Tensor::from_vec(values, shape, &self.device)?)
    }

    /// A parameter filled with `value`.
    pub fn constant(&self, name: &str, shape: impl Into<Shape>, value: f64) -> Result<Var> {
        let t = (Tensor::ones(shape, DType::F32, &self.device)? * value)?;
        self.tensor(name, &t)
    }

    /// A buffer filled with `value`: saved and restored with the model, never trained.
    pub fn buffer(&self, name: &str, shape: impl Into<Shape>, value: f64) -> Result<Var> {
        let t = (Tensor::ones(shape, DType::F32, &self.device)? * value)?;
        self.buffer_tensor(name, &t)
    }

    /// Registers `t` as buffer `name`: saved and restored with the model, never trained.
    pub fn buffer_tensor(&self, name: &str, t: &Tensor) -> Result<Var> {
        let var = self.tensor(name, t)?;
        self.buffers
            .lock()
            .map_err(|_| poisoned())?
            .insert(name.to_string());
        Ok(var)
    }

    /// The tensors the optimiser updates (every registered tensor but the buffers), sorted by
    /// name.
    pub fn trainable(&self) -> Result<Vec<(String, Var)>> {
        let buffers = self.buffers.lock().map_err(|_| poisoned())?;
        Ok(self
            .sorted()?
            .into_iter()
            .filter(|(name, _)| !buffers.contains(name))
            .collect())
    }

    /// Every registered tensor, sorted by name.
    pub fn sorted(&self) -> Result<Vec<(String, Var)>> {
        let map = self.lock()?;
        let sorted: BTreeMap<&String, &Var> = map.iter().collect();
        Ok(sorted
            .into_iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect())
    }

    /// A deep copy of every tensor (not sharing storage with the vars).
    pub fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        self.sorted()?
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
            .collect()
    }

    /// Writes a [`Params::snapshot`] back.
    pub fn restore(&self, snapshot: &[(String, Tensor)]) -> Result<()> {
        let map = self.lock()?;
        for (name, t) in snapshot {
            let var = map.get(name).ok_or_else(|| Error::Model {
                model: "params".into(),
                message: format!("snapshot names `{name}`, which is not registered"),
            })?;
            var.set(t)?;
        }
        Ok(())
    }

    /// Saves every tensor as f32 safetensors (sorted by name) with `metadata`, atomically.
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        let tensors = self
            .sorted()?
            .into_iter()
            .map(|(name, v)| {
                let t = v
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                Ok((name, t))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| Error::Weights {
                    path: path.to_owned(),
                    tensor: "(file)".into(),
                    message: format!("serialising: {e}"),
                })?;
        crate::features::store::atomic_write(path, &bytes)
    }

    /// Copies every registered tensor from `saved` (names and shapes checked), converted to
    /// the registry's dtype. Tensors in the file that the model does not have are an error
    /// too: the file is of another model.
    pub fn load(&self, saved: &SavedState) -> Result<()> {
        use candle_core::safetensors::Load;
        let st = saved.tensors()?;
        let err = |tensor: &str, message: String| Error::Weights {
            path: saved.path.clone(),
            tensor: tensor.to_string(),
            message,
        };
        let ours = self.sorted()?;
        let mut names = st.names();
        names.sort();
        for name in names {
            if !ours.iter().any(|(n, _)| n == name) {
                return Err(err(name, "not a tensor of this model".into()));
            }
        }
        for (name, var) in ours {
            let view = st.tensor(&name).map_err(|_| err(&name, "missing".into()))?;
            if view.shape() != var.dims() {
                return Err(err(
                    &name,
                    format!("shape {:?}, expected {:?}", view.shape(), var.dims()),
                ));
            }
            let t = view
                .load(&self.device)
                .map_err(|e| err(&name, e.to_string()))?;
            var.set(&t.to_dtype(self.dtype)?)?;
        }
        Ok(())
    }

    fn lock(&self) -> Result<MutexGuard<'_, HashMap<String, Var>>> {
        self.map.data().lock().map_err(|_| poisoned())
    }
}

fn poisoned() -> Error {
    Error::Model {
        model: "params".into(),
        message: "a thread panicked while holding the parameter registry".into(),
    }
}

/// A file written by [`Params::save`]: its metadata, and its tensors by name.
pub struct SavedState {
    pub path: PathBuf,
    pub metadata: HashMap<String, String>,
    bytes: Vec<u8>,
}

impl SavedState {
    /// Reads a safetensors file; an error names it.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::WeightsSource {
            source_name: path.display().to_string(),
            message: format!("not a safetensors file: {e}"),
        })?;
        Ok(Self {
            path: path.to_owned(),
            metadata: header.metadata().clone().unwrap_or_default(),
            bytes,
        })
    }

    /// Metadata field `key` parsed as JSON; an error names the file and the key.
    pub fn field<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let err = |message: String| Error::Weights {
            path: self.path.clone(),
            tensor: format!("metadata `{key}`"),
            message,
        };
        let raw = self
            .metadata
            .get(key)
            .ok_or_else(|| err("missing".into()))?;
        serde_json::from_str(raw).map_err(|e| err(e.to_string()))
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| Error::WeightsSource {
            source_name: self.path.display().to_string(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_draws_saves_and_loads_by_name() {
        let dir = std::env::temp_dir().join(format!("params-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = Params::new(DType::F32, &Device::Cpu);
        let mut rng = Rng::new(1);
        let w = p.uniform("fc.weight", (2, 3), 0.5, &mut rng).expect("w");
        p.constant("fc.bias", 2, 0.25).expect("b");
        p.buffer("bn.running_var", 2, 1.0).expect("buffer");
        assert!(p
            .tensor(
                "fc.bias",
                &Tensor::zeros(2, DType::F32, &Device::Cpu).expect("z")
            )
            .is_err());
        let values: Vec<f32> = w
            .as_tensor()
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("v");
        assert!(values.iter().all(|v| v.abs() <= 0.5) && values.iter().any(|v| *v != 0.0));
        // The optimiser sees the parameters, not the buffer.
        let names: Vec<String> = p
            .trainable()
            .expect("trainable")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["fc.bias", "fc.weight"]);
        assert_eq!(p.sorted().expect("sorted").len(), 3);

        let path = dir.join("p.safetensors");
        p.save(&path, HashMap::from([("kind".into(), "\"test\"".into())]))
            .expect("save");
        let q = Params::new(DType::F32, &Device::Cpu);
        q.constant("fc.weight", (2, 3), 0.0).expect("w");
        q.constant("fc.bias", 2, 0.0).expect("b");
        q.buffer("bn.running_var", 2, 0.0).expect("buffer");
        let saved = SavedState::open(&path).expect("open");
        assert_eq!(saved.field::<String>("kind").expect("kind"), "test");
        q.load(&saved).expect("load");
        for ((na, a), (nb, b)) in p
            .sorted()
            .expect("p")
            .iter()
            .zip(q.sorted().expect("q").iter())
        {
            assert_eq!(na, nb);
            let a: Vec<f32> = a
                .as_tensor()
                .flatten_all()
                .expect("a")
                .to_vec1()
                .expect("a");
            let b: Vec<f32> = b
                .as_tensor()
                .flatten_all()
                .expect("b")
                .to_vec1()
                .expect("b");
            assert_eq!(a, b, "{na}");
        }

        // Another model's file is refused, naming the tensor.
        let r = Params::new(DType::F32, &Device::Cpu);
        r.constant("fc.weight", (3, 3), 0.0).expect("w");
        let err = r.load(&saved).expect_err("another model").to_string();
        assert!(
            err.contains("`bn.running_var`: not a tensor of this model"),
            "{err}"
        );
        let r = Params::new(DType::F32, &Device::Cpu);
        r.constant("fc.weight", (3, 3), 0.0).expect("w");
        r.constant("fc.bias", 2, 0.0).expect("b");
        r.buffer("bn.running_var", 2, 0.0).expect("buffer");
        let err = r.load(&saved).expect_err("another shape").to_string();
        assert!(
            err.contains("`fc.weight`: shape [2, 3], expected [3, 3]"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn snapshots_restore_values() {
        let p = Params::new(DType::F32, &Device::Cpu);
        let v = p.constant("x", 3, 1.0).expect("x");
        let snap = p.snapshot().expect("snapshot");
        v.set(&Tensor::zeros(3, DType::F32, &Device::Cpu).expect("zeros"))
            .expect("set");
        p.restore(&snap).expect("restore");
        assert_eq!(v.as_tensor().to_vec1::<f32>().expect("v"), vec![1.0; 3]);
    }
}
