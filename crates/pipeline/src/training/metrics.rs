//! Classification metrics: a [`ConfusionMatrix`] that accumulates predictions batch by batch,
//! and the [`Metrics`] (accuracy, per-class precision / recall / F1, macro F1) computed from it.
//!
//! Convention: a ratio whose denominator is zero is 0, not NaN. That happens for the precision
//! of a class that is never predicted, the recall of a class absent from the targets, and the F1
//! of a class whose precision and recall are both 0. NaN would poison every average and JSON
//! file it reaches; 0 is what scikit-learn reports (`zero_division=0`) for the same cases.

use serde::{Deserialize, Serialize};

/// Precision, recall and F1 of one class, with its number of true samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Correct predictions of the class / all predictions of the class (0 if never predicted).
    pub precision: f64,
    /// Correct predictions of the class / samples of the class (0 if it has no samples).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 if both are 0).
    pub f1: f64,
    /// Samples whose true class is this one.
    pub support: usize,
}

/// Everything computed from a confusion matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Correct predictions / all predictions (0 when there are none).
    pub accuracy: f64,
    /// One entry per class, in class-index order.
    pub per_class: Vec<ClassMetrics>,
    /// Unweighted mean of the per-class F1 over every class, including classes with no
    /// samples (their F1 is 0), so a class the model never gets right always costs.
    pub macro_f1: f64,
    /// `confusion_matrix[true][predicted]`: counts of samples.
    pub confusion_matrix: Vec<Vec<usize>>,
}

/// Counts of (true class, predicted class) pairs, filled batch by batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionMatrix {
    classes: usize,
    /// Row-major `classes x classes`: `counts[t * classes + p]`.
    counts: Vec<usize>,
    /// Pairs left out by [`ConfusionMatrix::update`] because an index was out of range.
    ignored: usize,
}

