//! L2-penalised multinomial logistic regression on feature rows, solved to convergence, with
//! the penalty chosen by seeded k-fold cross-validation: `[head] kind = "logistic"`.
//!
//! The objective is `mean_i CE(softmax(W x_i + b), y_i) + lambda / 2 * ||W||^2` (the bias is
//! not penalised), with `lambda = 1 / (C * n)` over a grid of `C` (scikit-learn's convention).
//!
//! Why it is fast with 25,088-dim features and ~1,500 rows: the penalised optimum lies in the
//! span of the training rows (the data term's gradient does, and the penalty's is `lambda W`),
//! so with the Gram matrix `K = X X^T = L L^T` (Cholesky), the problem over `W` is exactly the
//! problem over `V = L^T A` (`W = X^T A`) with features `L` (`n x n`) and penalty `||V||^2`.
//! So `K` is computed once (one pass over the features), each fold's problem is an
//! `n x n` one (a new row `x` maps to `L^{-1} X x`), and L-BFGS iterations cost `O(n^2 C)`.
//! `W = X^T L^{-T} V` at the end.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::training::rng::Rng;

/// The grid of inverse penalties `C` cross-validation chooses from.
pub const C_GRID: [f64; 9] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4];

/// Convergence: the largest gradient component, relative to the objective's scale.
const TOLERANCE: f64 = 1e-7;
const MAX_ITERATIONS: usize = 5000;

/// A fitted model: `logits = x W^T + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// `[classes][dim]`, row-major.
    pub weight: Vec<f64>,
    pub bias: Vec<f64>,
    pub classes: usize,
    /// The inverse penalty used.
    pub c: f64,
    /// L-BFGS iterations of the final fit.
    pub iterations: usize,
}

/// What cross-validation measured for one `C`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CvScore {
    pub c: f64,
    /// Mean validation cross-entropy over the folds.
    pub log_loss: f64,
    pub accuracy: f64,
}

/// Fits on rows `train` of `features` (`[n, dim]`), choosing `C` among `grid` by `folds`-fold
/// cross-validation (seeded, stratified by label) when the grid has more than one value.
/// `groups[i]` is the group of row `train[i]` (the image of an augmented view): a group's rows
/// always share a fold. With every row its own group the folds are those of rows alone.
#[allow(clippy::too_many_arguments)]
pub fn fit_cv(
    features: &Tensor,
    labels: &[usize],
    classes: usize,
    train: &[usize],
    groups: &[usize],
    grid: &[f64],
    folds: usize,
    seed: u64,
) -> Result<(Solution, Vec<CvScore>)> {
    if grid.is_empty() || grid.iter().any(|c| !(c.is_finite() && *c > 0.0)) {
        return Err(bad(format!("the C grid {grid:?} needs positive values")));
    }
    let gram = Gram::new(features, train)?;
    let y: Vec<usize> = train.iter().map(|&r| labels[r]).collect();
    if let Some(&l) = y.iter().find(|&&l| l >= classes) {
        return Err(bad(format!("label {l} for {classes} classes")));
    }
    if groups.len() != train.len() {
        return Err(bad(format!(
            "{} groups for {} training rows",
            groups.len(),
            train.len()
        )));
    }
    let scores = if grid.len() > 1 {
        cross_validate(&gram, &y, groups, classes, grid, folds, seed)?
    } else {
        Vec::new()
    };
    // Lowest mean log-loss; on a tie the stronger penalty (smaller C).
    let c = scores
        .iter()
        .min_by(|a, b| a.log_loss.total_cmp(&b.log_loss).then(a.c.total_cmp(&b.c)))
        .map_or(grid[0], |s| s.c);
    let all: Vec<usize> = (0..y.len()).collect();
    let space = gram.space(&all)?;
    let z = space.features_of(&gram, &all);
    let (v, b, iterations) = solve(&z, all.len(), &y, classes, lambda(c, y.len()))?;
    let weight = gram.weights(features, train, &space, &v, classes)?;
    Ok((
        Solution {
            weight,
            bias: b,
            classes,
            c,
            iterations,
        },
        scores,
    ))
}

fn lambda(c: f64, n: usize) -> f64 {
    1.0 / (c * n as f64)
}

