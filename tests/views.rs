//! Augmented views (`[extract] views`) end to end: view rows in the store (derived keys, reuse
//! of the original rows, gc), the hflip row against the features of a mirrored file, training
//! on every view with the split made on images, validation by the mean over views checked by
//! hand, logistic heads, test-time augmentation in `predict`, and the config's errors. The
//! last test runs the real study images and weights (through `testkit::shared_dir`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use pipeline::config::{Config, HeadKind, ValViews};
use pipeline::features::views::{row_key, View};
use pipeline::models::Head;
use pipeline::training::study::{train_head, view_rows, RunMetrics};

use crate::common::{files, fixture, load};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A 32x32 image (the fixture's input size, so no resize happens) that is not symmetric.
fn image(i: u32) -> image::RgbImage {
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([
            (x * 7 + i * 31) as u8,
            (y * 5 + x * x / 4) as u8,
            ((x + 2 * y) * 3 + i * 11) as u8,
        ])
    })
}

/// `n` asymmetric images plus `mirror0.png`, the left-right mirror of `img000.png`, labelled
/// like it; `c` pointed at them.
fn mirrored_dataset(dir: &Path, c: &mut Config, n: u32) {
    let images = dir.join("square");
    std::fs::create_dir_all(&images).expect("mkdir");
    let mut csv = String::from("file,class\n");
    for i in 0..n {
        let name = format!("img{i:03}.png");
        image(i).save(images.join(&name)).expect("png");
        let label = if i % 3 == 0 { "ambulance" } else { "car" };
        csv.push_str(&format!("{name},{label}\n"));
    }
    image::imageops::flip_horizontal(&image(0))
        .save(images.join("mirror0.png"))
        .expect("png");
    csv.push_str("mirror0.png,ambulance\n");
    std::fs::write(dir.join("square.csv"), csv).expect("csv");
    c.data.csv = Some(dir.join("square.csv"));
    c.data.images = Some(images);
}

fn extract(c: &Config) -> pipeline::features::extract::Summary {
    pipeline::features::extract::run(c).expect("extract")
}

fn row(t: &Tensor, i: usize) -> Vec<f32> {
    t.get(i).and_then(|r| r.to_vec1()).expect("row")
}

