//! The classifier trained on cached backbone features: a single linear layer, or the VGG
//! classifier (features -> 4096 -> 4096 -> classes, ReLU and dropout), optionally started from
//! the pretrained classifier in the backbone's weights file. Owns the head's parameters, its
//! initialisation, its dropout masks and its file format.
//!
//! Layers are stored as PyTorch does (`weight` `[out, in]`, `bias` `[out]`) under the names
//! `fc1.*`, `fc2.*` (MLP only) and `fc.*` (the final layer), with the head's shape in the
//! file's metadata, so [`Head::load`] needs nothing else.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::HeadKind;
use crate::error::{Error, Result};
use crate::features::weights::Weights;
use crate::models::ops::gather_linear;
use crate::models::params::{Params, SavedState};
use crate::models::scaling::{Scaler, Scaling};
use crate::training::fit::{Model, Rows};
use crate::training::rng::Rng;

/// Width of the VGG classifier's hidden layers.
pub const MLP_HIDDEN: usize = 4096;

/// Widest first layer that [`gather_linear`] computes (one dot product per row and output:
/// right for a linear head's few classes; a 4096-wide MLP layer goes to candle's matmul).
const GATHER_MAX_OUT: usize = 16;

/// Sub-stream of the caller's generator that draws the dropout masks.
const DROPOUT_STREAM: u64 = 0x4452_4F50; // "DROP"

/// What a head is: everything but its parameter values (recorded in its file's metadata).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeadShape {
    pub kind: HeadKind,
    /// Length of the input feature vectors.
    pub dim: usize,
    /// Width of the MLP's hidden layers (0 for a linear head).
    pub hidden: usize,
    pub classes: usize,
    /// Dropout of the MLP's hidden layers during training.
    pub dropout: f32,
}

impl HeadShape {
    /// A head of `kind` over `dim` features; an MLP has the VGG classifier's 4096-wide layers.
    pub fn new(kind: HeadKind, dim: usize, classes: usize, dropout: f32) -> Self {
        let hidden = match kind {
            HeadKind::Linear | HeadKind::Logistic => 0,
            HeadKind::Mlp => MLP_HIDDEN,
        };
        Self {
            kind,
            dim,
            hidden,
            classes,
            dropout,
        }
    }

