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

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, Var, WithDType,
};
use rayon::prelude::*;

use crate::cnn_ops::{axpy, data, dispatch, dot, multiversion, op_error, Float};
use crate::config::HeadKind;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::train::{save_state, select_rows, uniform, SavedState, Trainable};
use crate::weights::Weights;

/// Width of the VGG classifier's hidden layers.
pub const MLP_HIDDEN: usize = 4096;

/// Widest first layer that [`gather_linear`] computes (one dot product per row and output:
/// right for a linear head's few classes; a 4096-wide MLP layer goes to candle's matmul).
const GATHER_MAX_OUT: usize = 16;

/// Sub-stream of the caller's generator that draws the dropout masks.
const DROPOUT_STREAM: u64 = 0x4452_4F50; // "DROP"

/// One fully connected layer, PyTorch layout.
struct Linear {
    name: &'static str,
    /// `[out, in]`.
    weight: Var,
    /// `[out]`.
    bias: Var,
}

impl Linear {
    /// PyTorch's `nn.Linear` default: weight then bias from U(-1/sqrt(in), 1/sqrt(in)).
    fn random(
        name: &'static str,
        inputs: usize,
        outputs: usize,
        rng: &mut Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (inputs as f32).sqrt();
        let w = uniform(rng, inputs * outputs, bound);
        let b = uniform(rng, outputs, bound);
        Self::from_tensors(
            name,
            Tensor::from_vec(w, (outputs, inputs), device)?,
            Tensor::from_vec(b, outputs, device)?,
            dtype,
        )
    }

    fn from_tensors(name: &'static str, w: Tensor, b: Tensor, dtype: DType) -> Result<Self> {
        Ok(Self {
            name,
            weight: Var::from_tensor(&w.to_dtype(dtype)?)?,
            bias: Var::from_tensor(&b.to_dtype(dtype)?)?,
        })
    }

    /// `[n, in]` -> `[n, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

/// The feature head with its training data.
pub struct Head {
    kind: HeadKind,
    dim: usize,
    classes: usize,
    dropout: f32,
    /// `fc` alone, or `fc1`, `fc2`, `fc`.
    layers: Vec<Linear>,
    /// `[n, dim]`, the dtype and device of every parameter.
    features: Tensor,
    labels: Vec<usize>,
    /// Draws dropout masks, so that training runs are reproducible.
    rng: Rng,
}

impl Head {
    /// A new head over `features` (`[n, dim]`, any float dtype; the parameters take its dtype
    /// and device) and their `labels`.
    ///
    /// The final layer is always new. For [`HeadKind::Mlp`], `fc1` and `fc2` come from the
    /// pretrained classifier when `init` holds timm's `pre_logits.fc1.*` (a 7x7 convolution over
    /// the `[C, 7, 7]` feature map, flattened in the same C,H,W order as the features) and
    /// `pre_logits.fc2.*`; otherwise they are random too. Random layers are drawn from `rng`
    /// in layer order, weight before bias; the dropout masks from a fork of it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: HeadKind,
        dim: usize,
        classes: usize,
        dropout: f32,
        features: Tensor,
        labels: Vec<usize>,
        init: Option<&Weights>,
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::with_hidden(
            kind, dim, MLP_HIDDEN, classes, dropout, features, labels, init, rng,
        )
    }

    /// [`Head::new`] with another hidden width (tests use small ones).
    #[allow(clippy::too_many_arguments)]
    fn with_hidden(
        kind: HeadKind,
        dim: usize,
        hidden: usize,
        classes: usize,
        dropout: f32,
        features: Tensor,
        labels: Vec<usize>,
        init: Option<&Weights>,
        rng: &mut Rng,
    ) -> Result<Self> {
        check_shape(dim, classes, dropout)?;
        let dtype = features.dtype();
        let device = features.device().clone();
        let layers = match kind {
            HeadKind::Linear => vec![Linear::random("fc", dim, classes, rng, dtype, &device)?],
            HeadKind::Mlp => {
                let pretrained = init.filter(|w| w.contains("pre_logits.fc1.weight"));
                let (fc1, fc2) = match pretrained {
                    Some(w) => pretrained_classifier(w, dim, hidden, dtype, &device)?,
                    None => (
                        Linear::random("fc1", dim, hidden, rng, dtype, &device)?,
                        Linear::random("fc2", hidden, hidden, rng, dtype, &device)?,
                    ),
                };
                let fc = Linear::random("fc", hidden, classes, rng, dtype, &device)?;
                vec![fc1, fc2, fc]
            }
        };
        Self::from_layers(
            kind,
            dim,
            classes,
            dropout,
            layers,
            rng.fork(DROPOUT_STREAM),
        )?
        .with_data(features, labels)
    }

