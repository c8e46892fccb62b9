//! EfficientNet-Lite0: parity with the float64 reference forward on the two reference images
//! (pooled features and logits to 1e-4 relative, top-1 classes), batch independence, the
//! candle engine (the CUDA path) against the CPU one, the NHWC kernels against candle's
//! `conv2d` / `matmul` on small odd shapes, and errors naming the bad tensor.
//!
//! The reference tests need `../shared` (through `testkit::shared_dir`); the others use seeded
//! random weights and run anywhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use pipeline::features::efficientnet::{self, EfficientNetLite0};
use pipeline::features::nhwc::{self, Activation, Geometry};
use pipeline::Weights;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Seeded uniform values in `[lo, hi)`.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
    }

    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(lo, hi)).collect()
    }

    fn tensor(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.vec(n, lo, hi), shape, &Device::Cpu).expect("tensor")
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .expect("f32")
        .flatten_all()
        .expect("flatten")
        .to_vec1()
        .expect("values")
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// `[c][h][w]` -> `[h][w][c]`.
fn to_hwc(chw: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; chw.len()];
    for ch in 0..c {
        for p in 0..h * w {
            out[p * c + ch] = chw[ch * h * w + p];
        }
    }
    out
}

/// EfficientNet-Lite0's blocks written out independently of the library's table: (repeats,
/// kernel, first stride, expansion, out channels) per stage.
const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
];

/// Seeded random Lite0 weights under lukemelas' names; `edit(name, tensor)` may replace a
/// tensor (`Some`) or drop it (`None`).
fn write_random_lite0(path: &Path, edit: impl Fn(&str, Tensor) -> Option<Tensor>) {
    let mut rng = Lcg(0x5eed_1e7e);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut conv = |tensors: &mut Vec<(String, Tensor)>, name: &str, shape: [usize; 4]| {
        let fan_in = (shape[1] * shape[2] * shape[3]) as f32;
        let a = (3.0 / fan_in).sqrt();
        tensors.push((format!("{name}.weight"), rng.tensor(&shape, -a, a)));
    };
    let mut rng_bn = Lcg(0xb0b0);
    let mut bn = |tensors: &mut Vec<(String, Tensor)>, name: &str, c: usize| {
        tensors.push((format!("{name}.weight"), rng_bn.tensor(&[c], 0.5, 1.5)));
        tensors.push((format!("{name}.bias"), rng_bn.tensor(&[c], -0.2, 0.2)));
        tensors.push((
            format!("{name}.running_mean"),
            rng_bn.tensor(&[c], -0.1, 0.1),
        ));
        tensors.push((format!("{name}.running_var"), rng_bn.tensor(&[c], 0.5, 1.5)));
    };
    conv(&mut tensors, "_conv_stem", [32, 3, 3, 3]);
    bn(&mut tensors, "_bn0", 32);
    let (mut cin, mut i) = (32, 0);
    for (repeats, k, _, e, out) in STAGES {
        for _ in 0..repeats {
            let p = format!("_blocks.{i}");
            let mid = cin * e;
            if e != 1 {
                conv(&mut tensors, &format!("{p}._expand_conv"), [mid, cin, 1, 1]);
                bn(&mut tensors, &format!("{p}._bn0"), mid);
            }
            conv(
                &mut tensors,
                &format!("{p}._depthwise_conv"),
                [mid, 1, k, k],
            );
            bn(&mut tensors, &format!("{p}._bn1"), mid);
            conv(
                &mut tensors,
                &format!("{p}._project_conv"),
                [out, mid, 1, 1],
            );
            bn(&mut tensors, &format!("{p}._bn2"), out);
            cin = out;
            i += 1;
        }
    }
    conv(&mut tensors, "_conv_head", [1280, 320, 1, 1]);
    bn(&mut tensors, "_bn1", 1280);
    let mut rng_fc = Lcg(0xfc);
    tensors.push((
        "_fc.weight".into(),
        rng_fc.tensor(&[1000, 1280], -0.05, 0.05),
    ));
    tensors.push(("_fc.bias".into(), rng_fc.tensor(&[1000], -0.1, 0.1)));
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(name, t)| edit(&name, t).map(|t| (name, t)))
        .collect();
    candle_core::safetensors::save(&map, path).expect("save weights");
}