#[test]
fn view_rows_are_added_beside_the_original_rows_and_the_hflip_row_is_the_mirrored_image() {
    let (dir, mut c) = fixture("views-store", 1);
    mirrored_dataset(&dir, &mut c, 6);
    let out = c.extract.out.clone();
    let first = extract(&c);
    assert_eq!((first.computed, first.unique), (7, 7));
    let before = files(&out);
    let map_file = |f: &std::collections::BTreeMap<String, Vec<u8>>| -> (String, String) {
        let (k, v) = f
            .iter()
            .find(|(k, _)| k.starts_with("datasets/"))
            .expect("row map");
        (k.clone(), String::from_utf8(v.clone()).expect("utf8"))
    };
    let (map_name, map_text) = map_file(&before);
    assert!(
        !map_text.contains("\"views\""),
        "without views the row map is written as before views existed: {map_text}"
    );

    // Adding hflip computes the 7 mirrored rows only and leaves every original file as it was.
    c.extract.views = s(&["original", "hflip"]);
    let second = extract(&c);
    assert_eq!((second.computed, second.reused), (7, 7), "{second}");
    let after = files(&out);
    for (name, bytes) in &before {
        if *name != map_name {
            assert_eq!(after.get(name), Some(bytes), "{name} changed");
        }
    }
    let (map_name2, map_text2) = map_file(&after);
    assert_eq!(
        map_name2, map_name,
        "same dataset, same space: the same row map"
    );
    assert!(
        map_text2.contains("\"views\":[\"original\",\"hflip\"]"),
        "{map_text2}"
    );
    // The new shards hold exactly the derived keys of the hflip rows.
    let set = load(&c).expect("load");
    assert_eq!(set.views, vec![View::Original, View::Hflip]);
    let hashes: Vec<String> = set
        .row_map
        .rows
        .iter()
        .map(|r| r.hash.clone().expect("hash"))
        .collect();
    let mut new_keys: Vec<String> = crate::common::shards(&out)
        .into_iter()
        .filter(|(p, _)| !before.keys().any(|k| p.ends_with(k)))
        .flat_map(|(_, keys)| keys)
        .collect();
    new_keys.sort();
    let mut want: Vec<String> = hashes.iter().map(|h| row_key(h, "hflip")).collect();
    want.sort();
    assert_eq!(new_keys, want);
    assert_eq!(row_key(&hashes[0], "original"), hashes[0]);

    // Feature rows are view-major; the hflip row of img000 is the original row of its mirror.
    let n = 7;
    assert_eq!(set.features.dims()[0], 2 * n);
    let flipped = row(&set.features, n); // view 1, row 0 (img000)
    let mirror = row(&set.features, 6); // view 0, row 6 (mirror0.png)
    let scale = mirror.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (a, b) in flipped.iter().zip(&mirror) {
        assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }
    assert_ne!(row(&set.features, 0), flipped, "img000 is not symmetric");

    // gc keeps the view rows while the row map lists them ...
    let gc = pipeline::features::extract::gc(&c).expect("gc");
    assert_eq!(gc.freed_shards, 0, "{gc}");
    // ... and frees them once an extraction without views replaced it.
    c.extract.views = s(&["original"]);
    assert_eq!(extract(&c).computed, 0);
    let gc = pipeline::features::extract::gc(&c).expect("gc");
    assert!(gc.freed_shards >= 1, "{gc}");
    assert_eq!(
        files(&out),
        before,
        "back to the store without views, byte for byte"
    );
    // train-head asking for views the store lacks is told to extract them.
    c.extract.views = s(&["original", "hflip"]);
    let err = load(&c).expect_err("hflip gone").to_string();
    assert!(
        err.contains("hflip") && err.contains("cargo run -p extract"),
        "{err}"
    );
}

#[test]
fn crops_extract_as_rows_of_their_own() {
    let (_dir, mut c) = fixture("views-crops", 4);
    c.extract.views = s(&["original", "crops:5"]);
    let summary = extract(&c);
    assert_eq!(summary.computed, 4 * 6);
    let set = load(&c).expect("load");
    assert_eq!(set.features.dims()[0], 4 * 6);
    // Five different crops of one image give five different rows.
    let rows: Vec<Vec<f32>> = (0..6).map(|v| row(&set.features, v * 4)).collect();
    for a in 0..6 {
        for b in a + 1..6 {
            assert_ne!(rows[a], rows[b], "views {a} and {b}");
        }
    }
}

/// Softmax of a head's logits of feature rows `rows` of `features`.
fn probs(head: &Head, features: &Tensor, rows: &[usize]) -> Vec<Vec<f32>> {
    let idx = Tensor::from_vec(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        rows.len(),
        &Device::Cpu,
    )
    .expect("idx");
    let x = features.index_select(&idx, 0).expect("select");
    let logits = head.logits(&x).expect("logits");
    pipeline::training::probabilities(&logits).expect("softmax")
}

fn argmax(p: &[f32]) -> usize {
    (0..p.len()).fold(0, |b, i| if p[i] > p[b] { i } else { b })
}

fn metrics(run: &Path) -> RunMetrics {
    pipeline::training::study::read_metrics(run).expect("metrics")
}

/// A fixture with views extracted and short training.
fn views_setup(test: &str, n: usize) -> (PathBuf, Config) {
    let (dir, mut c) = fixture(test, n);
    c.extract.views = s(&["original", "hflip"]);
    c.split.val_fraction = 0.25;
    c.head.train.epochs = 3;
    c.head.train.batch_size = 4;
    c.output.runs = dir.join("runs");
    extract(&c);
    (dir, c)
}

