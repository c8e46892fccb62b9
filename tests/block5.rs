//! Fine-tuning VGG16's block 5 ([`pipeline::models::Block5Head`] and its convolution
//! [`pipeline::models::gemm_conv::conv3x3_gemm`]): gradients against finite differences (f64,
//! every parameter) and against PyTorch (`scripts/make_block5_reference.py`, 1e-5 relative),
//! and the saved model's round trip. Small channels and sides, so all of it runs in seconds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use pipeline::features::Weights;
use pipeline::models::gemm_conv::conv3x3_gemm;
use pipeline::models::{Block5Head, Block5Shape};
use pipeline::training::{Model, Rng, Rows};

use crate::train_grad_ops::{check, random, values, weighted};

/// (batch, in channels, out channels, height, width): odd sizes, batch 1, width 1, more images
/// than one weight-gradient chunk (8).
const SHAPES: [(usize, usize, usize, usize, usize); 5] = [
    (1, 1, 1, 3, 3),
    (5, 3, 4, 5, 7),
    (1, 8, 2, 6, 5),
    (3, 2, 8, 4, 1),
    (11, 2, 3, 2, 3),
];

#[test]
fn gemm_conv_gradients_match_finite_differences() {
    let mut rng = Rng::new(11);
    for (n, cin, cout, h, w) in SHAPES {
        let x = Var::from_tensor(&random(&[n, cin, h, w], &mut rng, -1.0, 1.0)).expect("x");
        let wt = Var::from_tensor(&random(&[cout, cin, 3, 3], &mut rng, -1.0, 1.0)).expect("w");
        let b = Var::from_tensor(&random(&[cout], &mut rng, -1.0, 1.0)).expect("b");
        let r = random(&[n, cout, h, w], &mut rng, -1.0, 1.0);
        let out = conv3x3_gemm(&x, &wt, &b).expect("conv");
        // The forward agrees with candle's conv2d.
        let theirs = x
            .conv2d(&wt, 1, 1, 1, 1)
            .and_then(|y| y.broadcast_add(&b.reshape((1, cout, 1, 1))?))
            .expect("candle");
        for (p, q) in values(&out).iter().zip(values(&theirs)) {
            assert!((p - q).abs() < 1e-12, "forward {p} vs candle {q}");
        }
        let grads = weighted(&out, &r).backward().expect("backward");
        let loss = || {
            let out = conv3x3_gemm(&x, &wt, &b).expect("conv");
            weighted(&out, &r).to_scalar::<f64>().expect("loss")
        };
        let shape = format!("{n}x{cin}x{h}x{w} -> {cout}");
        for (name, var) in [("x", &x), ("weight", &wt), ("bias", &b)] {
            let g = grads.get(var).expect("gradient");
            check(&format!("gemm conv {shape} {name}"), var, g, loss);
        }
    }
}

#[test]
fn gemm_conv_gives_no_gradient_to_untracked_input_and_rejects_bad_shapes() {
    let mut rng = Rng::new(12);
    let x = random(&[5, 3, 5, 7], &mut rng, 0.0, 1.0);
    let wt = Var::from_tensor(&random(&[4, 3, 3, 3], &mut rng, -1.0, 1.0)).expect("w");
    let b = Var::from_tensor(&random(&[4], &mut rng, -1.0, 1.0)).expect("b");
    let grads = conv3x3_gemm(&x, &wt, &b)
        .and_then(|y| Ok(y.sum_all()?.backward()?))
        .expect("backward");
    assert!(grads.get(&x).is_none());
    assert!(grads.get(&wt).is_some() && grads.get(&b).is_some());
    assert!(conv3x3_gemm(&x, &random(&[4, 2, 3, 3], &mut rng, 0.0, 1.0), &b).is_err());
    assert!(conv3x3_gemm(&x, &wt, &random(&[3], &mut rng, 0.0, 1.0)).is_err());
}

/// A weights file holding block 5 (`features.24/26/28`) of `c` channels, drawn from `seed`.
fn block5_weights(dir: &Path, c: usize, seed: u64) -> Weights {
    let mut rng = Rng::new(seed);
    let bound = 3.0 / ((c * 9) as f64).sqrt();
    let mut tensors = HashMap::new();
    for index in [24, 26, 28] {
        let w = random(&[c, c, 3, 3], &mut rng, -bound, bound);
        let b = random(&[c], &mut rng, -0.1, 0.1);
        tensors.insert(
            format!("features.{index}.weight"),
            w.to_dtype(DType::F32).expect("w"),
        );
        tensors.insert(
            format!("features.{index}.bias"),
            b.to_dtype(DType::F32).expect("b"),
        );
    }
    let path = dir.join(format!("block5-{c}-{seed}.safetensors"));
    candle_core::safetensors::save(&tensors, &path).expect("save weights");
    Weights::open(path).expect("open weights")
}