/// Random Lite0 weights, written once per test process.
fn random_weights() -> Weights {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let path = testkit::temp_dir("random-lite0").join("lite0-random.safetensors");
        write_random_lite0(&path, |_, t| Some(t));
        path
    });
    Weights::open(path.clone()).expect("open random weights")
}

/// A seeded batch in the range of Lite0-preprocessed pixels.
fn batch(seed: u64, b: usize, h: usize, w: usize) -> Tensor {
    Lcg(seed).tensor(&[b, 3, h, w], -1.0, 1.0)
}

// ---------------------------------------------------------------------------------------------
// Parity with the reference

#[test]
fn parity_with_reference_lite0_features_and_logits() {
    let Some(shared) = testkit::shared_dir("parity_with_reference_lite0_features_and_logits")
    else {
        return;
    };
    let weights = Weights::open(shared.join("weights/efficientnet-lite0-imagenet.safetensors"))
        .expect("weights");
    let net = EfficientNetLite0::load(&weights, &Device::Cpu).expect("load");
    for (image, class) in [("chelsea", 282), ("coffee", 967)] {
        let reference = |what: &str| {
            testkit::read_npy_f32(&shared.join(format!("reference/{image}_lite0_{what}.npy")))
        };
        let (shape, input) = reference("input");
        assert_eq!(shape, [1, 3, 224, 224]);
        let x = Tensor::from_vec(input, (1, 3, 224, 224), &Device::Cpu).expect("input");

        let pooled = net.forward(&x).expect("forward");
        assert_eq!(pooled.dims(), &[1, 1280]);
        let (_, want) = reference("pooled");
        let err = testkit::max_relative_error(&values(&pooled), &want);
        eprintln!("{image}: pooled features max relative error {err:.2e}");
        assert!(err <= 1e-4, "{image}: pooled features {err:e}");

        let logits = values(&net.logits(&x).expect("logits"));
        let (_, want) = reference("logits");
        let err = testkit::max_relative_error(&logits, &want);
        eprintln!("{image}: logits max relative error {err:.2e}");
        assert!(err <= 1e-4, "{image}: logits {err:e}");
        assert_eq!(argmax(&want), class, "{image}: the reference's own top-1");
        assert_eq!(argmax(&logits), class, "{image}: top-1");
    }
}

#[test]
fn candle_engine_matches_the_reference_too() {
    let Some(shared) = testkit::shared_dir("candle_engine_matches_the_reference_too") else {
        return;
    };
    let weights = Weights::open(shared.join("weights/efficientnet-lite0-imagenet.safetensors"))
        .expect("weights");
    let net = EfficientNetLite0::load_candle(&weights, &Device::Cpu, DType::F32).expect("load");
    let (_, input) = testkit::read_npy_f32(&shared.join("reference/coffee_lite0_input.npy"));
    let x = Tensor::from_vec(input, (1, 3, 224, 224), &Device::Cpu).expect("input");
    let logits = values(&net.logits(&x).expect("logits"));
    let (_, want) = testkit::read_npy_f32(&shared.join("reference/coffee_lite0_logits.npy"));
    let err = testkit::max_relative_error(&logits, &want);
    eprintln!("coffee, candle engine: logits max relative error {err:.2e}");
    assert!(err <= 1e-4, "{err:e}");
    assert_eq!(argmax(&logits), 967);
}

// ---------------------------------------------------------------------------------------------
// Batches and engines (random weights)

#[test]
fn an_image_gets_the_same_features_in_any_batch() {
    let weights = random_weights();
    let net = EfficientNetLite0::load(&weights, &Device::Cpu).expect("load");
    // Odd, non-square: SAME padding is asymmetric in both directions at several layers.
    let x = batch(3, 3, 45, 37);
    let whole = net.forward(&x).expect("forward");
    assert_eq!(whole.dims(), &[3, 1280]);
    let whole = values(&whole);
    assert!(whole.iter().all(|v| v.is_finite()));
    assert!(whole.iter().any(|v| *v != 0.0), "all-zero features");
    for i in 0..3 {
        let one = values(
            &net.forward(&x.narrow(0, i, 1).expect("narrow"))
                .expect("forward"),
        );
        assert_eq!(
            one,
            &whole[i * 1280..(i + 1) * 1280],
            "image {i} alone differs from image {i} in the batch"
        );
    }
    let two = values(
        &net.forward(&x.narrow(0, 1, 2).expect("narrow"))
            .expect("forward"),
    );
    assert_eq!(two, &whole[1280..]);
}