#[test]
fn training_uses_every_view_and_mean_validation_is_the_mean_of_view_probabilities() {
    let (dir, mut c) = views_setup("views-train", 16);
    c.head.val_views = ValViews::Mean;
    let run = train_head(&c).expect("train-head");
    let m = metrics(&run.dir);
    assert_eq!(m.views, s(&["original", "hflip"]));
    assert_eq!(m.val_views, "mean");
    assert!(
        m.name.contains("views original+hflip (val mean)"),
        "{}",
        m.name
    );
    // The split is the split without views (made on images).
    let mut plain = c.clone();
    plain.extract.views = s(&["original"]);
    let plain_run = train_head(&plain).expect("train-head without views");
    let pm = metrics(&plain_run.dir);
    assert_eq!(pm.split.fingerprint, m.split.fingerprint);
    assert_eq!(pm.views, s(&["original"]));
    assert_eq!(pm.val_views, "original");
    assert!(!pm.name.contains("views"), "{}", pm.name);
    // Training saw 2 rows per training image.
    let train_images = m.split.split.train.len();
    let seen = m.images_per_second * m.train_seconds / m.history.len() as f64;
    assert!(
        (seen - (2 * train_images) as f64).abs() < 0.5,
        "{seen} rows per epoch for {train_images} images"
    );

    // Recompute the validation accuracy and confusion matrix by hand from the saved head.
    let set = load(&c).expect("load");
    let head = Head::load(&run.dir.join("head.safetensors"), &Device::Cpu).expect("head");
    let kept = set.rows.len();
    let val: Vec<usize> = m
        .split
        .split
        .val
        .iter()
        .map(|r| set.rows.iter().position(|x| x == r).expect("kept"))
        .collect();
    let p0 = probs(&head, &set.features, &val);
    let shifted: Vec<usize> = val.iter().map(|i| kept + i).collect();
    let p1 = probs(&head, &set.features, &shifted);
    let mut cm = vec![vec![0usize; 2]; 2];
    let mut correct = 0;
    for (k, &i) in val.iter().enumerate() {
        let mean: Vec<f32> = p0[k]
            .iter()
            .zip(&p1[k])
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        let predicted = argmax(&mean);
        cm[set.labels[i]][predicted] += 1;
        correct += usize::from(predicted == set.labels[i]);
    }
    assert_eq!(m.confusion_matrix, cm);
    assert!((m.val_accuracy - correct as f64 / val.len() as f64).abs() < 1e-12);
    // Per-epoch history scores the original view: its last record matches it.
    let original_correct = val
        .iter()
        .enumerate()
        .filter(|(k, &i)| argmax(&p0[*k]) == set.labels[i])
        .count();
    let last = m.history.last().expect("history");
    assert!(
        (last.val_accuracy - original_correct as f64 / val.len() as f64).abs() < 1e-12,
        "{} vs {original_correct}/{}",
        last.val_accuracy,
        val.len()
    );

    // Test-time augmentation: predict averages over the run's views; tta = false does not.
    c.predict.input = Some(dir.join("images"));
    c.predict.run = Some(run.dir.clone());
    let read = |path: &Path| -> Vec<(String, Vec<f32>)> {
        std::fs::read_to_string(path)
            .expect("csv")
            .lines()
            .skip(1)
            .map(|l| {
                let cells: Vec<&str> = l.split(',').collect();
                let p = cells[2..]
                    .iter()
                    .map(|v| v.parse().expect("prob"))
                    .collect();
                (cells[0].to_string(), p)
            })
            .collect()
    };
    let all: Vec<usize> = (0..kept).collect();
    let q0 = probs(&head, &set.features, &all);
    let q1 = probs(
        &head,
        &set.features,
        &all.iter().map(|i| kept + i).collect::<Vec<_>>(),
    );
    for (tta, file) in [(true, "tta.csv"), (false, "plain.csv")] {
        c.predict.tta = tta;
        c.predict.output = Some(dir.join(file));
        let summary = pipeline::inference::predict::run(&c).expect("predict");
        assert_eq!(summary.images, 16);
        let got = read(&dir.join(file));
        for (id, p) in &got {
            let i = set.ids.iter().position(|x| x == id).expect("id");
            for class in 0..2 {
                let want = if tta {
                    (q0[i][class] + q1[i][class]) / 2.0
                } else {
                    q0[i][class]
                };
                // The CSV holds 6 decimals.
                assert!(
                    (p[class] - want).abs() < 2e-6,
                    "{id} tta {tta}: {p:?} vs {want}"
                );
            }
        }
    }
}