fn shape(c: usize, side: usize, classes: usize) -> Block5Shape {
    Block5Shape {
        channels: c,
        side,
        classes,
        conv_lr_scale: 0.1,
    }
}

#[test]
fn block5_gradients_match_finite_differences() {
    let dir = testkit::temp_dir("block5-fd");
    // (channels, side, classes, batch): an odd side drops the pool's last row and column.
    for (c, side, classes, n) in [(4, 4, 3, 3), (3, 5, 2, 2)] {
        let weights = block5_weights(&dir, c, 7);
        let model = Block5Head::new(
            &shape(c, side, classes),
            &weights,
            &mut Rng::new(8),
            DType::F64,
            &Device::Cpu,
        )
        .expect("model");
        let mut rng = Rng::new(9);
        // Block-4 activations are ReLU outputs: non-negative.
        let x = random(&[n, c * side * side], &mut rng, 0.0, 1.0);
        let rows: Vec<usize> = (0..n).rev().collect();
        let batch = Rows {
            data: &x,
            rows: &rows,
        };
        let r = random(&[n, classes], &mut rng, -1.0, 1.0);
        let out = model.forward_t(&batch, true).expect("logits");
        let grads = weighted(&out, &r).backward().expect("backward");
        let params = model.params().sorted().expect("params");
        assert_eq!(params.len(), 3 * 2 + 2, "three convs and the head");
        for (name, var) in params {
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let loss = || {
                let out = model.forward_t(&batch, false).expect("logits");
                weighted(&out, &r).to_scalar::<f64>().expect("loss")
            };
            check(&format!("block5 c{c} s{side} {name}"), &var, g, loss);
        }
        // The per-group learning rates: convolutions at conv_lr_scale, the head at 1.
        assert_eq!(model.lr_scale("block5.conv0.weight"), 0.1);
        assert_eq!(model.lr_scale("fc.weight"), 1.0);
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/block5_reference.safetensors")
}

/// PyTorch's model, loss and gradients, run through [`Block5Head`] in `dtype`; every
/// parameter's gradient is compared to `tol` relative to the largest magnitude of PyTorch's.
fn compare_with_pytorch(dtype: DType, tol: f64) {
    let reference: HashMap<String, Tensor> =
        candle_core::safetensors::load(reference_path(), &Device::Cpu)
            .expect("reference data (scripts/make_block5_reference.py)");
    let get = |name: &str| {
        reference
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name}"))
    };
    let (n, c, side, _) = get("x").dims4().expect("x");
    let classes = get("fc.bias").dim(0).expect("classes");
    let weights = Weights::open(reference_path()).expect("weights");
    let model = Block5Head::new(
        &shape(c, side, classes),
        &weights,
        &mut Rng::new(1),
        dtype,
        &Device::Cpu,
    )
    .expect("model");
    // Every parameter set to PyTorch's exact values (`Weights` reads f32).
    let ours_to_theirs = |name: &str| -> String {
        match name {
            "fc.weight" | "fc.bias" => name.to_string(),
            _ => {
                let i: usize = name[11..12].parse().expect("conv index");
                format!("features.{}.{}", 24 + 2 * i, &name[13..])
            }
        }
    };
    let params = model.params().sorted().expect("params");
    for (name, var) in &params {
        let theirs = get(&ours_to_theirs(name)).to_dtype(dtype).expect("dtype");
        var.set(&theirs).expect("set");
    }
    let x = get("x")
        .flatten_from(1)
        .and_then(|x| x.to_dtype(dtype))
        .expect("x");
    let rows: Vec<usize> = (0..n).collect();
    let logits = model
        .forward_t(
            &Rows {
                data: &x,
                rows: &rows,
            },
            true,
        )
        .expect("logits");
    let labels: Vec<u32> = values(get("labels")).iter().map(|&l| l as u32).collect();
    let labels = Tensor::from_vec(labels, n, &Device::Cpu).expect("labels");
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).expect("loss");
    let close = |what: &str, ours: &Tensor, theirs: &Tensor| {
        assert_eq!(ours.dims(), theirs.dims(), "{what}: shape");
        let (a, b) = (
            values(&ours.to_dtype(DType::F64).expect("f64")),
            values(theirs),
        );
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(
                (p - q).abs() <= tol * scale,
                "{what}[{i}] ({dtype:?}): ours {p}, PyTorch {q} (scale {scale})"
            );
        }
    };
    close("logits", &logits, get("logits"));
    close("loss", &loss.reshape(1).expect("loss"), get("loss"));
    let grads = loss.backward().expect("backward");
    for (name, var) in &params {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        close(
            &format!("grad {name}"),
            g,
            get(&format!("grad.{}", ours_to_theirs(name))),
        );
    }
}