    /// A head of these layers without training data; `dropout_rng` draws its dropout masks.
    /// The layers' dtype and device are the head's.
    fn from_layers(
        kind: HeadKind,
        dim: usize,
        classes: usize,
        dropout: f32,
        layers: Vec<Linear>,
        dropout_rng: Rng,
    ) -> Result<Self> {
        let weight = layers[0].weight.as_tensor();
        let features = Tensor::zeros((0, dim), weight.dtype(), weight.device())?;
        Ok(Self {
            kind,
            dim,
            classes,
            dropout,
            layers,
            features,
            labels: Vec::new(),
            rng: dropout_rng,
        })
    }

    /// The head with other training data (`[n, dim]` features and their labels), converted to
    /// the head's dtype and device.
    pub fn with_data(mut self, features: Tensor, labels: Vec<usize>) -> Result<Self> {
        let (n, dim) = features.dims2()?;
        if dim != self.dim || labels.len() != n {
            return Err(Error::Training(format!(
                "features [{n}, {dim}] with {} labels for a head over {} features",
                labels.len(),
                self.dim
            )));
        }
        if let Some((row, l)) = labels.iter().enumerate().find(|(_, &l)| l >= self.classes) {
            return Err(Error::Training(format!(
                "row {row} has label {l}, but the head has {} classes",
                self.classes
            )));
        }
        let p = self.layers[0].weight.as_tensor();
        self.features = features.to_dtype(p.dtype())?.to_device(p.device())?;
        self.labels = labels;
        Ok(self)
    }

    pub fn kind(&self) -> HeadKind {
        self.kind
    }