#[test]
fn logistic_and_mlp_heads_train_on_views() {
    let (_dir, mut c) = views_setup("views-heads", 24);
    c.head.kind = HeadKind::Logistic;
    c.head.c = vec![0.1, 10.0];
    c.head.cv_folds = 3;
    let run = train_head(&c).expect("logistic");
    let m = metrics(&run.dir);
    assert_eq!((m.views.len(), m.val_views.as_str()), (2, "original"));
    assert!(run.dir.join("cv.json").is_file());
    c.head.kind = HeadKind::Mlp;
    c.head.train.epochs = 1;
    c.head.val_views = ValViews::Mean;
    let run = train_head(&c).expect("mlp");
    assert_eq!(metrics(&run.dir).val_views, "mean");
}

#[test]
fn an_images_views_and_its_duplicates_stay_on_one_side_of_the_split() {
    // 30 images, rows 0..30; rows 3k and 3k+1 are byte-identical copies (one group).
    let labels: Vec<usize> = (0..30).map(|i| (i / 3) % 2).collect();
    let groups: Vec<String> = (0..30)
        .map(|i| {
            if i % 3 == 2 {
                format!("own{i}")
            } else {
                format!("dup{}", i / 3)
            }
        })
        .collect();
    let split = pipeline::data::stratified_split(&labels, Some(&groups), 0.3, 13).expect("split");
    let views = 3;
    let (train_rows, val_rows) = view_rows(&split.train, split.val.clone(), 30, views);
    // Every view of every training image trains, nothing else does.
    assert_eq!(train_rows.len(), views * split.train.len());
    let train_images: std::collections::BTreeSet<usize> =
        train_rows.iter().map(|r| r % 30).collect();
    let val_images: std::collections::BTreeSet<usize> = val_rows.iter().map(|r| r % 30).collect();
    assert!(train_images.is_disjoint(&val_images));
    for &i in &split.train {
        for v in 0..views {
            assert!(train_rows.contains(&(v * 30 + i)), "image {i} view {v}");
        }
    }
    // Validation rows are the original views; copies are on one side with all their views.
    assert!(val_rows.iter().all(|&r| r < 30));
    for k in 0..10 {
        let (a, b) = (3 * k, 3 * k + 1);
        assert_eq!(
            train_images.contains(&a),
            train_images.contains(&b),
            "group {k}"
        );
    }
}

#[test]
fn bad_views_are_errors_naming_the_key_and_the_entry() {
    let dir = testkit::temp_dir("views-config");
    let path = dir.join("p.toml");
    std::fs::write(
        &path,
        "[data]\ncsv = \"l.csv\"\nimages = \"i\"\n[extract]\nviews = [\"original\", \"hflip\"]\n",
    )
    .expect("toml");
    let c = Config::load(&path, &[]).expect("valid");
    assert_eq!(c.extract.views, s(&["original", "hflip"]));
    assert_eq!(
        Config::load(&path, &[]).expect("valid").head.val_views,
        ValViews::Original
    );
    for (set, needle) in [
        ("extract.views=[\"original\", \"vflip\"]", "vflip"),
        ("extract.views=[\"hflip\"]", "must include \"original\""),
        (
            "extract.views=[\"original\", \"crop:tl\", \"crop:tl\"]",
            "listed twice",
        ),
        ("head.val_views=\"median\"", "median"),
    ] {
        let err = Config::load(&path, &[set.to_string()])
            .expect_err(set)
            .to_string();
        let key = set.split('=').next().unwrap_or_default();
        assert!(err.contains(key) && err.contains(needle), "{set}: {err}");
    }
}

