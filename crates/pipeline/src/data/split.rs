//! The train/validation split shared by every model: seeded, stratified per class, and keeping
//! byte-identical files (equal group keys) on one side so that no validation image has a copy
//! in training.
//!
//! Rows are grouped first (one group per key; every row is its own group when no keys are
//! given). A group counts for the class most of its rows carry (the smallest class index on a
//! tie). Within each class the groups are shuffled and taken into validation, in that order,
//! while doing so brings the class's validation rows closer to its target of
//! `round(val_fraction * rows)` (at least one group when the class has two or more, never all
//! of them). Without groups this is exactly `round(val_fraction * class_count)` rows, clamped
//! to `1..=class_count - 1` for classes of 2+ rows; a class of one row stays in training.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::training::rng::Rng;

/// Row indices of each side, sorted, and what grouping found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    /// Groups of two or more rows (sets of byte-identical files).
    pub duplicate_groups: usize,
    /// Rows in those groups.
    pub duplicate_files: usize,
    /// Groups whose rows carry different labels (the same file labelled twice differently).
    pub conflicting_groups: usize,
}

/// Splits rows `0..labels.len()` into training and validation.
///
/// `groups`, when given, holds one key per row (e.g. the file's content hash); rows with equal
/// keys always land on the same side. Errors on a `val_fraction` outside
/// `[0, 1)`, a `groups` of another length than `labels`, an empty training side, or a class
/// that appears in validation without any training row.
pub fn stratified_split(
    labels: &[usize],
    groups: Option<&[String]>,
    val_fraction: f64,
    seed: u64,
) -> Result<Split> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::InvalidValue {
            key: "split.val_fraction".into(),
            message: format!("{val_fraction} is not in [0, 1)"),
        });
    }
    let units = group_rows(labels.len(), groups)?;
    let mut split = Split {
        train: Vec::new(),
        val: Vec::new(),
        duplicate_groups: 0,
        duplicate_files: 0,
        conflicting_groups: 0,
    };
    let classes = labels.iter().max().map_or(0, |&m| m + 1);
    // Groups of each class, by the class most of their rows carry.
    let mut by_class: Vec<Vec<&[usize]>> = vec![Vec::new(); classes];
    for unit in &units {
        if unit.len() >= 2 {
            split.duplicate_groups += 1;
            split.duplicate_files += unit.len();
        }
        let mut counts: Vec<(usize, usize)> = Vec::new();
        for &r in unit.iter() {
            match counts.iter_mut().find(|(l, _)| *l == labels[r]) {
                Some((_, c)) => *c += 1,
                None => counts.push((labels[r], 1)),
            }
        }
        if counts.len() > 1 {
            split.conflicting_groups += 1;
        }
        // Most rows wins; on a tie the smallest class index, so the result does not depend on
        // row order.
        let majority = counts
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |&(l, _)| l);
        by_class[majority].push(unit);
    }

    let mut rng = Rng::new(seed);
    for class_units in &mut by_class {
        rng.shuffle(class_units);
        let rows: usize = class_units.iter().map(|u| u.len()).sum();
        let target = (val_fraction * rows as f64).round() as usize;
        let target = if class_units.len() >= 2 {
            target.max(1)
        } else {
            0
        };
        let mut taken = 0usize;
        let mut taken_units = 0usize;
        for unit in class_units.iter() {
            let n = unit.len();
            // Take the group when it brings the count closer to the target (or is the first
            // one a class of 2+ groups must give), but never the class's last group.
            let closer = taken < target && (taken + n).abs_diff(target) <= taken.abs_diff(target);
            let first = taken == 0 && target > 0;
            if (closer || first) && taken_units + 1 < class_units.len() {
                split.val.extend_from_slice(unit);
                taken += n;
                taken_units += 1;
            } else {
                split.train.extend_from_slice(unit);
            }
        }
    }
    split.train.sort_unstable();
    split.val.sort_unstable();

    if split.train.is_empty() {
        return Err(Error::EmptySplit {
            train: 0,
            val: split.val.len(),
        });
    }
    let mut in_train = vec![false; classes];
    for &r in &split.train {
        in_train[labels[r]] = true;
    }
    if let Some(&r) = split.val.iter().find(|&&r| !in_train[labels[r]]) {
        return Err(Error::ClassWithoutTraining {
            class: labels[r],
            row: r,
        });
    }
    Ok(split)
}

