//! `extract --shard K/N` through the library: N parts of one store add up, file for file and
//! byte for byte, to an unsharded run (N = 1, 2, 3, 7, 13 and 16 > the 13 batches, in any
//! order, concurrently); a part
//! run twice (one after the other, or at once) changes nothing; a killed part resumes its own
//! batches; bad images are recorded by their part; train-head names the parts that are
//! missing and establishes the union itself when the parts finished without it; an unsharded
//! extract finishes a partial sharded one; gc refuses to run under an unfinished one.
//! (Parts from the schedulers' environment variables, through the binary, are in
//! `crates/extract/tests/shard.rs`.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::{files, fixture, load};
use pipeline::config::{Config, OnBadImage};
use pipeline::features::extract::Summary;

/// Unique images of the fixture: 25, plus 3 byte-identical copies under other names, so
/// batches of 2 make 13 batches (the last with one image).
const UNIQUE: usize = 25;

/// A dataset with duplicates (batch 2, 32x32 input), its unsharded store as the reference,
/// and the reference's files.
fn setup(test: &str) -> (PathBuf, Config, BTreeMap<String, Vec<u8>>) {
    let (dir, mut c) = fixture(test, UNIQUE);
    let images = dir.join("images");
    let mut csv = std::fs::read_to_string(dir.join("labels.csv")).expect("csv");
    for i in [3, 10, 24] {
        std::fs::copy(
            images.join(format!("img{i:03}.png")),
            images.join(format!("copy{i:03}.png")),
        )
        .expect("copy");
        csv.push_str(&format!("copy{i:03}.png,car\n"));
    }
    std::fs::write(dir.join("labels.csv"), csv).expect("csv");
    let reference = dir.join("reference");
    let mut r = c.clone();
    r.extract.out = reference.clone();
    let s = run(&r, None);
    assert_eq!((s.rows, s.unique, s.computed), (UNIQUE + 3, UNIQUE, UNIQUE));
    c.extract.out = dir.join("features");
    (dir, c, files(&reference))
}

/// Runs extraction of part `part` ("K/N"), or unsharded.
fn run(c: &Config, part: Option<&str>) -> Summary {
    let mut c = c.clone();
    c.extract.shard = part.map(String::from);
    pipeline::features::extract::run(&c).expect("extraction succeeds")
}

fn with_out(c: &Config, out: &Path) -> Config {
    let mut c = c.clone();
    c.extract.out = out.to_owned();
    c
}

/// The store's files without the part records (`parts/`), which an unsharded run does not
/// write.
fn store_files(out: &Path) -> BTreeMap<String, Vec<u8>> {
    files(out)
        .into_iter()
        .filter(|(name, _)| !name.starts_with("parts/"))
        .collect()
}

fn records(out: &Path) -> Vec<String> {
    files(out)
        .into_keys()
        .filter(|name| name.starts_with("parts/"))
        .collect()
}

fn row_map_files(out: &Path) -> Vec<String> {
    files(out)
        .into_keys()
        .filter(|name| name.starts_with("datasets/"))
        .collect()
}

fn assert_same_store(out: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    let got = store_files(out);
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(reference), "{what}: the same files");
    for (name, bytes) in reference {
        assert!(got[name] == *bytes, "{what}: {name} differs");
    }
}

#[test]
fn the_union_of_n_parts_is_byte_identical_to_an_unsharded_run() {
    let (dir, c, reference) = setup("shard-union");
    let expected = load(&with_out(&c, &dir.join("reference"))).expect("reference loads");
    // 16 > 13 batches: parts 13, 14 and 15 have nothing to do, and still count.
    for n in [1, 2, 3, 7, 13, 16] {
        let out = dir.join(format!("features-{n}"));
        let c = with_out(&c, &out);
        // Every other N in reverse order: the union does not depend on who finishes last.
        let order: Vec<usize> = if n % 2 == 0 {
            (0..n).collect()
        } else {
            (0..n).rev().collect()
        };
        let mut computed = 0;
        let mut batches = 0;
        for (i, k) in order.iter().enumerate() {
            let s = run(&c, Some(&format!("{k}/{n}")));
            let part = s.part.as_ref().expect("a part");
            assert_eq!((part.part.index, part.part.count), (*k, n));
            assert_eq!(part.all_batches, 13);
            // Batch b is part b mod n's: part k has ceil((13 - k) / n) batches.
            assert_eq!(
                part.batches,
                13usize.saturating_sub(*k).div_ceil(n),
                "part {k}/{n}"
            );
            let last = i + 1 == n;
            assert_eq!(
                part.union, last,
                "N={n}: only the last part writes the row map: {s}"
            );
            assert_eq!(
                row_map_files(&out).len(),
                usize::from(last),
                "N={n}: no row map before every part is in"
            );
            computed += s.computed;
            batches += part.batches;
        }
        assert_eq!(
            (computed, batches),
            (UNIQUE, 13),
            "N={n}: each image computed once"
        );
        assert_same_store(&out, &reference, &format!("N={n}"));
        assert_eq!(records(&out).len(), n, "N={n}: one record per part");
        let set = load(&c).expect("the union loads");
        assert_eq!(set.rows, expected.rows);
        assert_eq!(set.labels, expected.labels);
        assert_eq!(
            set.features.to_vec2::<f32>().expect("f32"),
            expected.features.to_vec2::<f32>().expect("f32")
        );
    }
}