#[test]
fn block5_gradients_match_pytorch() {
    compare_with_pytorch(DType::F64, 1e-5);
    // The training dtype, within f32 rounding.
    compare_with_pytorch(DType::F32, 1e-4);
}

#[test]
fn block5_save_load_gives_identical_logits() {
    let dir = testkit::temp_dir("block5-save");
    let (c, side, classes) = (4, 4, 2);
    let weights = block5_weights(&dir, c, 3);
    let model = Block5Head::new(
        &shape(c, side, classes),
        &weights,
        &mut Rng::new(4),
        DType::F32,
        &Device::Cpu,
    )
    .expect("model");
    let x = random(&[6, c * side * side], &mut Rng::new(5), 0.0, 1.0)
        .to_dtype(DType::F32)
        .expect("x");
    let path = dir.join("block5.safetensors");
    model.save(&path).expect("save");
    let loaded = Block5Head::load(&path, &Device::Cpu).expect("load");
    assert_eq!(loaded.shape(), model.shape());
    let (a, b) = (
        model.logits(&x).expect("logits"),
        loaded.logits(&x).expect("logits"),
    );
    let (a, b) = (
        a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a"),
        b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b"),
    );
    assert_eq!(a, b);
    // A file that is not a block-5 model is an error naming it, not a panic.
    let bad = dir.join("not-a-model.safetensors");
    std::fs::write(&bad, b"garbage").expect("write");
    let err = Block5Head::load(&bad, &Device::Cpu).err().expect("error");
    assert!(err.to_string().contains("not-a-model"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Seeded batch of `b` images of side `s` in the range of Oxford-preprocessed pixels.
fn images(b: usize, s: usize) -> Tensor {
    let mut rng = Rng::new(21);
    random(&[b, 3, s, s], &mut rng, -120.0, 135.0)
        .to_dtype(DType::F32)
        .expect("f32")
}

/// max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        values(&a.to_dtype(DType::F64).expect("a")),
        values(&b.to_dtype(DType::F64).expect("b")),
    );
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn pool4_engines_agree_and_block5_on_pool4_gives_pool5() {
    use pipeline::features::store::Layer;
    use pipeline::features::{load_layer, BackboneOptions};
    let weights = Weights::open(crate::common::random_weights().to_path_buf()).expect("weights");
    let x = images(3, 64);
    let options = BackboneOptions::default();
    let pool4 = load_layer("vgg16", Layer::Pool4, &weights, &Device::Cpu, &options)
        .and_then(|b| b.forward(&x))
        .expect("pool4");
    assert_eq!(pool4.dims(), &[3, 512 * 4 * 4]);
    // The candle engine (the CUDA path) cut the same way agrees.
    let candle = pipeline::Vgg16Features::load_candle(&weights, &Device::Cpu, DType::F32, 1 << 20)
        .and_then(|v| v.through_block4())
        .and_then(|v| v.forward(&x))
        .expect("candle pool4");
    assert!(rel(&candle, &pool4) <= 1e-5, "{:e}", rel(&candle, &pool4));
    // Block 5 of the same weights on the pool4 activations is the whole network's pool5.
    let pool5 = load_layer("vgg16", Layer::Output, &weights, &Device::Cpu, &options)
        .and_then(|b| b.forward(&x))
        .expect("pool5");
    let model = Block5Head::new(
        &shape(512, 4, 2),
        &weights,
        &mut Rng::new(1),
        DType::F32,
        &Device::Cpu,
    )
    .expect("model");
    let ours = model.block5_features(&pool4).expect("block 5");
    assert_eq!(ours.dims(), pool5.dims());
    assert!(rel(&ours, &pool5) <= 1e-5, "{:e}", rel(&ours, &pool5));
    // pool4 is VGG16's: another backbone is an error naming the key.
    let err = load_layer(
        "efficientnet_lite0",
        Layer::Pool4,
        &weights,
        &Device::Cpu,
        &options,
    )
    .err()
    .expect("error");
    assert!(err.to_string().contains("head.unfreeze"), "{err}");
}

/// Reads `predict`'s CSV: (image, label, probabilities).
fn read_predictions(path: &Path) -> Vec<(String, String, Vec<f32>)> {
    std::fs::read_to_string(path)
        .expect("predictions")
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let probs = cells[2..]
                .iter()
                .map(|p| p.parse().expect("prob"))
                .collect();
            (cells[0].to_string(), cells[1].to_string(), probs)
        })
        .collect()
}