#[test]
fn the_real_study_images_with_hflip_train_and_predict() {
    let Some(shared) = testkit::shared_dir("the_real_study_images_with_hflip_train_and_predict")
    else {
        return;
    };
    let dir = testkit::temp_dir("views-real");
    let data = shared.join("data/emergency-vehicles");
    let mut c = Config::default();
    c.data.csv = Some(data.join("train.csv"));
    c.data.images = Some(data.join("images"));
    c.data.image_column = "image_names".into();
    c.data.label_column = "emergency_or_not".into();
    c.data.limit = Some(16);
    c.backbone.weights = pipeline::WeightsSource::Local(
        shared.join("weights/vgg16-oxford-imagenet-features.safetensors"),
    );
    c.extract.batch_size = 8;
    c.extract.device = pipeline::device::DeviceChoice::Cpu;
    c.extract.out = dir.join("features");
    c.extract.views = s(&["original", "hflip"]);
    c.split.val_fraction = 0.25;
    c.head.kind = HeadKind::Logistic;
    c.head.scaling = pipeline::models::Scaling::L2;
    c.head.c = vec![1.0, 100.0];
    c.head.cv_folds = 2;
    c.head.val_views = ValViews::Mean;
    c.output.runs = dir.join("runs");
    let summary = extract(&c);
    assert_eq!((summary.computed, summary.rows), (32, 16), "{summary}");
    let run = train_head(&c).expect("train-head");
    let m = metrics(&run.dir);
    assert_eq!((m.views.len(), m.val_views.as_str()), (2, "mean"));
    assert!((0.0..=1.0).contains(&m.val_accuracy));
    // Predict three of the study's test images with test-time augmentation.
    let test: Vec<String> = std::fs::read_to_string(data.join("test.csv"))
        .expect("test.csv")
        .lines()
        .skip(1)
        .take(3)
        .map(|l| l.split(',').next().unwrap_or_default().trim().to_string())
        .collect();
    std::fs::write(
        dir.join("test.csv"),
        format!("image_names\n{}\n", test.join("\n")),
    )
    .expect("csv");
    c.predict.input = Some(dir.join("test.csv"));
    c.predict.output = Some(dir.join("predictions.csv"));
    c.predict.run = Some(run.dir.clone());
    let p = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!((p.images, p.computed), (3, 6), "{p}");
    let csv = std::fs::read_to_string(dir.join("predictions.csv")).expect("out");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    for l in &lines[1..] {
        let cells: Vec<&str> = l.split(',').collect();
        let total: f32 = cells[2..]
            .iter()
            .map(|v| v.parse::<f32>().expect("p"))
            .sum();
        assert!((total - 1.0).abs() < 1e-4, "{l}");
    }
    // Again: everything comes from the store now.
    let again = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!((again.computed, again.from_store), (0, 6), "{again}");
}

#[test]
fn sharded_parts_with_views_add_up_to_the_unsharded_store_and_skip_bad_images_once() {
    let (dir, mut c) = fixture("views-shard", 9);
    c.extract.views = s(&["original", "hflip"]);
    c.data.on_bad_image = pipeline::config::OnBadImage::Skip;
    std::fs::write(dir.join("images/img004.png"), "not a png").expect("garbage");
    let only_store = |out: &Path| -> std::collections::BTreeMap<String, Vec<u8>> {
        files(out)
            .into_iter()
            .filter(|(name, _)| !name.starts_with("parts/"))
            .collect()
    };
    let mut reference = c.clone();
    reference.extract.out = dir.join("reference");
    let whole = extract(&reference);
    assert_eq!((whole.computed, whole.skipped), (16, 1), "{whole}");
    c.extract.out = dir.join("parts");
    let mut last = None;
    for k in 0..3 {
        let mut part = c.clone();
        part.extract.shard = Some(format!("{k}/3"));
        last = Some(extract(&part));
    }
    assert!(last.and_then(|s| s.part).is_some_and(|p| p.union));
    assert_eq!(
        only_store(&c.extract.out),
        only_store(&reference.extract.out),
        "the union of the parts is the unsharded store, view rows included"
    );
    let set = load(&c).expect("load");
    assert_eq!((set.rows.len(), set.features.dims()[0]), (8, 16));
}
