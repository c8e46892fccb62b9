//! Finite-difference checks of every custom op with a hand-written backward
//! ([`pipeline::models::ops`]: the CNN's ops and the linear head's gather-linear), in f64 on random shapes: odd
//! sizes, batch 1 and 5, 1 to 8 channels. The loss is `sum(output * r)` with fixed random `r`,
//! so every output element's gradient is distinct.

use candle_core::{DType, Device, Tensor, Var};
use pipeline::config::HeadKind;
use pipeline::models::ops::{bn_relu_pool, channel_stats, conv3x3, BnStats};
use pipeline::models::{Head, HeadShape};
use pipeline::training::Rng;
use pipeline::training::{Model, Rows};

const H: f64 = 1e-6;

pub(crate) fn random(shape: &[usize], rng: &mut Rng, lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| lo + (hi - lo) * rng.uniform_f32() as f64)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

pub(crate) fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f64>())
        .expect("values")
}

/// `sum(out * r)` as a scalar tensor.
pub(crate) fn weighted(out: &Tensor, r: &Tensor) -> Tensor {
    (out * r).and_then(|p| p.sum_all()).expect("loss")
}

/// Compares `analytic` with central differences of `loss` around `var`'s values.
pub(crate) fn check(name: &str, var: &Var, analytic: &Tensor, mut loss: impl FnMut() -> f64) {
    assert_eq!(analytic.dims(), var.dims(), "{name}: gradient shape");
    let base = values(var.as_tensor());
    let a = values(analytic);
    for i in 0..base.len() {
        let mut at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).expect("t"))
                .expect("set");
            loss()
        };
        let numeric = (at(H) - at(-H)) / (2.0 * H);
        let tol = 1e-7 + 1e-6 * a[i].abs().max(numeric.abs());
        assert!(
            (a[i] - numeric).abs() <= tol,
            "{name}[{i}]: analytic {}, numeric {numeric}",
            a[i]
        );
    }
    var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).expect("t"))
        .expect("reset");
}

/// (batch, in channels, out channels, height, width)
const CONV_SHAPES: [(usize, usize, usize, usize, usize); 4] = [
    (1, 1, 1, 3, 3),
    (5, 3, 4, 5, 7),
    (1, 8, 2, 6, 5),
    (5, 2, 8, 4, 1),
];

#[test]
fn conv3x3_gradients_match_finite_differences() {
    let mut rng = Rng::new(1);
    for (n, cin, cout, h, w) in CONV_SHAPES {
        let x = Var::from_tensor(&random(&[n, cin, h, w], &mut rng, -1.0, 1.0)).expect("x");
        let wt = Var::from_tensor(&random(&[cout, cin, 3, 3], &mut rng, -1.0, 1.0)).expect("w");
        let b = Var::from_tensor(&random(&[cout], &mut rng, -1.0, 1.0)).expect("b");
        let r = random(&[n, cout, h, w], &mut rng, -1.0, 1.0);
        let out = conv3x3(&x, &wt, &b).expect("conv");
        // The forward agrees with candle's conv2d.
        let theirs = x
            .conv2d(&wt, 1, 1, 1, 1)
            .and_then(|y| y.broadcast_add(&b.reshape((1, cout, 1, 1))?))
            .expect("candle");
        for (p, q) in values(&out).iter().zip(values(&theirs)) {
            assert!((p - q).abs() < 1e-12);
        }
        let grads = weighted(&out, &r).backward().expect("backward");
        let loss = || {
            let out = conv3x3(&x, &wt, &b).expect("conv");
            weighted(&out, &r).to_scalar::<f64>().expect("loss")
        };
        let shape = format!("{n}x{cin}x{h}x{w} -> {cout}");
        for (name, var) in [("x", &x), ("weight", &wt), ("bias", &b)] {
            let g = grads.get(var).expect("gradient");
            check(&format!("conv {shape} {name}"), var, g, loss);
        }
    }
}

#[test]
fn conv3x3_gives_no_gradient_to_an_untracked_input() {
    let mut rng = Rng::new(2);
    let x = random(&[5, 3, 5, 7], &mut rng, 0.0, 1.0);
    let wt = Var::from_tensor(&random(&[4, 3, 3, 3], &mut rng, -1.0, 1.0)).expect("w");
    let b = Var::from_tensor(&random(&[4], &mut rng, -1.0, 1.0)).expect("b");
    let grads = conv3x3(&x, &wt, &b)
        .and_then(|y| Ok(y.sum_all()?.backward()?))
        .expect("backward");
    assert!(grads.get(&x).is_none());
    assert!(grads.get(&wt).is_some() && grads.get(&b).is_some());
    // Wrong shapes are errors, not panics.
    assert!(conv3x3(&x, &random(&[4, 2, 3, 3], &mut rng, 0.0, 1.0), &b).is_err());
    assert!(conv3x3(&x, &wt, &random(&[3], &mut rng, 0.0, 1.0)).is_err());
}

/// BN (batch or fixed statistics) + ReLU + pool of `y`.
fn bn_block(y: &Tensor, gamma: &Tensor, beta: &Tensor, fixed: Option<&BnStats>) -> Tensor {
    let stats = match fixed {
        Some(s) => s.clone(),
        None => {
            let (mean, var) = channel_stats(y).expect("stats");
            BnStats {
                mean,
                var,
                batch: true,
            }
        }
    };
    bn_relu_pool(y, gamma, beta, &stats, 1e-5).expect("bn")
}