fn bad(message: String) -> Error {
    Error::Model {
        model: "logistic".into(),
        message,
    }
}

/// `K = X_t X_t^T` over the training rows, in f64.
struct Gram {
    n: usize,
    k: Vec<f64>,
}

impl Gram {
    fn new(features: &Tensor, rows: &[usize]) -> Result<Self> {
        let x = crate::training::fit::select_rows(&features.to_dtype(DType::F64)?, rows)?;
        let k = x.matmul(&x.t()?)?.flatten_all()?.to_vec1::<f64>()?;
        Ok(Self { n: rows.len(), k })
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.k[i * self.n + j]
    }

    /// The Cholesky factor of `K[rows, rows]` (plus a tiny jitter: byte-identical images make
    /// `K` singular).
    fn space(&self, rows: &[usize]) -> Result<Space> {
        let m = rows.len();
        let trace: f64 = rows.iter().map(|&r| self.at(r, r)).sum();
        let jitter = 1e-10 * trace / m.max(1) as f64 + f64::MIN_POSITIVE;
        let mut l = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..=i {
                let mut s = self.at(rows[i], rows[j]);
                if i == j {
                    s += jitter;
                }
                s -= (0..j).map(|k| l[i * m + k] * l[j * m + k]).sum::<f64>();
                if i == j {
                    if s <= 0.0 {
                        return Err(bad(format!(
                            "the Gram matrix is not positive definite at row {i} (NaN or \
                             infinite features?)"
                        )));
                    }
                    l[i * m + i] = s.sqrt();
                } else {
                    l[i * m + j] = s / l[j * m + j];
                }
            }
        }
        Ok(Space {
            rows: rows.to_vec(),
            l,
        })
    }

    /// The primal weights `W = X_t^T L^{-T} V` (`[classes][dim]`) of a solution in the space
    /// of all training rows.
    fn weights(
        &self,
        features: &Tensor,
        train: &[usize],
        space: &Space,
        v: &[f64],
        classes: usize,
    ) -> Result<Vec<f64>> {
        let m = space.rows.len();
        // A = L^{-T} V, column by column (back substitution).
        let mut a = vec![0.0; m * classes];
        for c in 0..classes {
            for i in (0..m).rev() {
                let s: f64 = ((i + 1)..m)
                    .map(|k| space.l[k * m + i] * a[k * classes + c])
                    .sum();
                a[i * classes + c] = (v[c * m + i] - s) / space.l[i * m + i];
            }
        }
        let x = crate::training::fit::select_rows(&features.to_dtype(DType::F64)?, train)?;
        let a = Tensor::from_vec(a, (m, classes), x.device())?;
        // [classes, m] x [m, dim].
        Ok(a.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f64>()?)
    }
}

/// A Cholesky factor `L` of `K[rows, rows]`: the coordinates the solver works in.
struct Space {
    rows: Vec<usize>,
    /// Lower triangular, row-major, `m x m`.
    l: Vec<f64>,
}

impl Space {
    /// `z = L^{-1} K[rows, r]` for each `r` in `of` (forward substitution): the coordinates of
    /// those rows; `m` values each, row-major.
    fn features_of(&self, gram: &Gram, of: &[usize]) -> Vec<f64> {
        let m = self.rows.len();
        let mut out = vec![0.0; of.len() * m];
        for (o, &r) in of.iter().enumerate() {
            let z = &mut out[o * m..][..m];
            for i in 0..m {
                let s: f64 = (0..i).map(|k| self.l[i * m + k] * z[k]).sum();
                z[i] = (gram.at(self.rows[i], r) - s) / self.l[i * m + i];
            }
        }
        out
    }
}