    /// Rejects heads without inputs or classes, and dropout outside `[0, 1)`.
    fn check(&self) -> Result<()> {
        let bad = |message: String| {
            Err(Error::Model {
                model: "head".into(),
                message,
            })
        };
        if self.dim == 0 || self.classes == 0 || (self.kind == HeadKind::Mlp && self.hidden == 0) {
            return bad(format!(
                "a head needs inputs, hidden units and classes (dim {}, hidden {}, classes {})",
                self.dim, self.hidden, self.classes
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// (name, inputs, outputs) of each layer, in order.
    fn layers(&self) -> Vec<(&'static str, usize, usize)> {
        match self.kind {
            HeadKind::Linear | HeadKind::Logistic => vec![("fc", self.dim, self.classes)],
            HeadKind::Mlp => vec![
                ("fc1", self.dim, self.hidden),
                ("fc2", self.hidden, self.hidden),
                ("fc", self.hidden, self.classes),
            ],
        }
    }
}

/// One fully connected layer, PyTorch layout.
struct Linear {
    /// `[out, in]`.
    weight: Var,
    /// `[out]`.
    bias: Var,
}

impl Linear {
    /// `[n, in]` -> `[n, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

/// The feature head: parameters only; the trainer passes the feature rows.
///
/// Its [`Scaler`] (fitted on the training rows) is part of it: [`Head::logits`] applies it to
/// new features, while [`Model::forward_t`] takes rows already scaled (the trainer scales the
/// whole training matrix once).
pub struct Head {
    shape: HeadShape,
    scaler: Scaler,
    params: Params,
    /// `fc` alone, or `fc1`, `fc2`, `fc`.
    layers: Vec<Linear>,
    /// Draws dropout masks, so that training runs are reproducible.
    dropout_rng: Mutex<Rng>,
}

impl Head {
    /// A new head whose parameters take `dtype` and live on `device`.
    ///
    /// The final layer is always new, drawn like PyTorch's `nn.Linear` (weight then bias from
    /// U(-1/sqrt(in), 1/sqrt(in))). For [`HeadKind::Mlp`], `fc1` and `fc2` come from the
    /// pretrained classifier when `init` holds timm's `pre_logits.fc1.*` (a 7x7 convolution
    /// over the `[C, 7, 7]` feature map, flattened in the same C,H,W order as the features)
    /// and `pre_logits.fc2.*`; otherwise they are random too. Random layers are drawn from
    /// `rng` in layer order; the dropout masks from a fork of it.
    pub fn new(
        shape: &HeadShape,
        init: Option<&Weights>,
        rng: &mut Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        shape.check()?;
        let params = Params::new(dtype, device);
        let pretrained =
            init.filter(|w| shape.kind == HeadKind::Mlp && w.contains("pre_logits.fc1.weight"));
        let mut layers = Vec::new();
        for (name, inputs, outputs) in shape.layers() {
            let layer = match (pretrained, name) {
                (Some(w), "fc1" | "fc2") => {
                    let (weight, bias) = pretrained_layer(w, name, shape)?;
                    Linear {
                        weight: params.tensor(&format!("{name}.weight"), &weight)?,
                        bias: params.tensor(&format!("{name}.bias"), &bias)?,
                    }
                }
                _ => {
                    let bound = 1.0 / (inputs as f32).sqrt();
                    Linear {
                        weight: params.uniform(
                            &format!("{name}.weight"),
                            (outputs, inputs),
                            bound,
                            rng,
                        )?,
                        bias: params.uniform(&format!("{name}.bias"), outputs, bound, rng)?,
                    }
                }
            };
            layers.push(layer);
        }
        Ok(Self {
            shape: *shape,
            scaler: Scaler::none(),
            params,
            layers,
            dropout_rng: Mutex::new(rng.fork(DROPOUT_STREAM)),
        })
    }

    /// A linear or logistic head with given weights (`[classes][dim]` row-major) and bias, in
    /// f32 on `device`.
    pub fn from_weights(
        shape: &HeadShape,
        weight: &[f64],
        bias: &[f64],
        device: &Device,
    ) -> Result<Self> {
        shape.check()?;
        let (dim, classes) = (shape.dim, shape.classes);
        if shape.kind == HeadKind::Mlp || weight.len() != dim * classes || bias.len() != classes {
            return Err(Error::Model {
                model: "head".into(),
                message: format!(
                    "{} weights and {} biases for a {:?} head of {dim} features and {classes} classes",
                    weight.len(),
                    bias.len(),
                    shape.kind
                ),
            });
        }
        let params = Params::new(DType::F32, device);
        let w = Tensor::from_slice(weight, (classes, dim), device)?;
        let b = Tensor::from_slice(bias, classes, device)?;
        let layers = vec![Linear {
            weight: params.tensor("fc.weight", &w)?,
            bias: params.tensor("fc.bias", &b)?,
        }];
        Ok(Self {
            shape: *shape,
            scaler: Scaler::none(),
            params,
            layers,
            dropout_rng: Mutex::new(Rng::new(0).fork(DROPOUT_STREAM)),
        })
    }

    /// The head with `scaler`, whose statistics are then saved and loaded with it.
    pub fn with_scaler(mut self, scaler: Scaler) -> Result<Self> {
        if let (Some(mean), Some(inv)) = (&scaler.mean, &scaler.inv_std) {
            let dev = self.params.device().clone();
            let n = mean.len();
            self.params
                .buffer_tensor("scaler.mean", &Tensor::from_slice(mean, n, &dev)?)?;
            self.params
                .buffer_tensor("scaler.inv_std", &Tensor::from_slice(inv, n, &dev)?)?;
        }
        self.scaler = scaler;
        Ok(self)
    }

    pub fn scaler(&self) -> &Scaler {
        &self.scaler
    }

    pub fn shape(&self) -> &HeadShape {
        &self.shape
    }

    pub fn kind(&self) -> HeadKind {
        self.shape.kind
    }

    /// Length of the input feature vectors.
    pub fn dim(&self) -> usize {
        self.shape.dim
    }

    pub fn classes(&self) -> usize {
        self.shape.classes
    }

    /// The first layer on the batch: [`gather_linear`] on the CPU when the layer is narrow
    /// (no copy of the rows, no gradient for the features), otherwise the rows copied out and
    /// candle's matmul.
    fn first_layer(&self, x: &Rows) -> Result<Tensor> {
        let layer = &self.layers[0];
        if x.data.device().is_cpu() && layer.weight.dim(0)? <= GATHER_MAX_OUT {
            gather_linear(x.data, x.rows, &layer.weight, &layer.bias)
        } else {
            layer.forward(&x.gather()?)
        }
    }

    /// Inverted dropout: zeroes each value with probability `dropout`, scales the rest by
    /// `1 / (1 - dropout)`.
    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.shape.dropout;
        let keep = 1.0 / (1.0 - p);
        let mut rng = self.dropout_rng.lock().map_err(|_| Error::Model {
            model: "head".into(),
            message: "a thread panicked while drawing dropout masks".into(),
        })?;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.uniform_f32() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }

    /// Evaluation-mode logits `[n, classes]` of new feature rows `[n, dim]` (any dtype and
    /// device; converted to the head's).
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let (n, dim) = features.dims2()?;
        if dim != self.shape.dim {
            return Err(Error::Model {
                model: "head".into(),
                message: format!(
                    "features of length {dim} for a head over {}",
                    self.shape.dim
                ),
            });
        }
        let features = self.scaler.apply(
            &features
                .to_dtype(self.params.dtype())?
                .to_device(self.params.device())?,
        )?;
        let rows: Vec<usize> = (0..n).collect();
        self.forward_t(
            &Rows {
                data: &features,
                rows: &rows,
            },
            false,
        )
    }

    /// Writes the head (its parameters as f32, its shape as metadata) to a safetensors file,
    /// atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let s = &self.shape;
        let kind = serde_json::to_string(&s.kind).unwrap_or_default();
        let meta: HashMap<String, String> = [
            ("kind", kind),
            ("dim", s.dim.to_string()),
            ("hidden", s.hidden.to_string()),
            ("classes", s.classes.to_string()),
            ("dropout", s.dropout.to_string()),
            (
                "scaling",
                serde_json::to_string(&self.scaler.kind).unwrap_or_default(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        self.params.save(path, meta)
    }

    /// A head saved by [`Head::save`], in f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let saved = SavedState::open(path)?;
        let shape = HeadShape {
            kind: saved.field("kind")?,
            dim: saved.field("dim")?,
            hidden: saved.field("hidden")?,
            classes: saved.field("classes")?,
            dropout: saved.field("dropout")?,
        };
        shape.check()?;
        // Zero-filled layers of the saved shapes, then the file's values (drawing random
        // values first would cost seconds for the MLP's 120 million weights).
        let params = Params::new(DType::F32, device);
        let layers = shape
            .layers()
            .into_iter()
            .map(|(name, inputs, outputs)| {
                Ok(Linear {
                    weight: params.constant(&format!("{name}.weight"), (outputs, inputs), 0.0)?,
                    bias: params.constant(&format!("{name}.bias"), outputs, 0.0)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Heads saved before scaling existed have no `scaling`: they had none.
        let kind: Scaling = if saved.metadata.contains_key("scaling") {
            saved.field("scaling")?
        } else {
            Scaling::None
        };
        let stats = match kind {
            Scaling::Standardize => Some((
                params.buffer("scaler.mean", shape.dim, 0.0)?,
                params.buffer("scaler.inv_std", shape.dim, 0.0)?,
            )),
            Scaling::None | Scaling::L2 => None,
        };
        params.load(&saved)?;
        let values = |v: &Var| -> Result<Vec<f32>> { Ok(v.as_tensor().to_vec1::<f32>()?) };
        let scaler = Scaler {
            kind,
            mean: stats.as_ref().map(|(m, _)| values(m)).transpose()?,
            inv_std: stats.as_ref().map(|(_, s)| values(s)).transpose()?,
        };
        Ok(Self {
            shape,
            scaler,
            params,
            layers,
            // Dropout is off outside training; a loaded head trained again draws its masks
            // from this fixed stream.
            dropout_rng: Mutex::new(Rng::new(0).fork(DROPOUT_STREAM)),
        })
    }
}

impl Model for Head {
    fn params(&self) -> &Params {
        &self.params
    }

    /// Logits `[rows, classes]` of the batch's feature rows (`[n, dim]`, the head's dtype and
    /// device); dropout after each hidden layer when `train`.
    fn forward_t(&self, x: &Rows, train: bool) -> Result<Tensor> {
        let (_, dim) = x.data.dims2()?;
        if dim != self.shape.dim || x.data.dtype() != self.params.dtype() {
            return Err(Error::Model {
                model: "head".into(),
                message: format!(
                    "features [_, {dim}] of {:?} for a head over {} features of {:?}",
                    x.data.dtype(),
                    self.shape.dim,
                    self.params.dtype()
                ),
            });
        }
        let last = self.layers.len() - 1;
        let mut h = self.first_layer(x)?;
        for i in 0..=last {
            if i > 0 {
                h = self.layers[i].forward(&h)?;
            }
            if i < last {
                // torchvision's VGG classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout.
                h = h.relu()?;
                if train && self.shape.dropout > 0.0 {
                    h = self.drop(&h)?;
                }
            }
        }
        Ok(h)
    }
}

/// `fc1` or `fc2` (weight, bias) from timm's VGG `pre_logits` (convolutions 7x7 and 1x1,
/// reshaped to linear layers). The features must be a `[C, 7, 7]` map flattened.
fn pretrained_layer(w: &Weights, name: &str, shape: &HeadShape) -> Result<(Tensor, Tensor)> {
    let (dim, hidden) = (shape.dim, shape.hidden);
    let c = dim / 49;
    if c * 49 != dim {
        return Err(Error::Weights {
            path: w.path.clone(),
            tensor: "pre_logits.fc1.weight".into(),
            message: format!(
                "the pretrained classifier reads a [C, 7, 7] feature map, but the features \
                 have length {dim} (another input size?); use a linear head"
            ),
        });
    }
    let dev = &Device::Cpu;
    let (weight, inputs) = match name {
        "fc1" => (
            w.tensor("pre_logits.fc1.weight", &[hidden, c, 7, 7], dev)?,
            dim,
        ),
        _ => (
            w.tensor("pre_logits.fc2.weight", &[hidden, hidden, 1, 1], dev)?,
            hidden,
        ),
    };
    let bias = w.tensor(&format!("pre_logits.{name}.bias"), &[hidden], dev)?;
    Ok((weight.reshape((hidden, inputs))?, bias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainSettings;
    use crate::training::fit::{fit, Labelled, TrainOptions};

    fn data(n: usize, dim: usize, seed: u64) -> (Tensor, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..n * dim).map(|_| rng.normal_f32()).collect();
        let y = (0..n).map(|i| i % 3).collect();
        (
            Tensor::from_vec(x, (n, dim), &Device::Cpu).expect("features"),
            y,
        )
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pipeline-head-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn shape(kind: HeadKind, dim: usize, hidden: usize) -> HeadShape {
        HeadShape {
            hidden,
            ..HeadShape::new(kind, dim, 3, 0.5)
        }
    }

    fn head(s: &HeadShape, init: Option<&Weights>, seed: u64) -> Result<Head> {
        Head::new(s, init, &mut Rng::new(seed), DType::F32, &Device::Cpu)
    }

    fn logits(h: &Head, x: &Tensor, rows: &[usize], train: bool) -> Vec<Vec<f32>> {
        h.forward_t(&Rows { data: x, rows }, train)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("logits")
    }

    #[test]
    fn linear_shapes_and_pytorch_init_bounds() {
        let (x, _) = data(10, 6, 1);
        let h = head(&shape(HeadKind::Linear, 6, 0), None, 1).expect("head");
        assert_eq!(logits(&h, &x, &[0, 3, 4], true).len(), 3);
        assert_eq!(logits(&h, &x, &[1], false)[0].len(), 3);
        let w = h.layers[0]
            .weight
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>());
        let bound = 1.0 / 6f32.sqrt();
        assert!(w.expect("w").iter().all(|v| v.abs() <= bound));
        let names: Vec<String> = h
            .params()
            .sorted()
            .expect("names")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["fc.bias", "fc.weight"]);
    }

    #[test]
    fn mlp_dropout_is_seeded_and_train_only() {
        let (x, _) = data(4, 98, 2);
        let s = shape(HeadKind::Mlp, 98, 16);
        let (a, b) = (head(&s, None, 3).expect("a"), head(&s, None, 3).expect("b"));
        let rows = [0, 1, 2, 3];
        let ta = logits(&a, &x, &rows, true);
        assert_eq!(ta, logits(&b, &x, &rows, true), "same seed, same masks");
        let e1 = logits(&a, &x, &rows, false);
        assert_eq!(
            e1,
            logits(&a, &x, &rows, false),
            "evaluation is deterministic"
        );
        assert_ne!(ta, e1, "training mode drops units");
        let names: Vec<String> = a
            .params()
            .sorted()
            .expect("names")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "fc.bias",
                "fc.weight",
                "fc1.bias",
                "fc1.weight",
                "fc2.bias",
                "fc2.weight"
            ]
        );
    }

    /// A fake timm VGG file: `pre_logits` for 2x7x7 features and hidden 16, values i/1000.
    fn fake_vgg(dir: &Path) -> Weights {
        let t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| i as f32 / 1000.0).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
        };
        let tensors = [
            ("pre_logits.fc1.weight", t(&[16, 2, 7, 7])),
            ("pre_logits.fc1.bias", t(&[16])),
            ("pre_logits.fc2.weight", t(&[16, 16, 1, 1])),
            ("pre_logits.fc2.bias", t(&[16])),
            ("features.0.weight", t(&[1])),
        ];
        let path = dir.join("vgg.safetensors");
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), None).expect("ser");
        std::fs::write(&path, bytes).expect("write");
        Weights::open(path).expect("open")
    }

    #[test]
    fn mlp_starts_from_the_pretrained_classifier() {
        let dir = temp_dir("init");
        let w = fake_vgg(&dir);
        let h = head(&shape(HeadKind::Mlp, 98, 16), Some(&w), 1).expect("head");
        let fc1 = h.layers[0].weight.to_vec2::<f32>().expect("fc1");
        // fc1.weight[o, c*49 + h*7 + w] == pre_logits.fc1.weight[o, c, h, w].
        assert_eq!(fc1[1][0], 98.0 / 1000.0);
        assert_eq!(fc1[3][50], (3.0 * 98.0 + 50.0) / 1000.0);
        let fc2 = h.layers[1].weight.to_vec2::<f32>().expect("fc2");
        assert_eq!(fc2[2][5], 37.0 / 1000.0);
        let b2 = h.layers[1].bias.to_vec1::<f32>().expect("b2");
        assert_eq!(b2[15], 15.0 / 1000.0);
        assert_eq!(h.layers[2].weight.dims(), [3, 16]);

        // Features that are not a [C, 7, 7] map, or a wrong width, are errors naming a tensor.
        assert!(head(&shape(HeadKind::Mlp, 97, 16), Some(&w), 1).is_err());
        let err = head(&shape(HeadKind::Mlp, 98, 8), Some(&w), 1)
            .err()
            .expect("wrong hidden width");
        assert!(err.to_string().contains("pre_logits.fc1.weight"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn save_and_load_give_identical_logits() {
        let dir = temp_dir("save");
        for kind in [HeadKind::Linear, HeadKind::Mlp] {
            let (x, y) = data(12, 98, 4);
            let h = head(&shape(kind, 98, 16), None, 5).expect("head");
            let opts = TrainOptions {
                settings: TrainSettings::new(0.01, 2, 4),
                seed: 1,
            };
            let rows: Vec<usize> = (0..12).collect();
            let data = Labelled {
                inputs: &x,
                labels: &y,
            };
            fit(&h, &data, 3, &rows[..9], &rows[9..], &opts, |_| {}).expect("fit");
            let path = dir.join("head.safetensors");
            h.save(&path).expect("save");
            let loaded = Head::load(&path, &Device::Cpu).expect("load");
            assert_eq!(loaded.shape(), h.shape());
            let a = h
                .logits(&x)
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
                .expect("a");
            let b = loaded
                .logits(&x)
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
                .expect("b");
            assert_eq!(a, b);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_shapes_and_data_are_rejected() {
        assert!(head(&shape(HeadKind::Linear, 0, 0), None, 1).is_err());
        assert!(head(&HeadShape::new(HeadKind::Linear, 6, 3, 1.5), None, 1).is_err());
        let h = head(&shape(HeadKind::Linear, 5, 0), None, 1).expect("head");
        let (x, _) = data(3, 6, 1);
        let err = h
            .forward_t(
                &Rows {
                    data: &x,
                    rows: &[0],
                },
                false,
            )
            .expect_err("wrong dim");
        assert!(err.to_string().contains("head over 5 features"), "{err}");
        assert!(h.logits(&x).is_err());
    }
}