#[test]
fn bn_relu_pool_gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    // (batch, channels, height, width): odd sizes drop the pool's last row / column.
    for (n, c, h, w) in [(1, 1, 2, 2), (5, 3, 5, 7), (1, 8, 6, 5), (5, 2, 3, 4)] {
        for batch_stats in [true, false] {
            let y = Var::from_tensor(&random(&[n, c, h, w], &mut rng, -1.0, 1.0)).expect("y");
            let gamma = Var::from_tensor(&random(&[c], &mut rng, 0.5, 1.5)).expect("g");
            let beta = Var::from_tensor(&random(&[c], &mut rng, -0.3, 0.3)).expect("b");
            let fixed = (!batch_stats).then(|| BnStats {
                mean: values(&random(&[c], &mut rng, -0.2, 0.2)),
                var: values(&random(&[c], &mut rng, 0.5, 1.5)),
                batch: false,
            });
            let r = random(&[n, c, h / 2, w / 2], &mut rng, -1.0, 1.0);
            let out = bn_block(&y, &gamma, &beta, fixed.as_ref());
            let grads = weighted(&out, &r).backward().expect("backward");
            let loss = || {
                let out = bn_block(&y, &gamma, &beta, fixed.as_ref());
                weighted(&out, &r).to_scalar::<f64>().expect("loss")
            };
            let what = format!("bn {n}x{c}x{h}x{w} batch={batch_stats}");
            for (name, var) in [("y", &y), ("gamma", &gamma), ("beta", &beta)] {
                let g = grads.get(var).expect("gradient");
                check(&format!("{what} {name}"), var, g, loss);
            }
        }
    }
}

#[test]
fn bn_relu_pool_tie_goes_to_the_first_maximum() {
    // One channel, fixed statistics mean 0 var 1 (eps aside), gamma 1, beta 0: the op is
    // ReLU + pool. Window 3, 3 / 1, 3 -> the top-left 3; window 0, 2 / 2, 2 -> the top-right 2;
    // window -1, -2 / -3, -4 -> ReLU gives 0 everywhere: no gradient.
    let y = Tensor::from_vec(
        vec![
            3.0f64, 3.0, 0.0, 2.0, -1.0, -2.0, 1.0, 3.0, 2.0, 2.0, -3.0, -4.0,
        ],
        (1, 1, 2, 6),
        &Device::Cpu,
    )
    .expect("y");
    let y = Var::from_tensor(&y).expect("var");
    let one = Tensor::ones(1, DType::F64, &Device::Cpu).expect("1");
    let zero = Tensor::zeros(1, DType::F64, &Device::Cpu).expect("0");
    let stats = BnStats {
        mean: vec![0.0],
        var: vec![1.0 - 1e-5],
        batch: false,
    };
    let out = bn_relu_pool(&y, &one, &zero, &stats, 1e-5).expect("op");
    let got = values(&out);
    assert!((got[0] - 3.0).abs() < 1e-9 && (got[1] - 2.0).abs() < 1e-9 && got[2] == 0.0);
    let g = out.sum_all().and_then(|s| s.backward()).expect("backward");
    let g = values(g.get(&y).expect("grad"));
    let want = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    for (a, b) in g.iter().zip(want) {
        assert!((a - b).abs() < 1e-9, "{g:?}");
    }
}

#[test]
fn linear_head_gradients_match_finite_differences() {
    let mut rng = Rng::new(4);
    for (n, dim, classes, rows) in [
        (7, 5, 3, vec![6, 0, 3, 3]),
        (5, 2500, 2, vec![4]),
        (9, 33, 8, vec![0, 1, 2, 3, 4]),
    ] {
        let x = random(&[n, dim], &mut rng, -1.0, 1.0);
        let shape = HeadShape::new(HeadKind::Linear, dim, classes, 0.0);
        let head =
            Head::new(&shape, None, &mut Rng::new(5), DType::F64, &Device::Cpu).expect("head");
        let r = random(&[rows.len(), classes], &mut rng, -1.0, 1.0);
        let batch = Rows {
            data: &x,
            rows: &rows,
        };
        let out = head.forward_t(&batch, true).expect("logits");
        // Same as the plain formula on the selected rows.
        let state = head.params().sorted().expect("params");
        // Sorted by name: fc.bias, fc.weight.
        let (b, w) = (state[0].1.as_tensor(), state[1].1.as_tensor());
        let ids = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &Device::Cpu,
        )
        .expect("ids");
        let plain = x
            .index_select(&ids, 0)
            .and_then(|s| s.matmul(&w.t()?)?.broadcast_add(b))
            .expect("plain");
        for (p, q) in values(&out).iter().zip(values(&plain)) {
            assert!((p - q).abs() < 1e-10);
        }
        let grads = weighted(&out, &r).backward().expect("backward");
        for (name, var) in state {
            let g = grads.get(&var).expect("gradient");
            // Only the head's parameters get gradients (the cached features none).
            let loss = || {
                let out = head.forward_t(&batch, false).expect("logits");
                weighted(&out, &r).to_scalar::<f64>().expect("loss")
            };
            check(&format!("head {n}x{dim}->{classes} {name}"), &var, g, loss);
        }
    }
}