/// Seeded, label-stratified fold of each row, made of groups: the distinct groups in order of
/// first appearance (each with its first row's label) are shuffled per label and dealt out
/// round-robin, and every row takes its group's fold. With each row its own group (in row
/// order) this deals out rows exactly as a row-wise assignment would.
fn fold_of(y: &[usize], groups: &[usize], classes: usize, folds: usize, seed: u64) -> Vec<usize> {
    let mut position: std::collections::HashMap<usize, usize> = Default::default();
    let mut label_of_group = Vec::new();
    let group_of_row: Vec<usize> = groups
        .iter()
        .zip(y)
        .map(|(&g, &label)| {
            *position.entry(g).or_insert_with(|| {
                label_of_group.push(label);
                label_of_group.len() - 1
            })
        })
        .collect();
    let mut group_fold = vec![0; label_of_group.len()];
    let mut rng = Rng::new(seed);
    for c in 0..classes {
        let mut members: Vec<usize> = (0..label_of_group.len())
            .filter(|&g| label_of_group[g] == c)
            .collect();
        rng.shuffle(&mut members);
        for (k, g) in members.into_iter().enumerate() {
            group_fold[g] = k % folds;
        }
    }
    group_of_row.into_iter().map(|g| group_fold[g]).collect()
}

fn cross_validate(
    gram: &Gram,
    y: &[usize],
    groups: &[usize],
    classes: usize,
    grid: &[f64],
    folds: usize,
    seed: u64,
) -> Result<Vec<CvScore>> {
    let distinct = groups
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    if folds < 2 || folds > distinct {
        return Err(bad(format!(
            "{folds}-fold cross-validation of {} rows ({distinct} images)",
            y.len()
        )));
    }
    let fold = fold_of(y, groups, classes, folds, seed);
    let mut sums = vec![(0.0, 0.0); grid.len()];
    for f in 0..folds {
        let train: Vec<usize> = (0..y.len()).filter(|&i| fold[i] != f).collect();
        let val: Vec<usize> = (0..y.len()).filter(|&i| fold[i] == f).collect();
        let space = gram.space(&train)?;
        let z = space.features_of(gram, &train);
        let zv = space.features_of(gram, &val);
        let yt: Vec<usize> = train.iter().map(|&i| y[i]).collect();
        let yv: Vec<usize> = val.iter().map(|&i| y[i]).collect();
        for (g, &c) in grid.iter().enumerate() {
            let (v, b, _) = solve(&z, train.len(), &yt, classes, lambda(c, train.len()))?;
            let (loss, correct) = score(&zv, &yv, &v, &b, classes);
            sums[g].0 += loss / folds as f64;
            sums[g].1 += correct as f64 / y.len() as f64;
        }
    }
    Ok(grid
        .iter()
        .zip(sums)
        .map(|(&c, (log_loss, accuracy))| CvScore {
            c,
            log_loss,
            accuracy,
        })
        .collect())
}

/// Mean cross-entropy and correct count of rows `z` (`m` coordinates each) under `(v, b)`.
fn score(z: &[f64], y: &[usize], v: &[f64], b: &[f64], classes: usize) -> (f64, usize) {
    let m = v.len() / classes;
    let mut loss = 0.0;
    let mut correct = 0;
    let mut logits = vec![0.0; classes];
    for (i, &label) in y.iter().enumerate() {
        logits_of(&z[i * m..][..m], v, b, &mut logits);
        let (lse, best) = log_sum_exp(&logits);
        loss += lse - logits[label];
        correct += usize::from(best == label);
    }
    (loss / y.len().max(1) as f64, correct)
}

/// Logits of one row `z` under class-major `v` (`[classes][m]`) and `b`.
fn logits_of(z: &[f64], v: &[f64], b: &[f64], out: &mut [f64]) {
    let m = z.len();
    for (c, o) in out.iter_mut().enumerate() {
        *o = b[c] + dot(z, &v[c * m..][..m]);
    }
}

/// A dot product in four independent lanes (so the compiler vectorises it).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a4.zip(b4) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// (log sum exp, argmax) of one row of logits.
fn log_sum_exp(logits: &[f64]) -> (f64, usize) {
    let (best, max) =
        logits
            .iter()
            .copied()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |(bi, bm), (i, v)| {
                if v > bm {
                    (i, v)
                } else {
                    (bi, bm)
                }
            });
    let sum: f64 = logits.iter().map(|v| (v - max).exp()).sum();
    (max + sum.ln(), best)
}