impl ConfusionMatrix {
    /// An empty matrix for `classes` classes (indices `0..classes`).
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
            ignored: 0,
        }
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Samples counted so far.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Pairs left out so far because the predicted or true index was `>= classes`, or because
    /// `predicted` and `target` had different lengths (the surplus of the longer one).
    pub fn ignored(&self) -> usize {
        self.ignored
    }

    /// Adds one batch: `predicted[i]` is the predicted class of sample `i`, `target[i]` its
    /// true class.
    ///
    /// This never panics: pairs with an index out of range, and the tail of the longer slice
    /// when the lengths differ, are not counted but added to [`ConfusionMatrix::ignored`] so
    /// the caller can check it.
    pub fn update(&mut self, predicted: &[usize], target: &[usize]) {
        self.ignored += predicted.len().abs_diff(target.len());
        for (&p, &t) in predicted.iter().zip(target) {
            if p < self.classes && t < self.classes {
                self.counts[t * self.classes + p] += 1;
            } else {
                self.ignored += 1;
            }
        }
    }

    /// Forgets every count (start of a new epoch), keeping the number of classes.
    pub fn reset(&mut self) {
        self.counts.fill(0);
        self.ignored = 0;
    }

    /// Count of samples of true class `target` predicted as `predicted` (0 if out of range).
    pub fn get(&self, target: usize, predicted: usize) -> usize {
        if target < self.classes && predicted < self.classes {
            self.counts[target * self.classes + predicted]
        } else {
            0
        }
    }

    /// Accuracy, per-class metrics and macro F1 of the samples counted so far.
    pub fn compute(&self) -> Metrics {
        let n = self.classes;
        let matrix: Vec<Vec<usize>> = (0..n)
            .map(|t| self.counts[t * n..(t + 1) * n].to_vec())
            .collect();
        let total = self.total();
        let correct: usize = (0..n).map(|c| matrix[c][c]).sum();

        let per_class: Vec<ClassMetrics> = (0..n)
            .map(|c| {
                let tp = matrix[c][c];
                let support: usize = matrix[c].iter().sum();
                let predicted: usize = matrix.iter().map(|row| row[c]).sum();
                let precision = ratio(tp as f64, predicted as f64);
                let recall = ratio(tp as f64, support as f64);
                let f1 = ratio(2.0 * precision * recall, precision + recall);
                ClassMetrics {
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let macro_f1 = ratio(per_class.iter().map(|m| m.f1).sum(), n as f64);

        Metrics {
            accuracy: ratio(correct as f64, total as f64),
            per_class,
            macro_f1,
            confusion_matrix: matrix,
        }
    }
}

/// `num / den`, with 0/0 (and anything / 0) defined as 0; see the module docs.
fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The predicted class of each row of a row-major `rows x classes` logits (or probabilities)
/// buffer: the index of the row's largest value.
///
/// Ties go to the lowest index. NaN is never the maximum (a row of only NaN gives 0). A
/// trailing partial row (when `logits.len()` is not a multiple of `classes`) is ignored, and
/// `classes == 0` gives no rows.
pub fn argmax_rows(logits: &[f32], classes: usize) -> Vec<usize> {
    if classes == 0 {
        return Vec::new();
    }
    logits
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0;
            let mut best_value = f32::NEG_INFINITY;
            for (i, &v) in row.iter().enumerate() {
                // `>` is false for NaN, so NaN never wins; the first of equal values stays.
                if v > best_value {
                    best = i;
                    best_value = v;
                }
            }
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn three_class_known_answer() {
        // (true, predicted) pairs:
        //   (0,0) (0,0) (0,1) (1,1) (1,2) (2,2) (2,2) (2,1) (2,2) (0,0)
        // Confusion matrix (rows = true, cols = predicted):
        //        p0 p1 p2 | support
        //   t0 [  3  1  0 ] 4
        //   t1 [  0  1  1 ] 2
        //   t2 [  0  1  3 ] 4
        //   predicted: 3  3  4
        // accuracy = (3 + 1 + 3) / 10 = 0.7
        // class 0: P = 3/3 = 1,    R = 3/4,  F1 = 2 * 1 * 0.75 / 1.75 = 6/7
        // class 1: P = 1/3,        R = 1/2,  F1 = 2 * (1/6) / (5/6) = 2/5
        // class 2: P = 3/4,        R = 3/4,  F1 = 3/4
        // macro F1 = (6/7 + 2/5 + 3/4) / 3 = (120 + 56 + 105) / 140 / 3 = 281/420
        let target = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0];
        let predicted = [0, 0, 1, 1, 2, 2, 2, 1, 2, 0];
        let mut cm = ConfusionMatrix::new(3);
        // Two batches, to check accumulation.
        cm.update(&predicted[..4], &target[..4]);
        cm.update(&predicted[4..], &target[4..]);
        let m = cm.compute();

        assert_eq!(
            m.confusion_matrix,
            vec![vec![3, 1, 0], vec![0, 1, 1], vec![0, 1, 3]]
        );
        assert!(close(m.accuracy, 0.7));
        let expected = [
            (1.0, 0.75, 6.0 / 7.0, 4),
            (1.0 / 3.0, 0.5, 0.4, 2),
            (0.75, 0.75, 0.75, 4),
        ];
        for (c, (p, r, f1, s)) in expected.iter().enumerate() {
            let got = &m.per_class[c];
            assert!(close(got.precision, *p), "class {c}: {got:?}");
            assert!(close(got.recall, *r), "class {c}: {got:?}");
            assert!(close(got.f1, *f1), "class {c}: {got:?}");
            assert_eq!(got.support, *s);
        }
        assert!(close(m.macro_f1, 281.0 / 420.0));
        assert_eq!(cm.total(), 10);
        assert_eq!(cm.ignored(), 0);
        assert_eq!(cm.get(2, 1), 1);
    }

    #[test]
    fn empty_input_is_all_zero() {
        let mut cm = ConfusionMatrix::new(2);
        cm.update(&[], &[]);
        let m = cm.compute();
        assert_eq!(m.accuracy, 0.0);
        assert_eq!(m.macro_f1, 0.0);
        assert_eq!(m.confusion_matrix, vec![vec![0, 0], vec![0, 0]]);
        for c in &m.per_class {
            assert_eq!((c.precision, c.recall, c.f1, c.support), (0.0, 0.0, 0.0, 0));
        }
        let none = ConfusionMatrix::new(0).compute();
        assert_eq!(none.accuracy, 0.0);
        assert_eq!(none.macro_f1, 0.0);
        assert!(none.per_class.is_empty() && none.confusion_matrix.is_empty());
    }

    #[test]
    fn class_never_predicted_has_zero_precision_not_nan() {
        // Class 2 has two samples but is never predicted:
        //   t0 [1 0 0]   t1 [0 1 0]   t2 [0 2 0]
        // class 0: P = 1, R = 1, F1 = 1
        // class 1: P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 1/2
        // class 2: P = 0/0 -> 0, R = 0/2 = 0, F1 = 0/0 -> 0
        // accuracy = 2/4; macro F1 = (1 + 0.5 + 0) / 3 = 0.5
        let mut cm = ConfusionMatrix::new(3);
        cm.update(&[0, 1, 1, 1], &[0, 1, 2, 2]);
        let m = cm.compute();
        assert!(close(m.accuracy, 0.5));
        assert!(close(m.per_class[1].precision, 1.0 / 3.0));
        assert!(close(m.per_class[1].f1, 0.5));
        let c2 = &m.per_class[2];
        assert_eq!(
            (c2.precision, c2.recall, c2.f1, c2.support),
            (0.0, 0.0, 0.0, 2)
        );
        assert!(close(m.macro_f1, 0.5));
        assert!(m.per_class.iter().all(|c| c.f1.is_finite()));
    }

    #[test]
    fn bad_pairs_are_ignored_and_counted() {
        let mut cm = ConfusionMatrix::new(2);
        // (5, 0) and (0, 7) are out of range; the third target has no prediction.
        cm.update(&[1, 5, 0], &[1, 0, 7, 1]);
        assert_eq!(cm.total(), 1);
        assert_eq!(cm.ignored(), 3);
        assert_eq!(cm.get(1, 1), 1);
        assert_eq!(cm.get(9, 9), 0);
        cm.reset();
        assert_eq!(cm.total(), 0);
        assert_eq!(cm.ignored(), 0);
        assert_eq!(cm.classes(), 2);
    }

    #[test]
    fn metrics_round_trip_through_json() {
        let mut cm = ConfusionMatrix::new(2);
        cm.update(&[0, 1, 1], &[0, 1, 0]);
        let m = cm.compute();
        let json = serde_json::to_string(&m).expect("serialise");
        let back: Metrics = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, m);
    }

    #[test]
    fn argmax_rows_picks_first_maximum_and_skips_nan() {
        let logits = [
            0.1,
            0.7,
            0.2, // -> 1
            3.0,
            3.0,
            -1.0, // tie -> 0
            f32::NAN,
            -5.0,
            -4.0, // NaN never wins -> 2
            f32::NAN,
            f32::NAN,
            f32::NAN, // all NaN -> 0
            9.0,      // partial row, ignored
        ];
        assert_eq!(argmax_rows(&logits, 3), vec![1, 0, 2, 0]);
        assert!(argmax_rows(&logits, 0).is_empty());
        assert!(argmax_rows(&[], 3).is_empty());
    }
}