    /// Length of the input feature vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Logits `[rows.len(), classes]` of feature rows `rows` of `features` (`[n, dim]`, the
    /// head's dtype and device); dropout (when `train`) with masks from our Rng.
    fn forward(&mut self, features: &Tensor, rows: &[usize], train: bool) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut x = self.first_layer(features, rows)?;
        for i in 0..=last {
            if i > 0 {
                x = self.layers[i].forward(&x)?;
            }
            if i < last {
                // torchvision's VGG classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout.
                x = x.relu()?;
                if train && self.dropout > 0.0 {
                    x = self.drop(&x)?;
                }
            }
        }
        Ok(x)
    }

    /// The first layer on rows `rows` of `features`: [`gather_linear`] on the CPU when the
    /// layer is narrow (no copy of the rows, no gradient for the features), otherwise the
    /// rows copied out and candle's matmul.
    fn first_layer(&self, features: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let layer = &self.layers[0];
        if features.device().is_cpu() && layer.weight.dim(0)? <= GATHER_MAX_OUT {
            gather_linear(features, rows, &layer.weight, &layer.bias)
        } else {
            layer.forward(&select_rows(features, rows)?)
        }
    }

    /// Inverted dropout: zeroes each value with probability `dropout`, scales the rest by
    /// `1 / (1 - dropout)`.
    fn drop(&mut self, x: &Tensor) -> Result<Tensor> {
        let keep = 1.0 / (1.0 - self.dropout);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if self.rng.uniform_f32() < self.dropout {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }

    /// Evaluation-mode logits `[n, classes]` of new feature rows `[n, dim]` (any dtype/device;
    /// converted to the head's).
    pub fn logits_for(&self, features: &Tensor) -> Result<Tensor> {
        let (_, dim) = features.dims2()?;
        if dim != self.dim {
            return Err(Error::Training(format!(
                "features of length {dim} for a head over {}",
                self.dim
            )));
        }
        let p = self.layers[0].weight.as_tensor();
        let features = features.to_dtype(p.dtype())?.to_device(p.device())?;
        let rows: Vec<usize> = (0..features.dim(0)?).collect();
        let mut x = self.first_layer(&features, &rows)?;
        for layer in &self.layers[1..] {
            x = layer.forward(&x.relu()?)?;
        }
        Ok(x)
    }

    /// Writes the head (its parameters as f32, its shape as metadata) to a safetensors file,
    /// atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let kind = serde_json::to_string(&self.kind).unwrap_or_default();
        let meta: HashMap<String, String> = [
            ("kind", kind),
            ("dim", self.dim.to_string()),
            ("hidden", self.hidden().to_string()),
            ("classes", self.classes.to_string()),
            ("dropout", self.dropout.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        save_state(self, path, meta)
    }

    /// A head saved by [`Head::save`], in f32 on `device`, without training data (attach some
    /// with [`Head::with_data`]; [`Head::logits_for`] needs none).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let saved = SavedState::open(path)?;
        let kind: HeadKind = saved.field("kind")?;
        let dim: usize = saved.field("dim")?;
        let hidden: usize = saved.field("hidden")?;
        let classes: usize = saved.field("classes")?;
        let dropout: f32 = saved.field("dropout")?;
        check_shape(dim, classes, dropout)?;
        // Zero-filled layers of the saved shapes, then the file's values (drawing random
        // values first would cost seconds for the MLP's 120 million weights).
        let zeros = |name, inputs: usize, outputs: usize| -> Result<Linear> {
            Linear::from_tensors(
                name,
                Tensor::zeros((outputs, inputs), DType::F32, device)?,
                Tensor::zeros(outputs, DType::F32, device)?,
                DType::F32,
            )
        };
        let layers = match kind {
            HeadKind::Linear => vec![zeros("fc", dim, classes)?],
            HeadKind::Mlp => vec![
                zeros("fc1", dim, hidden)?,
                zeros("fc2", hidden, hidden)?,
                zeros("fc", hidden, classes)?,
            ],
        };
        // Dropout is off outside training; a loaded head given data to train on again draws
        // its masks from this fixed stream.
        let rng = Rng::new(0).fork(DROPOUT_STREAM);
        let head = Self::from_layers(kind, dim, classes, dropout, layers, rng)?;
        saved.load_into(&head)?;
        Ok(head)
    }

    fn hidden(&self) -> usize {
        match self.kind {
            HeadKind::Linear => 0,
            HeadKind::Mlp => self.layers[0].weight.dims()[0],
        }
    }
}

/// Rejects heads without inputs or classes, and dropout outside `[0, 1)`.
fn check_shape(dim: usize, classes: usize, dropout: f32) -> Result<()> {
    if dim == 0 || classes == 0 {
        return Err(Error::Training(format!(
            "a head needs inputs and classes (dim {dim}, classes {classes})"
        )));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(Error::Training(format!(
            "dropout {dropout} is not in [0, 1)"
        )));
    }
    Ok(())
}

/// `fc1` and `fc2` from timm's VGG `pre_logits` (convolutions 7x7 and 1x1, reshaped to linear
/// layers). The features must be a `[C, 7, 7]` map flattened.
fn pretrained_classifier(
    w: &Weights,
    dim: usize,
    hidden: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Linear, Linear)> {
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
    let fc1_w = w.tensor("pre_logits.fc1.weight", &[hidden, c, 7, 7], device)?;
    let fc1_b = w.tensor("pre_logits.fc1.bias", &[hidden], device)?;
    let fc2_w = w.tensor("pre_logits.fc2.weight", &[hidden, hidden, 1, 1], device)?;
    let fc2_b = w.tensor("pre_logits.fc2.bias", &[hidden], device)?;
    Ok((
        Linear::from_tensors("fc1", fc1_w.reshape((hidden, dim))?, fc1_b, dtype)?,
        Linear::from_tensors("fc2", fc2_w.reshape((hidden, hidden))?, fc2_b, dtype)?,
    ))
}