/// Minimises the penalised objective over `(V [classes x m], b [classes])` for rows `z`
/// (`n x m`); returns `(V, b, iterations)`. Rows are split into fixed chunks whose partial
/// losses and gradients are summed in chunk order, so the result does not depend on the
/// thread count.
fn solve(
    z: &[f64],
    n: usize,
    y: &[usize],
    classes: usize,
    lambda: f64,
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let m = z.len() / n.max(1);
    let dims = m * classes + classes;
    const CHUNK: usize = 64;
    let objective = |p: &[f64], grad: &mut [f64]| -> f64 {
        use rayon::prelude::*;
        let (v, b) = p.split_at(m * classes);
        let partial: Vec<(f64, Vec<f64>)> = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|chunk| {
                let mut g = vec![0.0; dims];
                let mut loss = 0.0;
                let mut logits = vec![0.0; classes];
                for i in chunk * CHUNK..n.min((chunk + 1) * CHUNK) {
                    let zi = &z[i * m..][..m];
                    let label = y[i];
                    logits_of(zi, v, b, &mut logits);
                    let (lse, _) = log_sum_exp(&logits);
                    loss += lse - logits[label];
                    for c in 0..classes {
                        let d =
                            ((logits[c] - lse).exp() - f64::from(u8::from(c == label))) / n as f64;
                        for (gk, x) in g[c * m..][..m].iter_mut().zip(zi) {
                            *gk += d * x;
                        }
                        g[m * classes + c] += d;
                    }
                }
                (loss, g)
            })
            .collect();
        grad.iter_mut().for_each(|g| *g = 0.0);
        let mut loss = 0.0;
        for (l, g) in &partial {
            loss += l;
            for (a, b) in grad.iter_mut().zip(g) {
                *a += b;
            }
        }
        let mut penalty = 0.0;
        for (g, w) in grad.iter_mut().zip(v) {
            *g += lambda * w;
            penalty += w * w;
        }
        loss / n as f64 + 0.5 * lambda * penalty
    };
    let (p, iterations) = lbfgs(objective, vec![0.0; dims])?;
    let (v, b) = p.split_at(m * classes);
    Ok((v.to_vec(), b.to_vec(), iterations))
}