/// Probabilities of the run's saved model on the store's rows, computed here directly.
fn direct_probabilities(run: &Path, features: &Tensor) -> Vec<Vec<f32>> {
    let model = Block5Head::load(&run.join("block5.safetensors"), &Device::Cpu).expect("load");
    let logits = model.logits(features).expect("logits");
    pipeline::training::probabilities(&logits).expect("probabilities")
}

/// `train-head` with `unfreeze = "block5"` on a generated dataset (random weights, 32x32, so
/// block 4's map is 2x2): it extracts the block-4 activations itself into their own space,
/// trains the head and then block 5, records a block-5 run, and `predict` runs the frozen
/// convs to pool4, then the fine-tuned block and head.
#[test]
fn block5_run_extracts_pool4_trains_and_predicts() {
    use pipeline::config::Unfreeze;
    use pipeline::features::store::Layer;
    let (dir, mut c) = crate::common::fixture("block5-e2e", 12);
    c.head.unfreeze = Unfreeze::Block5;
    c.head.finetune_epochs = 2;
    c.head.train.epochs = 3;
    c.head.train.batch_size = 4;
    c.split.val_fraction = 0.25;
    c.output.runs = dir.join("runs");
    c.validate().expect("valid");
    let run = pipeline::training::study::train_head(&c).expect("train-head");
    let name = run
        .dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("head-block5-"), "{name}");
    assert!(run.metrics.name.contains("block 5"), "{}", run.metrics.name);
    assert_eq!(run.metrics.history.len(), 3 + 2);
    let epochs: Vec<usize> = run.metrics.history.iter().map(|r| r.epoch).collect();
    assert_eq!(epochs, [1, 2, 3, 4, 5]);
    assert!(run.dir.join("block5.safetensors").is_file());
    let key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.dir.join("cache_key.json")).expect("key"))
            .expect("json");
    assert_eq!(key["layer"], "pool4");
    // The store now holds the pool4 space, complete: extract computes nothing more.
    let set = crate::common::load(&c).expect("pool4 features");
    assert_eq!(set.key.layer, Layer::Pool4);
    assert_eq!(set.features.dims(), [12, 512 * 2 * 2]);
    let again = pipeline::features::extract::run(&c).expect("extract");
    assert_eq!(again.computed, 0);
    // predict: the images are in the store; computed again from the files in a fresh store,
    // the answers are the same, and both are the run's model on the stored activations.
    c.predict.input = Some(c.data.csv.clone().expect("csv"));
    c.predict.output = Some(dir.join("out.csv"));
    c.predict.run = Some(run.dir.clone());
    let s = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!((s.images, s.from_store, s.computed), (12, 12, 0));
    let from_store = read_predictions(&dir.join("out.csv"));
    let expected = direct_probabilities(&run.dir, &set.features);
    assert_eq!(from_store.len(), 12);
    for ((id, _, probs), (want_id, want)) in from_store.iter().zip(set.ids.iter().zip(&expected)) {
        assert_eq!(id, want_id);
        for (p, q) in probs.iter().zip(want) {
            assert!((p - q).abs() <= 2e-6, "{id}: {p} vs {q}");
        }
    }
    // evaluate scores a block-5 run the same way: every image from the pool4 space, and the
    // accuracy is the run's model on the stored activations.
    let mut e = c.clone();
    e.evaluate.csv = c.data.csv.clone();
    e.evaluate.images = c.data.images.clone();
    e.evaluate.run = Some(run.dir.clone());
    e.evaluate.output = dir.join("evaluation");
    e.validate().expect("valid");
    let scored = pipeline::inference::evaluate::run(&e).expect("evaluate");
    assert_eq!((scored.evaluation.images, scored.from_store), (12, 12));
    let correct = expected
        .iter()
        .zip(&set.labels)
        .filter(|(p, &l)| {
            let best = p
                .iter()
                .enumerate()
                .fold(0, |b, (i, v)| if *v > p[b] { i } else { b });
            best == l
        })
        .count();
    assert!(
        (scored.evaluation.metrics.accuracy - correct as f64 / 12.0).abs() < 1e-12,
        "{} vs {correct}/12",
        scored.evaluation.metrics.accuracy
    );
    std::fs::remove_dir_all(&c.extract.out).expect("remove store");
    let s = pipeline::inference::predict::run(&c).expect("predict computing");
    assert_eq!((s.images, s.computed), (12, 12));
    let computed = read_predictions(&dir.join("out.csv"));
    for (a, b) in computed.iter().zip(&from_store) {
        assert_eq!(a.1, b.1, "{}", a.0);
        for (p, q) in a.2.iter().zip(&b.2) {
            assert!((p - q).abs() <= 1e-5, "{}: {p} vs {q}", a.0);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The real study images and VGG16 weights: block 5 of the real weights on the pool4
/// activations gives the reference pool5 features, and a short block-5 run trains and
/// predicts on a few study images.
#[test]
fn block5_on_real_weights_and_study_images() {
    use pipeline::config::{Config, Unfreeze};
    use pipeline::features::store::Layer;
    use pipeline::features::{load_layer, BackboneOptions};
    let Some(shared) = testkit::shared_dir("block5_on_real_weights_and_study_images") else {
        return;
    };
    let weights_path = shared.join("weights/vgg16-oxford-imagenet-features.safetensors");
    let weights = Weights::open(weights_path.clone()).expect("weights");
    let pool4 = load_layer(
        "vgg16",
        Layer::Pool4,
        &weights,
        &Device::Cpu,
        &BackboneOptions::default(),
    )
    .expect("pool4");
    let model = Block5Head::new(
        &shape(512, 14, 2),
        &weights,
        &mut Rng::new(1),
        DType::F32,
        &Device::Cpu,
    )
    .expect("model");
    for image in ["chelsea", "coffee"] {
        let (dims, input) =
            testkit::read_npy_f32(&shared.join(format!("reference/{image}_vgg16_input.npy")));
        let (_, expected) =
            testkit::read_npy_f32(&shared.join(format!("reference/{image}_vgg16_pool5.npy")));
        let x = Tensor::from_vec(input, dims, &Device::Cpu).expect("input");
        let a = pool4.forward(&x).expect("pool4");
        assert_eq!(a.dims(), [1, 512 * 14 * 14]);
        let got: Vec<f32> = model
            .block5_features(&a)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("block 5");
        let err = testkit::max_relative_error(&got, &expected);
        assert!(
            err <= 1e-5,
            "{image}: pool4 + block 5 vs reference pool5: {err:e}"
        );
    }

    let dir = testkit::temp_dir("block5-real");
    let data = shared.join("data/emergency-vehicles");
    let mut c = Config::default();
    c.data.csv = Some(data.join("train.csv"));
    c.data.images = Some(data.join("images"));
    c.data.image_column = "image_names".into();
    c.data.label_column = "emergency_or_not".into();
    c.data.limit = Some(12);
    c.backbone.weights = pipeline::features::WeightsSource::Local(weights_path.clone());
    c.extract.batch_size = 6;
    c.extract.device = pipeline::device::DeviceChoice::Cpu;
    c.extract.out = dir.join("features");
    c.output.runs = dir.join("runs");
    c.split.val_fraction = 0.25;
    c.head.unfreeze = Unfreeze::Block5;
    c.head.train.epochs = 2;
    c.head.train.batch_size = 6;
    c.head.finetune_epochs = 1;
    c.validate().expect("valid");
    // `extract` with this config extracts the block-4 activations.
    let s = pipeline::features::extract::run(&c).expect("extract");
    assert_eq!((s.images, s.computed), (12, 12));
    let run = pipeline::training::study::train_head(&c).expect("train-head");
    assert_eq!(run.metrics.history.len(), 3);
    assert!(run.metrics.val_accuracy.is_finite());
    // Three images of the training rows (in the store) and two others (computed).
    let names: Vec<String> = std::fs::read_to_string(data.join("train.csv"))
        .expect("csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().expect("name").to_string())
        .collect();
    let chosen = [&names[0], &names[5], &names[11], &names[12], &names[13]];
    let list = dir.join("predict.csv");
    let text = std::iter::once("image_names".to_string())
        .chain(chosen.iter().map(|n| n.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&list, text + "\n").expect("list");
    c.predict.input = Some(list);
    c.predict.output = Some(dir.join("out.csv"));
    c.predict.run = Some(run.dir.clone());
    let s = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!((s.images, s.from_store, s.computed), (5, 3, 2), "{s}");
    let out = read_predictions(&dir.join("out.csv"));
    assert_eq!(out.len(), 5);
    for (id, label, probs) in &out {
        assert!(label == "0" || label == "1", "{id}: {label}");
        let sum: f32 = probs.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "{id}: {probs:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