#[test]
fn parts_running_at_once_add_up_to_the_unsharded_store() {
    let (dir, c, reference) = setup("shard-concurrent");
    for n in [7, 13] {
        let c = with_out(&c, &dir.join(format!("features-{n}")));
        let unions: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|k| {
                    let c = c.clone();
                    scope.spawn(move || run(&c, Some(&format!("{k}/{n}"))))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic").part.expect("part").union)
                .collect()
        });
        assert!(
            unions.iter().any(|u| *u),
            "N={n}: some part wrote the row map"
        );
        assert_same_store(&c.extract.out, &reference, &format!("N={n} at once"));
    }
}

#[test]
fn a_part_run_twice_changes_nothing_and_two_copies_at_once_are_harmless() {
    let (dir, c, reference) = setup("shard-twice");
    let first = run(&c, Some("1/3"));
    assert_eq!(first.computed, 8, "batches 1, 4, 7, 10 of 2 images");
    let before = files(&c.extract.out);
    let again = run(&c, Some("1/3"));
    assert_eq!((again.computed, again.reused), (0, 8), "{again}");
    assert_eq!(
        files(&c.extract.out),
        before,
        "the second run wrote the same bytes"
    );
    // The same part twice at once (a scheduler retrying a task that was still running).
    let c2 = with_out(&c, &dir.join("twin"));
    let both: Vec<Summary> = std::thread::scope(|scope| {
        let a = scope.spawn(|| run(&c2, Some("2/3")));
        let b = scope.spawn(|| run(&c2, Some("2/3")));
        vec![a.join().expect("a"), b.join().expect("b")]
    });
    assert!(both
        .iter()
        .all(|s| s.part.as_ref().is_some_and(|p| !p.union)));
    run(&c2, Some("0/3"));
    let last = run(&c2, Some("1/3"));
    assert!(last.part.expect("part").union);
    assert_same_store(&c2.extract.out, &reference, "twins");
}