/// L-BFGS (memory 10) with a backtracking Armijo line search, from `x`; converged when the
/// largest gradient component is below [`TOLERANCE`] times `max(1, |f|)`.
fn lbfgs(
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
    mut x: Vec<f64>,
) -> Result<(Vec<f64>, usize)> {
    const MEMORY: usize = 10;
    let n = x.len();
    let mut g = vec![0.0; n];
    let mut fx = f(&x, &mut g);
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::new();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for it in 0..MAX_ITERATIONS {
        let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if !fx.is_finite() || !gmax.is_finite() {
            return Err(bad(format!(
                "the objective became {fx} (NaN or infinite features?)"
            )));
        }
        if gmax <= TOLERANCE * fx.abs().max(1.0) {
            return Ok((x, it));
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, yv, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(yv).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = history
            .back()
            .map_or(1.0 / gmax.max(1.0), |(s, yv, _)| dot(s, yv) / dot(yv, yv));
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, yv, rho), a) in history.iter().zip(alphas.into_iter().rev()) {
            let b = rho * dot(yv, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut d: Vec<f64> = q.into_iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (curvature lost): restart from steepest descent.
            history.clear();
            d = g.iter().map(|v| -v).collect();
            slope = dot(&g, &d);
        }
        let mut step = 1.0;
        let mut g_new = vec![0.0; n];
        let (x_new, f_new) = loop {
            let cand: Vec<f64> = x.iter().zip(&d).map(|(xi, di)| xi + step * di).collect();
            let fc = f(&cand, &mut g_new);
            if fc.is_finite() && fc <= fx + 1e-4 * step * slope {
                break (cand, fc);
            }
            step *= 0.5;
            if step < 1e-20 {
                // No decrease possible in f64: as converged as it gets.
                return Ok((x, it));
            }
        };
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &yv);
        if sy > 1e-12 * dot(&yv, &yv).max(f64::MIN_POSITIVE) {
            if history.len() == MEMORY {
                history.pop_front();
            }
            history.push_back((s, yv, 1.0 / sy));
        }
        x = x_new;
        fx = f_new;
        g = g_new;
    }
    Err(bad(format!(
        "L-BFGS did not converge in {MAX_ITERATIONS} iterations"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(rows: &[&[f64]]) -> Tensor {
        let d = rows[0].len();
        let v: Vec<f32> = rows
            .iter()
            .flat_map(|r| r.iter().map(|&x| x as f32))
            .collect();
        Tensor::from_vec(v, (rows.len(), d), &Device::Cpu).expect("tensor")
    }

    /// Two points x = +1 (class 1) and x = -1 (class 0), penalty lambda: by symmetry the
    /// optimum has b = 0 and W = [-w, w] with margin 2w; the stationarity condition
    /// `lambda * w = sigma(-2w)` (each class's weight gets half the gradient of the margin)
    /// is solved here by bisection, independently of the solver.
    #[test]
    fn matches_the_known_optimum_of_a_symmetric_problem() {
        let x = tensor(&[&[1.0], &[-1.0]]);
        let labels = [1, 0];
        for c in [0.1, 1.0, 10.0] {
            let (sol, _) = fit_cv(&x, &labels, 2, &[0, 1], &[0, 1], &[c], 5, 1).expect("fit");
            let lam = lambda(c, 2);
            let sigma = |t: f64| 1.0 / (1.0 + t.exp());
            let (mut lo, mut hi) = (0.0, 100.0);
            for _ in 0..200 {
                let mid = 0.5 * (lo + hi);
                if lam * mid - sigma(2.0 * mid) < 0.0 {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let w = 0.5 * (lo + hi);
            assert!(
                (sol.weight[1] - w).abs() < 1e-6,
                "C {c}: {:?} vs {w}",
                sol.weight
            );
            assert!((sol.weight[0] + w).abs() < 1e-6, "C {c}: {:?}", sol.weight);
            assert!(sol.bias.iter().all(|b| b.abs() < 1e-6), "{:?}", sol.bias);
        }
    }

    /// In more dimensions than rows the kernel-space solution must satisfy the primal
    /// optimality condition `grad_W = 0` over all dims, checked directly on the features.
    #[test]
    fn the_primal_gradient_vanishes_at_the_solution() {
        let mut rng = Rng::new(3);
        let (n, d, classes) = (12, 40, 3);
        let rows: Vec<Vec<f64>> = (0..n)
            .map(|_| (0..d).map(|_| rng.normal_f32() as f64).collect())
            .collect();
        let refs: Vec<&[f64]> = rows.iter().map(|r| r.as_slice()).collect();
        let x = tensor(&refs);
        let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
        let all: Vec<usize> = (0..n).collect();
        let c = 0.5;
        let (sol, _) = fit_cv(&x, &labels, classes, &all, &all, &[c], 3, 1).expect("fit");
        let xs: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| r.iter().map(|&v| v as f32 as f64).collect())
            .collect();
        let lam = lambda(c, n);
        let mut grad_w = vec![0.0; classes * d];
        let mut grad_b = vec![0.0; classes];
        for (i, xi) in xs.iter().enumerate() {
            let logits: Vec<f64> = (0..classes)
                .map(|k| sol.bias[k] + (0..d).map(|j| sol.weight[k * d + j] * xi[j]).sum::<f64>())
                .collect();
            let (lse, _) = log_sum_exp(&logits);
            for k in 0..classes {
                let p = (logits[k] - lse).exp() - f64::from(u8::from(k == labels[i]));
                for j in 0..d {
                    grad_w[k * d + j] += p * xi[j] / n as f64;
                }
                grad_b[k] += p / n as f64;
            }
        }
        for (g, w) in grad_w.iter_mut().zip(&sol.weight) {
            *g += lam * w;
        }
        let worst = grad_w
            .iter()
            .chain(&grad_b)
            .fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(worst < 1e-5, "largest gradient component {worst}");
    }

    #[test]
    fn cross_validation_prefers_a_penalty_on_noisy_labels_and_is_seeded() {
        let mut rng = Rng::new(5);
        let (n, d) = (60, 30);
        let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
        // Only the first feature carries the class; the rest is noise.
        let rows: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..d)
                    .map(|j| {
                        let s = if j == 0 { labels[i] as f64 - 0.5 } else { 0.0 };
                        s + rng.normal_f32() as f64
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[f64]> = rows.iter().map(|r| r.as_slice()).collect();
        let x = tensor(&refs);
        let all: Vec<usize> = (0..n).collect();
        let (a, scores) = fit_cv(&x, &labels, 2, &all, &all, &C_GRID, 5, 7).expect("fit");
        let (b, _) = fit_cv(&x, &labels, 2, &all, &all, &C_GRID, 5, 7).expect("fit");
        assert_eq!(a, b, "same seed, same folds, same answer");
        assert_eq!(scores.len(), C_GRID.len());
        let best = scores
            .iter()
            .min_by(|p, q| p.log_loss.total_cmp(&q.log_loss))
            .expect("scores");
        assert_eq!(a.c, best.c);
        assert!(
            a.c < 1e4,
            "noise should not be fitted without penalty: {scores:?}"
        );
    }

    #[test]
    fn folds_of_singleton_groups_are_the_row_wise_folds() {
        // The row-wise assignment used before groups existed (kept here as the reference):
        // per label, the rows shuffled and dealt out round-robin.
        let row_wise = |y: &[usize], classes: usize, folds: usize, seed: u64| {
            let mut fold = vec![0; y.len()];
            let mut rng = Rng::new(seed);
            for c in 0..classes {
                let mut rows: Vec<usize> = (0..y.len()).filter(|&i| y[i] == c).collect();
                rng.shuffle(&mut rows);
                for (k, r) in rows.into_iter().enumerate() {
                    fold[r] = k % folds;
                }
            }
            fold
        };
        let y: Vec<usize> = (0..97).map(|i| (i * 7 + i / 3) % 3).collect();
        let own: Vec<usize> = (0..y.len()).collect();
        for seed in [1, 13, 99] {
            assert_eq!(fold_of(&y, &own, 3, 5, seed), row_wise(&y, 3, 5, seed));
        }
    }

    #[test]
    fn an_images_views_share_a_fold() {
        // 40 images x 3 views, view-major rows (image i under view v is row v * 40 + i).
        let images = 40;
        let y_img: Vec<usize> = (0..images).map(|i| i % 2).collect();
        let y: Vec<usize> = y_img.repeat(3);
        let groups: Vec<usize> = (0..3 * images).map(|r| r % images).collect();
        let fold = fold_of(&y, &groups, 2, 5, 13);
        for i in 0..images {
            assert_eq!(fold[i], fold[images + i], "image {i}");
            assert_eq!(fold[i], fold[2 * images + i], "image {i}");
        }
        // Folds are still stratified: 4 images of each class per fold.
        for f in 0..5 {
            for c in 0..2 {
                let n = (0..images)
                    .filter(|&i| fold[i] == f && y_img[i] == c)
                    .count();
                assert_eq!(n, 4, "fold {f} class {c}");
            }
        }
        // And the image folds are the row-wise folds of the images alone.
        let own: Vec<usize> = (0..images).collect();
        assert_eq!(fold[..images], fold_of(&y_img, &own, 2, 5, 13)[..]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = tensor(&[&[1.0], &[-1.0]]);
        assert!(fit_cv(&x, &[1, 0], 2, &[0, 1], &[0, 1], &[], 5, 1).is_err());
        assert!(fit_cv(&x, &[1, 0], 2, &[0, 1], &[0, 1], &[-1.0], 5, 1).is_err());
        assert!(fit_cv(&x, &[1, 2], 2, &[0, 1], &[0, 1], &[1.0], 5, 1).is_err());
        assert!(
            fit_cv(&x, &[1, 0], 2, &[0, 1], &[0, 1], &[1.0, 2.0], 5, 1).is_err(),
            "5 folds of 2 rows"
        );
        assert!(
            fit_cv(&x, &[1, 0], 2, &[0, 1], &[0], &[1.0], 5, 1).is_err(),
            "a group per training row"
        );
        let nan = tensor(&[&[f64::NAN], &[1.0]]);
        assert!(fit_cv(&nan, &[1, 0], 2, &[0, 1], &[0, 1], &[1.0], 5, 1).is_err());
    }
}