#[test]
fn candle_engine_matches_the_cpu_engine() {
    let weights = random_weights();
    let cpu = EfficientNetLite0::load(&weights, &Device::Cpu).expect("load");
    let candle = EfficientNetLite0::load_candle(&weights, &Device::Cpu, DType::F32).expect("load");
    for (h, w) in [(32, 32), (45, 37)] {
        let x = batch(11, 2, h, w);
        let a = values(&cpu.logits(&x).expect("cpu"));
        let b = values(&candle.logits(&x).expect("candle"));
        let err = testkit::max_relative_error(&a, &b);
        eprintln!("{h}x{w}: candle vs cpu engine logits {err:.2e}");
        assert!(err <= 1e-5, "{h}x{w}: {err:e}");
    }
}

#[test]
fn wrong_inputs_are_errors_naming_the_model() {
    let net = EfficientNetLite0::load(&random_weights(), &Device::Cpu).expect("load");
    let x = Tensor::zeros((1, 4, 32, 32), DType::F32, &Device::Cpu).expect("zeros");
    let err = net
        .forward(&x)
        .expect_err("4 channels must fail")
        .to_string();
    assert!(
        err.contains("efficientnet_lite0") && err.contains("[1, 4, 32, 32]"),
        "{err}"
    );
    let empty = Tensor::zeros((0, 3, 32, 32), DType::F32, &Device::Cpu).expect("zeros");
    assert_eq!(net.forward(&empty).expect("empty batch").dims(), &[0, 1280]);
}

// ---------------------------------------------------------------------------------------------
// Bad weights

fn load_edited(
    test: &str,
    edit: impl Fn(&str, Tensor) -> Option<Tensor>,
) -> (PathBuf, pipeline::Result<EfficientNetLite0>) {
    let path = testkit::temp_dir(test).join("lite0.safetensors");
    write_random_lite0(&path, edit);
    let weights = Weights::open(path.clone()).expect("open");
    (path, EfficientNetLite0::load(&weights, &Device::Cpu))
}