/// Rows grouped by key, in order of each key's first row; singletons without keys.
fn group_rows(n: usize, groups: Option<&[String]>) -> Result<Vec<Vec<usize>>> {
    let Some(keys) = groups else {
        return Ok((0..n).map(|r| vec![r]).collect());
    };
    if keys.len() != n {
        return Err(Error::Model {
            model: "split".into(),
            message: format!("{} group keys for {n} rows", keys.len()),
        });
    }
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (r, k) in keys.iter().enumerate() {
        let u = *index.entry(k.as_str()).or_insert_with(|| {
            units.push(Vec::new());
            units.len() - 1
        });
        units[u].push(r);
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(counts: &[usize]) -> Vec<usize> {
        counts
            .iter()
            .enumerate()
            .flat_map(|(c, &n)| std::iter::repeat_n(c, n))
            .collect()
    }

    #[test]
    fn is_deterministic_and_seeded() {
        let l = labels(&[30, 20, 10]);
        let a = stratified_split(&l, None, 0.2, 13).expect("split");
        assert_eq!(a, stratified_split(&l, None, 0.2, 13).expect("split"));
        assert_ne!(
            a.val,
            stratified_split(&l, None, 0.2, 14).expect("split").val
        );
    }

    #[test]
    fn every_class_gives_its_share() {
        let l = labels(&[30, 20, 10, 2, 1, 15]);
        let s = stratified_split(&l, None, 0.1, 7).expect("split");
        let per_class = |rows: &[usize], c| rows.iter().filter(|&&r| l[r] == c).count();
        // round(0.1 * n), at least 1 for 2+ rows, 0 for a single row; 0.1 * 15 rounds up.
        for (c, want) in [(0, 3), (1, 2), (2, 1), (3, 1), (4, 0), (5, 2)] {
            assert_eq!(per_class(&s.val, c), want, "class {c}");
        }
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..l.len()).collect::<Vec<_>>(), "a partition");
        assert!(s.train.windows(2).all(|w| w[0] < w[1]) && s.val.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            (s.duplicate_groups, s.duplicate_files, s.conflicting_groups),
            (0, 0, 0)
        );
    }

    #[test]
    fn groups_stay_whole_and_duplicates_are_counted() {
        // 40 rows of 2 classes; rows 2k and 2k+1 of each class are copies of one file.
        let l = labels(&[20, 20]);
        let keys: Vec<String> = (0..40).map(|r| format!("h{}", r / 2)).collect();
        for seed in 0..20 {
            let s = stratified_split(&l, Some(&keys), 0.25, seed).expect("split");
            for pair in (0..40).step_by(2) {
                assert_eq!(s.val.contains(&pair), s.val.contains(&(pair + 1)), "{pair}");
            }
            for c in 0..2 {
                // 0.25 * 20 = 5 rows: groups of 2 get as close as they can (4 or 6).
                let n = s.val.iter().filter(|&&r| l[r] == c).count();
                assert!(n == 4 || n == 6, "class {c}: {n}");
            }
            assert_eq!((s.duplicate_groups, s.duplicate_files), (20, 40));
        }
    }

    #[test]
    fn conflicting_groups_are_counted_and_voted() {
        // Rows 0-2 are one file labelled 0, 0, 1 (majority 0); rows 3-4 one file labelled 1, 0
        // (a tie: class 0).
        let l = vec![0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1];
        let keys: Vec<String> = ["a", "a", "a", "b", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let s = stratified_split(&l, Some(&keys), 0.3, 1).expect("split");
        assert_eq!(s.conflicting_groups, 2);
        assert_eq!(s.duplicate_groups, 2);
        assert_eq!(s.duplicate_files, 5);
    }

    #[test]
    fn a_class_only_in_validation_is_an_error() {
        // Class 1's only rows sit in groups whose majority is class 0; class 0 has two groups,
        // so one of them goes to validation. Some seed puts the group holding class 1 there.
        let l = vec![0, 0, 1, 0, 0];
        let keys: Vec<String> = ["a", "a", "a", "b", "b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let errors = (0..20)
            .filter_map(|seed| stratified_split(&l, Some(&keys), 0.5, seed).err())
            .collect::<Vec<_>>();
        assert!(!errors.is_empty());
        assert!(
            errors.iter().all(|e| e.to_string().contains("class 1")),
            "{errors:?}"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(
            stratified_split(&[], None, 0.1, 1).is_err(),
            "no training rows"
        );
        assert!(stratified_split(&[0, 1], None, 1.0, 1).is_err());
        let keys = vec!["a".to_string()];
        assert!(stratified_split(&[0, 1], Some(&keys), 0.1, 1).is_err());
    }
}
