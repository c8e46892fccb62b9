//! The baseline CNN's training step against PyTorch: a tiny model and batch saved by
//! `scripts/make_grad_reference.py` (with PyTorch's logits, loss, parameter gradients and
//! updated batch-norm running statistics in `tests/data/cnn_grad_reference.safetensors`) go
//! through [`Cnn`]'s training-mode forward and candle's backward over our custom ops.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use pipeline::models::Cnn;
use pipeline::training::{Model, Rows};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values")
}

/// Equal within f32 rounding of a few hundred operations: relative 1e-4 of the tensor's
/// largest magnitude, plus a small absolute floor.
fn assert_close(name: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.dims(), theirs.dims(), "{name}: shape");
    let (a, b) = (values(ours), values(theirs));
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 + 1e-4 * scale,
            "{name}[{i}]: ours {x}, PyTorch {y} (scale {scale})"
        );
    }
}

#[test]
fn cnn_gradients_match_pytorch() {
    let reference: HashMap<String, Tensor> =
        candle_core::safetensors::load(data("cnn_grad_reference.safetensors"), &Device::Cpu)
            .expect("reference data (scripts/make_grad_reference.py)");
    let get = |name: &str| {
        reference
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name}"))
    };
    let labels: Vec<usize> = values(get("labels")).iter().map(|&l| l as usize).collect();
    let n = labels.len();
    let cnn = Cnn::load(&data("cnn_grad_model.safetensors"), &Device::Cpu).expect("model");
    let rows: Vec<usize> = (0..n).collect();
    let batch = Rows {
        data: get("images"),
        rows: &rows,
    };
    let logits = cnn.forward_t(&batch, true).expect("logits");
    assert_close("logits", &logits, get("logits"));
    let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let y = Tensor::from_vec(y, n, &Device::Cpu).expect("labels");
    let loss = candle_nn::loss::cross_entropy(&logits, &y).expect("loss");
    assert_close("loss", &loss.reshape(1).expect("loss"), get("loss"));
    let grads = loss.backward().expect("backward");
    let mut checked = 0;
    for (name, var) in cnn.params().sorted().expect("params") {
        if name.contains("running") {
            assert_close(&name, var.as_tensor(), get(&format!("after.{name}")));
        } else {
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_close(&format!("grad.{name}"), g, get(&format!("grad.{name}")));
        }
        checked += 1;
    }
    assert_eq!(checked, 2 * 6 + 2);
}