#[test]
fn a_killed_part_resumes_its_own_batches() {
    let (_dir, c, reference) = setup("shard-resume");
    run(&c, Some("0/2"));
    run(&c, Some("1/2"));
    // As if part 1 had been killed after writing its first shard: its later shards, its
    // record and the row map (which only the last part writes) are not there.
    let out = &c.extract.out;
    let plan = pipeline::features::extract::Plan::new(&c).expect("plan");
    let work = pipeline::features::extract::Work::new(&plan.hashes, 2);
    let batch_of = |hashes: &[String]| {
        let position = work.unique.iter().position(|(h, _)| *h == hashes[0]);
        work.batch_of(position.expect("a known hash"))
    };
    let mut part1: Vec<(usize, PathBuf)> = crate::common::shards(out)
        .into_iter()
        .map(|(path, hashes)| (batch_of(&hashes), path))
        .filter(|(b, _)| b % 2 == 1)
        .collect();
    part1.sort();
    assert_eq!(part1.len(), 6, "batches 1, 3, 5, 7, 9, 11");
    for (_, path) in &part1[1..] {
        std::fs::remove_file(path).expect("rm shard");
    }
    for path in walk(&out.join("datasets")) {
        std::fs::remove_file(path).expect("rm row map");
    }
    for path in walk(&out.join("parts")) {
        if path.ends_with("part-1-of-2.json") {
            std::fs::remove_file(path).expect("rm record");
        }
    }
    let p0 = run(&c, Some("0/2"));
    assert_eq!(p0.computed, 0, "part 0 is whole: {p0}");
    assert!(!p0.part.expect("part").union, "part 1 has not finished");
    let p1 = run(&c, Some("1/2"));
    assert_eq!(
        (p1.computed, p1.reused),
        (10, 2),
        "only the lost batches: {p1}"
    );
    assert!(p1.part.expect("part").union);
    assert_same_store(out, &reference, "resumed");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn train_head_names_missing_parts_and_establishes_the_union_itself() {
    let (_dir, c, reference) = setup("shard-missing");
    run(&c, Some("0/4"));
    run(&c, Some("2/4"));
    let err = load(&c).expect_err("parts 1 and 3 are missing").to_string();
    assert!(
        err.contains("parts 1, 3 of 4") && err.contains("not finished") && err.contains("--shard"),
        "{err}"
    );
    run(&c, Some("3/4"));
    let err = load(&c).expect_err("part 1 is missing").to_string();
    assert!(
        err.contains("part 1 of 4 (batches of 2) has not finished"),
        "{err}"
    );
    // Part 1 finishes, but (as if the filesystem had shown it the other records late) without
    // writing the row map: train-head finds every part in and writes it.
    run(&c, Some("1/4"));
    let out = &c.extract.out;
    let row_maps = row_map_files(out);
    assert_eq!(row_maps.len(), 1);
    std::fs::remove_file(out.join(&row_maps[0])).expect("rm row map");
    let set = load(&c).expect("the union of the parts loads");
    assert_eq!(set.rows.len(), UNIQUE + 3);
    assert_same_store(out, &reference, "train-head's union");
}

#[test]
fn an_unsharded_extract_finishes_a_partial_sharded_one_and_drops_the_records() {
    let (_dir, c, reference) = setup("shard-finish");
    let p = run(&c, Some("0/3"));
    assert_eq!(p.computed, 9, "batches 0, 3, 6, 9 and 12 (one image)");
    let s = run(&c, None);
    assert_eq!((s.computed, s.reused), (UNIQUE - 9, 9), "{s}");
    assert!(
        records(&c.extract.out).is_empty(),
        "records superseded by the row map"
    );
    assert_same_store(&c.extract.out, &reference, "finished unsharded");
}

#[test]
fn gc_refuses_to_run_under_an_unfinished_sharded_extraction() {
    let (_dir, c, _reference) = setup("shard-gc");
    run(&c, Some("0/2"));
    let before = files(&c.extract.out);
    let err = pipeline::features::extract::gc(&c)
        .expect_err("unfinished")
        .to_string();
    assert!(
        err.contains("unfinished")
            && err.contains("part 1 of 2")
            && err.contains("nothing was deleted"),
        "{err}"
    );
    assert_eq!(files(&c.extract.out), before, "nothing deleted");
    run(&c, Some("1/2"));
    let report = pipeline::features::extract::gc(&c).expect("gc runs");
    assert_eq!(report.freed_shards, 0, "{report}");
    assert!(
        records(&c.extract.out).is_empty(),
        "finished records dropped"
    );
    assert!(load(&c).is_ok());
}

#[test]
fn bad_images_are_recorded_by_their_part_and_the_union_lists_them() {
    let (dir, mut c) = fixture("shard-bad", 12);
    c.data.on_bad_image = OnBadImage::Skip;
    // Rows 3 and 10 (batches 1 and 5 of 2: parts 1 and 2 of 3) cannot be decoded.
    for i in [3, 10] {
        std::fs::write(
            dir.join(format!("images/img{i:03}.png")),
            format!("not a png {i}"),
        )
        .expect("garbage");
    }
    let reference = with_out(&c, &dir.join("reference"));
    let s = run(&reference, None);
    assert_eq!(s.skipped, 2);
    let expected = store_files(&reference.extract.out);
    let c = with_out(&c, &dir.join("features"));
    let a = run(&c, Some("0/3"));
    let b = run(&c, Some("1/3"));
    assert_eq!((a.skipped, b.skipped), (0, 1), "batch 1 is part 1's");
    // A rerun does not decode the bad image again: nothing to compute.
    let b2 = run(&c, Some("1/3"));
    assert_eq!(b2.computed, 0, "{b2}");
    let last = run(&c, Some("2/3"));
    assert_eq!(last.skipped, 1, "batch 5 is part 2's");
    assert!(last.part.expect("part").union);
    assert_same_store(&c.extract.out, &expected, "skip mode");
    let set = load(&c).expect("loads");
    assert_eq!(set.rows.len(), 10);
}

#[test]
fn corrupt_part_records_count_as_missing_and_never_panic() {
    let (_dir, c, _reference) = setup("shard-corrupt-record");
    run(&c, Some("0/2"));
    run(&c, Some("1/2"));
    let out = &c.extract.out;
    let record = walk(&out.join("parts"))
        .into_iter()
        .find(|p| p.ends_with("part-1-of-2.json"))
        .expect("record");
    let good = std::fs::read(&record).expect("read");
    // Thousands of mutations through the reader: a valid record or an error naming the file.
    let mut rng = pipeline::training::Rng::new(7);
    for round in 0..5000 {
        let mut bytes = good.clone();
        for _ in 0..=rng.below(3) {
            let i = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes.truncate(i),
                1 => bytes[i] = bytes[i].wrapping_add(1 + rng.below(254) as u8),
                _ => bytes.insert(i, b"{}[],\"0-9"[rng.below(9)]),
            }
            if bytes.is_empty() {
                break;
            }
        }
        if let Err(e) = pipeline::features::parts::PartRecord::from_json(&bytes, &record) {
            let text = e.to_string();
            assert!(text.contains("part-1-of-2.json"), "round {round}: {text}");
        }
    }
    // Through train-head: a corrupt record is a missing part, named.
    std::fs::remove_file(out.join(&row_map_files(out)[0])).expect("rm row map");
    for bad in [&good[..good.len() / 2], b"not json", b"{}"] {
        std::fs::write(&record, bad).expect("write");
        let err = load(&c).expect_err("part 1 unreadable").to_string();
        assert!(err.contains("part 1 of 2"), "{err}");
    }
    std::fs::write(&record, &good).expect("restore");
    assert!(load(&c).is_ok());
}