fn expect_error(
    test: &str,
    tensor: &str,
    expect: &str,
    edit: impl Fn(&str, Tensor) -> Option<Tensor>,
) {
    let (path, result) = load_edited(test, edit);
    let err = match result {
        Ok(_) => panic!("{test}: loading must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("`{tensor}`")), "{test}: {err}");
    assert!(err.contains(&path.display().to_string()), "{test}: {err}");
    assert!(err.contains(expect), "{test}: {err}");
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let name = "_blocks.7._depthwise_conv.weight";
    expect_error("lite0-missing", name, "missing", |n, t| {
        (n != name).then_some(t)
    });
}

#[test]
fn wrong_kernel_size_is_an_error_naming_the_tensor() {
    // Block 3 is a 5x5 stage's first block: a 3x3 kernel there is another architecture.
    let name = "_blocks.3._depthwise_conv.weight";
    expect_error("lite0-shape", name, "expected [144, 1, 5, 5]", |n, t| {
        Some(if n == name {
            Tensor::zeros((144, 1, 3, 3), DType::F32, &Device::Cpu).expect("zeros")
        } else {
            t
        })
    });
}

#[test]
fn negative_variance_and_nan_are_errors_naming_the_tensor() {
    let var = "_blocks.12._bn1.running_var";
    expect_error("lite0-variance", var, "negative variance", |n, t| {
        Some(if n == var { t.neg().expect("neg") } else { t })
    });
    let head = "_conv_head.weight";
    expect_error("lite0-nan", head, "NaN", |n, t| {
        Some(if n == head {
            (t * f64::NAN).expect("nan")
        } else {
            t
        })
    });
}

#[test]
fn efficientnet_b0_style_weights_are_refused() {
    // The same block tensors plus squeeze-excite: B0 in lukemelas' naming, which Lite0's
    // forward would silently get wrong.
    let path = testkit::temp_dir("lite0-se").join("b0-like.safetensors");
    write_random_lite0(&path, |_, t| Some(t));
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    tensors.insert(
        "_blocks.1._se_reduce.weight".into(),
        Tensor::zeros((4, 96, 1, 1), DType::F32, &Device::Cpu).expect("zeros"),
    );
    candle_core::safetensors::save(&tensors, &path).expect("save");
    let weights = Weights::open(path.clone()).expect("open");
    let err = match EfficientNetLite0::load(&weights, &Device::Cpu) {
        Ok(_) => panic!("squeeze-excite weights must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("`_blocks.1._se_reduce.weight`"), "{err}");
    assert!(err.contains("backbone.name"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    // The shared file itself has nothing extra (its num_batches_tracked are allowed).
    if let Some(shared) = testkit::shared_dir("efficientnet_b0_style_weights_are_refused") {
        let w = Weights::open(shared.join("weights/efficientnet-lite0-imagenet.safetensors"))
            .expect("weights");
        assert!(w.names().iter().any(|n| n.ends_with("num_batches_tracked")));
        EfficientNetLite0::load(&w, &Device::Cpu).expect("the real file loads");
    }
}

#[test]
fn features_only_weights_load_but_have_no_logits() {
    let (path, result) = load_edited("lite0-no-fc", |n, t| (!n.starts_with("_fc.")).then_some(t));
    let net = result.expect("features-only weights load");
    let x = batch(5, 1, 32, 32);
    assert_eq!(net.forward(&x).expect("forward").dims(), &[1, 1280]);
    let err = net.logits(&x).expect_err("no classifier").to_string();
    assert!(err.contains("`_fc.weight`"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    // A classifier of the wrong size is refused at load time, naming it.
    expect_error("lite0-fc-shape", "_fc.weight", "shape", |n, t| {
        Some(if n == "_fc.weight" {
            Tensor::zeros((10, 1280), DType::F32, &Device::Cpu).expect("zeros")
        } else {
            t
        })
    });
}

// ---------------------------------------------------------------------------------------------
// The NHWC kernels against candle

/// candle's reference: explicit padding from the geometry, then an unpadded `conv2d`, on
/// `[1, c, h, w]`; returns `[oh][ow][cout]`.
fn candle_conv(
    x_hwc: &[f32],
    cin: usize,
    g: &Geometry,
    weight_oihw: &Tensor,
    groups: usize,
) -> Vec<f32> {
    let mut chw = vec![0.0; x_hwc.len()];
    for p in 0..g.h * g.w {
        for c in 0..cin {
            chw[c * g.h * g.w + p] = x_hwc[p * cin + c];
        }
    }
    let x = Tensor::from_vec(chw, (1, cin, g.h, g.w), &Device::Cpu).expect("x");
    let (bottom, right) = g.pad_after();
    let y = x
        .pad_with_zeros(2, g.pad_top, bottom)
        .and_then(|x| x.pad_with_zeros(3, g.pad_left, right))
        .and_then(|x| x.conv2d(weight_oihw, 0, g.stride, 1, groups))
        .expect("candle conv");
    let (_, cout, oh, ow) = y.dims4().expect("dims");
    assert_eq!((oh, ow), (g.oh, g.ow), "candle's output size");
    to_hwc(&values(&y), cout, oh, ow)
}

fn activate(v: f32, act: Activation) -> f32 {
    match act {
        Activation::Identity => v,
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let err = testkit::max_relative_error(got, want);
    assert!(err <= 1e-5, "{what}: max relative error {err:e}");
    assert!(
        want.iter().any(|v| *v != 0.0),
        "{what}: degenerate reference"
    );
}

#[test]
fn depthwise_kernel_matches_candle_conv2d_with_groups() {
    let mut rng = Lcg(42);
    // Channel counts cover the 32-, 8- and 1-wide channel blocks and their tails.
    for c in [1, 7, 40, 45] {
        for k in [3, 5] {
            for stride in [1, 2] {
                for (h, w) in [(1, 1), (8, 8), (7, 9), (12, 5)] {
                    let g = Geometry::same(h, w, k, stride);
                    let x = rng.vec(h * w * c, -1.0, 1.0);
                    let wt = rng.tensor(&[c, 1, k, k], -0.5, 0.5);
                    let bias = rng.vec(c, -0.3, 0.3);
                    // The kernel's layout: [k][k][c].
                    let oihw = values(&wt);
                    let mut taps = vec![0.0; k * k * c];
                    for ch in 0..c {
                        for t in 0..k * k {
                            taps[t * c + ch] = oihw[ch * k * k + t];
                        }
                    }
                    let conv = candle_conv(&x, c, &g, &wt, c);
                    for act in [Activation::Identity, Activation::Relu6] {
                        let want: Vec<f32> = conv
                            .iter()
                            .enumerate()
                            .map(|(i, v)| activate(v + bias[i % c], act))
                            .collect();
                        // Cut into tasks of 2 rows, in parallel: as a network layer runs it.
                        let mut got = vec![f32::NAN; g.oh * g.ow * c];
                        nhwc::for_each_rows(&mut got, g.ow * c, 2, true, |oy0, o| {
                            nhwc::depthwise(&x, c, &g, &taps, &bias, act, oy0, o)
                        });
                        let what = format!("depthwise c={c} k={k} s={stride} {h}x{w} {act:?}");
                        if act == Activation::Identity {
                            assert_close(&what, &got, &want);
                        } else {
                            let err = testkit::max_relative_error(&got, &want);
                            assert!(err <= 1e-5, "{what}: {err:e}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn depthwise_kernel_with_symmetric_padding_matches_candle() {
    // ConvNeXt's 7x7 depthwise, padding 3, stride 1.
    let mut rng = Lcg(7);
    let (c, k, h, w) = (24, 7, 9, 6);
    let g = Geometry::symmetric(h, w, k, 1, 3).expect("fits");
    let x = rng.vec(h * w * c, -1.0, 1.0);
    let wt = rng.tensor(&[c, 1, k, k], -0.5, 0.5);
    let oihw = values(&wt);
    let mut taps = vec![0.0; k * k * c];
    for ch in 0..c {
        for t in 0..k * k {
            taps[t * c + ch] = oihw[ch * k * k + t];
        }
    }
    let zero = vec![0.0; c];
    let mut got = vec![0.0; g.oh * g.ow * c];
    nhwc::depthwise(&x, c, &g, &taps, &zero, Activation::Identity, 0, &mut got);
    assert_close("depthwise 7x7 pad 3", &got, &candle_conv(&x, c, &g, &wt, c));
}

#[test]
fn pointwise_kernel_matches_candle_matmul() {
    let mut rng = Lcg(3);
    for (m, cin, cout) in [
        (1, 1, 1),
        (37, 19, 23),
        (7, 5, 40),
        (300, 32, 96),
        (13, 144, 24),
        (49, 320, 1280),
        (20, 16, 113),
    ] {
        let x = rng.vec(m * cin, -1.0, 1.0);
        let wt = rng.vec(cin * cout, -0.5, 0.5);
        let bias = rng.vec(cout, -0.5, 0.5);
        let res = rng.vec(m * cout, -1.0, 1.0);
        let xt = Tensor::from_slice(&x, (m, cin), &Device::Cpu).expect("x");
        let wtt = Tensor::from_slice(&wt, (cin, cout), &Device::Cpu).expect("w");
        let prod = values(&xt.matmul(&wtt).expect("matmul"));
        for (act, residual) in [
            (Activation::Identity, None),
            (Activation::Identity, Some(&res)),
            (Activation::Relu6, None),
            (Activation::Relu, Some(&res)),
        ] {
            let want: Vec<f32> = prod
                .iter()
                .enumerate()
                .map(|(i, p)| activate(p + bias[i % cout] + residual.map_or(0.0, |r| r[i]), act))
                .collect();
            // The CPU's own layout (packed for AVX-512 where it has it) and the gemm fallback.
            for (layout, w) in [
                ("native", nhwc::PointwiseWeights::new(cin, &wt, &bias)),
                (
                    "portable",
                    nhwc::PointwiseWeights::portable(cin, &wt, &bias),
                ),
            ] {
                let mut got = vec![f32::NAN; m * cout];
                nhwc::pointwise(&x, &w, act, residual.map(|r| &r[..]), &mut got);
                let err = testkit::max_relative_error(&got, &want);
                assert!(
                    err <= 1e-5,
                    "pointwise {layout} {m}x{cin}x{cout} {act:?} residual {}: {err:e}",
                    residual.is_some()
                );
            }
        }
    }
}

#[test]
fn dense_kernel_matches_candle_conv2d() {
    let mut rng = Lcg(9);
    for (cin, cout, k, stride, h, w) in [
        (3, 32, 3, 2, 224, 224),
        (3, 32, 3, 2, 9, 7),
        (3, 13, 3, 1, 5, 6),
        (2, 5, 5, 2, 11, 11),
    ] {
        let g = Geometry::same(h, w, k, stride);
        let x = rng.vec(h * w * cin, -1.0, 1.0);
        let wt = rng.tensor(&[cout, cin, k, k], -0.5, 0.5);
        let oihw = values(&wt);
        // The kernel's layout: [k][k][cin][cout].
        let mut taps = vec![0.0; oihw.len()];
        for o in 0..cout {
            for i in 0..cin {
                for t in 0..k * k {
                    taps[(t * cin + i) * cout + o] = oihw[(o * cin + i) * k * k + t];
                }
            }
        }
        let bias = rng.vec(cout, -0.3, 0.3);
        let want: Vec<f32> = candle_conv(&x, cin, &g, &wt, 1)
            .iter()
            .enumerate()
            .map(|(i, v)| v + bias[i % cout])
            .collect();
        let mut got = vec![f32::NAN; g.oh * g.ow * cout];
        nhwc::for_each_rows(&mut got, g.ow * cout, 3, false, |oy0, o| {
            nhwc::dense(&x, cin, &g, &taps, &bias, Activation::Identity, oy0, o)
        });
        assert_close(
            &format!("dense {cin}->{cout} k={k} s={stride} {h}x{w}"),
            &got,
            &want,
        );
    }
}

#[test]
fn block_table_has_the_published_strides() {
    // The library's table and this file's must agree, block by block.
    let specs = efficientnet::blocks();
    let mut i = 0;
    for (repeats, k, s, _, out) in STAGES {
        for r in 0..repeats {
            assert_eq!(specs[i].kernel, k, "block {i}");
            assert_eq!(specs[i].stride, if r == 0 { s } else { 1 }, "block {i}");
            assert_eq!(specs[i].cout, out, "block {i}");
            i += 1;
        }
    }
    assert_eq!(i, specs.len());
}

/// The registry end to end: `[backbone] name = "efficientnet_lite0"` extracts 1280-dim
/// features into their own space of the store (next to VGG16's), the head trains on them and
/// predicts, and an unknown name is a config error listing the known ones.
#[test]
fn efficientnet_lite0_through_the_registry_extracts_trains_and_predicts() {
    let Some(shared) =
        testkit::shared_dir("efficientnet_lite0_through_the_registry_extracts_trains_and_predicts")
    else {
        return;
    };
    let (dir, mut c) = crate::common::fixture("lite0-registry", 12);
    c.backbone.name = "efficientnet_lite0".into();
    c.backbone.weights = pipeline::features::WeightsSource::Local(
        shared.join("weights/efficientnet-lite0-imagenet.safetensors"),
    );
    c.preprocess.input_size = Some(64);
    c.extract.batch_size = 4;
    c.split.val_fraction = 0.25;
    c.head.train.epochs = 2;
    c.head.train.batch_size = 4;
    c.output.runs = dir.join("runs");
    c.validate().expect("valid");
    let s = pipeline::features::extract::run(&c).expect("extract");
    assert_eq!(s.images, 12);
    let set = crate::common::load(&c).expect("features");
    assert_eq!(set.key.backbone, "efficientnet_lite0");
    assert_eq!(set.features.dims(), [12, 1280]);
    // VGG16 next to it in the same store: another space, nothing recomputed for Lite0.
    let mut vgg = c.clone();
    vgg.backbone.name = "vgg16".into();
    vgg.backbone.weights =
        pipeline::features::WeightsSource::Local(crate::common::random_weights().into());
    vgg.preprocess.input_size = Some(32);
    pipeline::features::extract::run(&vgg).expect("vgg16 extract");
    let again = pipeline::features::extract::run(&c).expect("lite0 again");
    assert_eq!(again.computed, 0);
    let run = pipeline::training::study::train_head(&c).expect("train-head");
    assert!(run
        .metrics
        .name
        .starts_with("EfficientNet-Lite0 + linear head"));
    c.predict.input = Some(dir.join("images"));
    c.predict.output = Some(dir.join("out.csv"));
    c.predict.run = Some(run.dir.clone());
    assert_eq!(
        pipeline::inference::predict::run(&c)
            .expect("predict")
            .images,
        12
    );

    c.backbone.name = "resnet50".into();
    let err = c.validate().expect_err("not in the registry").to_string();
    assert!(
        err.contains("backbone.name") && err.contains("vgg16, efficientnet_lite0"),
        "{err}"
    );
}