impl Trainable for Head {
    fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.weight.clone(), l.bias.clone()])
            .collect()
    }

    fn state(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    (format!("{}.weight", l.name), l.weight.clone()),
                    (format!("{}.bias", l.name), l.bias.clone()),
                ]
            })
            .collect()
    }

    fn train_logits(&mut self, rows: &[usize]) -> Result<Tensor> {
        let features = self.features.clone();
        self.forward(&features, rows, true)
    }

    fn eval_logits(&self, rows: &[usize]) -> Result<Tensor> {
        let mut x = self.first_layer(&self.features, rows)?;
        for layer in &self.layers[1..] {
            x = layer.forward(&x.relu()?)?;
        }
        Ok(x)
    }

    fn labels(&self) -> &[usize] {
        &self.labels
    }

    fn device(&self) -> &Device {
        self.features.device()
    }
}

/// `out[r] = features[rows[r]] . weight^T + bias`, without copying the rows out: `features
/// [n, dim]` (never given a gradient: cached data), `weight [out, dim]`, `bias [out]` ->
/// `[rows.len(), out]`. Row indices must be in range (checked).
///
/// Why not `index_select` + `matmul`: for a linear head, the step is a few passes over the
/// batch's features, and candle's matmul backward also computes the (unneeded) gradient of
/// the selected rows (a `[batch, dim]` zeros + matmul + add) besides the copy itself.
pub(crate) fn gather_linear(
    features: &Tensor,
    rows: &[usize],
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (n, dim) = features.dims2()?;
    let (out, wdim) = weight.dims2()?;
    if wdim != dim || bias.dims() != [out] {
        return Err(Error::Training(format!(
            "linear layer {:?} + {:?} over features [{n}, {dim}]",
            weight.dims(),
            bias.dims()
        )));
    }
    if let Some(r) = rows.iter().find(|&&r| r >= n) {
        return Err(Error::Training(format!("row {r} of {n} feature rows")));
    }
    let op = GatherLinear {
        rows: rows.to_vec(),
    };
    Ok(features
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// Forward of [`gather_linear`].
struct GatherLinear {
    rows: Vec<usize>,
}

/// One output row: `yr[o] = b[o] + xr . w[o]`.
#[inline(always)]
fn gather_row_kernel<T: Float>(xr: &[T], w: &[T], b: &[T], yr: &mut [T]) {
    let dim = xr.len();
    for (o, v) in yr.iter_mut().enumerate() {
        *v = T::from_f64(b[o].to_f64() + dot(xr, &w[o * dim..][..dim]));
    }
}

multiversion!(fn gather_row<T>(xr: &[T], w: &[T], b: &[T], yr: &mut [T]) => gather_row_kernel);

fn gather_linear_forward<T: Float>(x: &[T], w: &[T], b: &[T], rows: &[usize]) -> Vec<T> {
    let out = b.len();
    let dim = w.len() / out.max(1);
    let mut y = vec![T::from_f64(0.0); rows.len() * out];
    y.par_chunks_mut(out.max(1))
        .zip(rows.par_iter())
        .for_each(|(yr, &r)| gather_row(&x[r * dim..][..dim], w, b, yr));
    y
}

/// Columns `start..start + acc.len() / out` of `dweight`, into `acc [out, len]`.
#[inline(always)]
fn grad_columns_kernel<T: Float>(
    x: &[T],
    g: &[T],
    rows: &[usize],
    dim: usize,
    start: usize,
    acc: &mut [T],
) {
    let out = g.len() / rows.len().max(1);
    let len = acc.len() / out.max(1);
    for (k, &r) in rows.iter().enumerate() {
        let xr = &x[r * dim + start..][..len];
        for o in 0..out {
            axpy(&mut acc[o * len..][..len], g[k * out + o], xr);
        }
    }
}

multiversion!(fn grad_columns<T>(x: &[T], g: &[T], rows: &[usize], dim: usize, start: usize, acc: &mut [T]) => grad_columns_kernel);

/// Packed `[dweight (out * dim) | dbias (out)]`: `dweight[o] = sum_r g[r, o] * x[rows[r]]`,
/// split over column ranges (no reduction across threads: deterministic).
fn gather_linear_backward<T: Float>(x: &[T], g: &[T], rows: &[usize], dim: usize) -> Vec<T> {
    const COLS: usize = 2048;
    let out = g.len() / rows.len().max(1);
    let chunks: Vec<Vec<T>> = (0..dim.div_ceil(COLS))
        .into_par_iter()
        .map(|c| {
            let (start, len) = (c * COLS, COLS.min(dim - c * COLS));
            let mut acc = vec![T::from_f64(0.0); out * len];
            grad_columns(x, g, rows, dim, start, &mut acc);
            acc
        })
        .collect();
    let mut packed = vec![T::from_f64(0.0); out * dim + out];
    for (c, acc) in chunks.iter().enumerate() {
        let (start, len) = (c * COLS, COLS.min(dim - c * COLS));
        for o in 0..out {
            packed[o * dim + start..][..len].copy_from_slice(&acc[o * len..][..len]);
        }
    }
    for o in 0..out {
        let s: f64 = (0..rows.len()).map(|k| g[k * out + o].to_f64()).sum();
        packed[out * dim + o] = T::from_f64(s);
    }
    packed
}

impl CustomOp3 for GatherLinear {
    fn name(&self) -> &'static str {
        "gather-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = l3.dims().first().copied().unwrap_or(0);
        dispatch!(s1.dtype(), "gather-linear", T => {
            let y = gather_linear_forward::<T>(
                data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, &self.rows,
            );
            Ok((T::to_cpu_storage_owned(y), Shape::from((self.rows.len(), out))))
        })
    }

    fn bwd(
        &self,
        features: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GatherLinearGrad {
            rows: self.rows.clone(),
        };
        let packed = features.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let n = weight.elem_count();
        let dw = packed.narrow(0, 0, n)?.reshape(weight.shape())?;
        let db = packed.narrow(0, n, bias.elem_count())?;
        Ok((None, Some(dw), Some(db)))
    }
}

/// `(features, grad)` -> packed `[dweight | dbias]` (see [`gather_linear_backward`]).
struct GatherLinearGrad {
    rows: Vec<usize>,
}

impl CustomOp2 for GatherLinearGrad {
    fn name(&self) -> &'static str {
        "gather-linear-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, dim) = l1.shape().dims2()?;
        let (rows, out) = l2.shape().dims2()?;
        if rows != self.rows.len() {
            return Err(op_error(format!(
                "gather-linear backward: gradient {:?} for {} rows",
                l2.dims(),
                self.rows.len()
            )));
        }
        dispatch!(s1.dtype(), "gather-linear backward", T => {
            let p = gather_linear_backward::<T>(data(s1, l1)?, data(s2, l2)?, &self.rows, dim);
            Ok((T::to_cpu_storage_owned(p), Shape::from(out * dim + out)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{fit, TrainOptions};

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

    #[test]
    fn linear_shapes_and_pytorch_init_bounds() {
        let (x, y) = data(10, 6, 1);
        let mut head =
            Head::new(HeadKind::Linear, 6, 3, 0.5, x, y, None, &mut Rng::new(1)).expect("head");
        assert_eq!(
            head.train_logits(&[0, 3, 4]).expect("logits").dims(),
            [3, 3]
        );
        assert_eq!(head.eval_logits(&[1]).expect("logits").dims(), [1, 3]);
        let w = head.layers[0]
            .weight
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>());
        let bound = 1.0 / 6f32.sqrt();
        assert!(w.expect("w").iter().all(|v| v.abs() <= bound));
        let state: Vec<String> = head.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(state, ["fc.weight", "fc.bias"]);
    }

    #[test]
    fn mlp_dropout_is_seeded_and_train_only() {
        let (x, y) = data(4, 98, 2);
        let mut a = Head::with_hidden(
            HeadKind::Mlp,
            98,
            16,
            3,
            0.5,
            x.clone(),
            y.clone(),
            None,
            &mut Rng::new(3),
        )
        .expect("head");
        let mut b = Head::with_hidden(HeadKind::Mlp, 98, 16, 3, 0.5, x, y, None, &mut Rng::new(3))
            .expect("head");
        let rows = [0, 1, 2, 3];
        let ta = a
            .train_logits(&rows)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("a");
        let tb = b
            .train_logits(&rows)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("b");
        assert_eq!(ta, tb, "same seed, same masks");
        let e1 = a
            .eval_logits(&rows)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("eval");
        let e2 = a
            .eval_logits(&rows)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("eval");
        assert_eq!(e1, e2, "evaluation is deterministic");
        assert_ne!(ta, e1, "training mode drops units");
        let names: Vec<String> = a.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
                "fc.weight",
                "fc.bias"
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
        let (x, y) = data(4, 98, 2);
        let head = Head::with_hidden(
            HeadKind::Mlp,
            98,
            16,
            3,
            0.5,
            x,
            y,
            Some(&w),
            &mut Rng::new(1),
        )
        .expect("head");
        let fc1 = head.layers[0].weight.to_vec2::<f32>().expect("fc1");
        // fc1.weight[o, c*49 + h*7 + w] == pre_logits.fc1.weight[o, c, h, w].
        assert_eq!(fc1[1][0], 98.0 / 1000.0);
        assert_eq!(fc1[3][50], (3.0 * 98.0 + 50.0) / 1000.0);
        let fc2 = head.layers[1].weight.to_vec2::<f32>().expect("fc2");
        assert_eq!(fc2[2][5], 37.0 / 1000.0);
        let b2 = head.layers[1].bias.to_vec1::<f32>().expect("b2");
        assert_eq!(b2[15], 15.0 / 1000.0);
        assert_eq!(head.layers[2].weight.dims(), [3, 16]);

        // Features that are not a [C, 7, 7] map, or a wrong width, are errors naming a tensor.
        let (x, y) = data(4, 97, 2);
        let err = Head::with_hidden(
            HeadKind::Mlp,
            97,
            16,
            3,
            0.5,
            x,
            y,
            Some(&w),
            &mut Rng::new(1),
        );
        assert!(err.is_err());
        let (x, y) = data(4, 98, 2);
        let err = Head::with_hidden(
            HeadKind::Mlp,
            98,
            8,
            3,
            0.5,
            x,
            y,
            Some(&w),
            &mut Rng::new(1),
        )
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
            let mut head =
                Head::with_hidden(kind, 98, 16, 3, 0.5, x.clone(), y, None, &mut Rng::new(5))
                    .expect("head");
            let opts = TrainOptions {
                epochs: 2,
                batch_size: 4,
                lr: 0.01,
                schedule: crate::config::Schedule::Constant,
                step_size: 1,
                gamma: 1.0,
                early_stopping: None,
                seed: 1,
            };
            let rows: Vec<usize> = (0..12).collect();
            fit(&mut head, &rows[..9], &rows[9..], &opts, |_| {}).expect("fit");
            let path = dir.join("head.safetensors");
            head.save(&path).expect("save");
            let loaded = Head::load(&path, &Device::Cpu).expect("load");
            assert_eq!(loaded.kind(), kind);
            assert_eq!((loaded.dim(), loaded.classes()), (98, 3));
            let a = head
                .logits_for(&x)
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
                .expect("a");
            let b = loaded
                .logits_for(&x)
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
                .expect("b");
            assert_eq!(a, b);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_data_is_rejected() {
        let (x, _) = data(3, 6, 1);
        let bad_label = Head::new(
            HeadKind::Linear,
            6,
            3,
            0.5,
            x.clone(),
            vec![0, 1, 3],
            None,
            &mut Rng::new(1),
        );
        assert!(bad_label.is_err());
        let short = Head::new(
            HeadKind::Linear,
            6,
            3,
            0.5,
            x.clone(),
            vec![0],
            None,
            &mut Rng::new(1),
        );
        assert!(short.is_err());
        let wrong_dim = Head::new(
            HeadKind::Linear,
            5,
            3,
            0.5,
            x,
            vec![0, 1, 2],
            None,
            &mut Rng::new(1),
        );
        assert!(wrong_dim.is_err());
    }
}
