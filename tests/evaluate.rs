//! `evaluate` end to end: a head trained on a class-folder tree's `train/` scores its `val/`
//! (sub-folders included), and a head trained on a subset of the study's CSV scores a held-out
//! CSV of the study; every number is checked against a count made here from the predictions
//! CSV and the true labels, not by the library's metrics code. Labels the run does not know are
//! an error naming them; `predict` labels a nested folder with a config that has no `[data]`.
//!
//! Fixture folders are named so that no word an assertion looks for in a message can come from
//! the folder's own path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pipeline::config::Config;
use pipeline::device::DeviceChoice;
use pipeline::inference::evaluate;
use pipeline::training::study::train_head;
use pipeline::{Error, WeightsSource};

use crate::common::random_weights;

/// A 40x30 PNG whose colour says its class (red-ish for 0, blue-ish for 1), varied by `i`.
fn write_image(path: &Path, class: usize, i: usize) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let base: [u32; 3] = if class == 0 {
        [200, 40, 30]
    } else {
        [30, 60, 200]
    };
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([
            ((base[0] + x * 3 + (i as u32) * 5) % 256) as u8,
            ((base[1] + y * 2 + (i as u32) * 3) % 256) as u8,
            ((base[2] + (x + y) + (i as u32) * 7) % 256) as u8,
        ])
    });
    img.save(path).expect("png");
}

/// `root/<class>/...` images: (path below root, class index) for each.
fn write_tree(root: &Path, files: &[(&str, usize)]) {
    for (i, (rel, class)) in files.iter().enumerate() {
        write_image(&root.join(rel), *class, i);
    }
}

/// A config on random VGG16 weights at 32x32, CPU, short head training on standardised
/// features; the store and runs in `dir`.
fn config_in(dir: &Path) -> Config {
    let mut c = Config::default();
    c.backbone.weights = WeightsSource::Local(random_weights().to_path_buf());
    c.preprocess.input_size = Some(32);
    c.extract.batch_size = 4;
    c.extract.device = DeviceChoice::Cpu;
    c.extract.out = dir.join("features");
    c.output.runs = dir.join("runs");
    c.split.val_fraction = 0.25;
    // Random weights give small, similar features: standardised, a few quick epochs separate
    // the two colours.
    c.head.scaling = pipeline::models::Scaling::Standardize;
    c.head.train.lr = 0.01;
    c.head.train.epochs = 8;
    c.head.train.batch_size = 4;
    c
}

/// The cells of a CSV written without quoted cells: header, rows.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines().map(|l| {
        assert!(!l.contains('"'), "unexpected quoting: {l}");
        l.split(',').map(str::to_string).collect::<Vec<_>>()
    });
    let header = lines.next().expect("header");
    (header, lines.collect())
}

/// What a count by hand gives for (true, predicted) class names over `classes`.
#[derive(Debug)]
struct HandCount {
    accuracy: f64,
    /// Per class: precision, recall, F1 (0 where a denominator is 0), support.
    per_class: Vec<(f64, f64, f64, usize)>,
    /// `[true][predicted]`.
    matrix: Vec<Vec<usize>>,
}

fn hand_count(classes: &[&str], pairs: &[(String, String)]) -> HandCount {
    let index = |name: &str| {
        classes
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("`{name}` is not a class"))
    };
    let n = classes.len();
    let mut matrix = vec![vec![0usize; n]; n];
    for (t, p) in pairs {
        matrix[index(t)][index(p)] += 1;
    }
    let correct = pairs.iter().filter(|(t, p)| t == p).count();
    let per_class = (0..n)
        .map(|c| {
            let tp = matrix[c][c] as f64;
            let predicted: usize = (0..n).map(|t| matrix[t][c]).sum();
            let support: usize = matrix[c].iter().sum();
            let precision = if predicted == 0 {
                0.0
            } else {
                tp / predicted as f64
            };
            let recall = if support == 0 {
                0.0
            } else {
                tp / support as f64
            };
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            (precision, recall, f1, support)
        })
        .collect();
    HandCount {
        accuracy: correct as f64 / pairs.len() as f64,
        per_class,
        matrix,
    }
}

/// Checks every file of an evaluation in `out` against a count made from its predictions CSV
/// and `truth` (image id -> true class name). Returns the count.
fn check_against_hand_count(
    out: &Path,
    classes: &[&str],
    image_column: &str,
    label_column: &str,
    truth: &BTreeMap<String, String>,
) -> HandCount {
    let (header, rows) = read_csv(&out.join("predictions.csv"));
    let mut want_header = vec![
        image_column.to_string(),
        label_column.to_string(),
        format!("true_{label_column}"),
    ];
    want_header.extend(classes.iter().map(|c| format!("prob_{c}")));
    assert_eq!(header, want_header);
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    let mut expected_ids: Vec<&str> = truth.keys().map(String::as_str).collect();
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    expected_ids.sort();
    assert_eq!(sorted_ids, expected_ids, "every image scored once");
    let mut pairs = Vec::new();
    for r in &rows {
        let probs: Vec<f64> = r[3..]
            .iter()
            .map(|p| p.parse().expect("probability"))
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{r:?}");
        // The predicted label is the most probable class.
        let best = (0..probs.len()).fold(0, |b, i| if probs[i] > probs[b] { i } else { b });
        assert_eq!(r[1], classes[best], "{r:?}");
        assert_eq!(&r[2], &truth[&r[0]], "the true label of {}", r[0]);
        pairs.push((truth[&r[0]].clone(), r[1].clone()));
    }
    let count = hand_count(classes, &pairs);
    eprintln!("hand count: {count:?}");

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("metrics.json")).expect("metrics.json"),
    )
    .expect("json");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert_eq!(json["images"], rows.len());
    assert_eq!(json["classes"], serde_json::json!(classes));
    assert!(
        close(json["accuracy"].as_f64().expect("accuracy"), count.accuracy),
        "{json}"
    );
    assert_eq!(json["confusion_matrix"], serde_json::json!(count.matrix));
    for (c, (p, r, f1, support)) in count.per_class.iter().enumerate() {
        let got = &json["per_class"][c];
        assert!(
            close(got["precision"].as_f64().expect("p"), *p),
            "{c}: {got}"
        );
        assert!(close(got["recall"].as_f64().expect("r"), *r), "{c}: {got}");
        assert!(close(got["f1"].as_f64().expect("f1"), *f1), "{c}: {got}");
        assert_eq!(got["support"], *support);
    }
    let macro_f1 = count.per_class.iter().map(|c| c.2).sum::<f64>() / classes.len() as f64;
    assert!(
        close(json["macro_f1"].as_f64().expect("macro"), macro_f1),
        "{json}"
    );

    let (header, per_class) = read_csv(&out.join("per_class.csv"));
    assert_eq!(header, ["class", "precision", "recall", "f1", "support"]);
    for ((row, (p, r, f1, support)), class) in per_class.iter().zip(&count.per_class).zip(classes) {
        assert_eq!(row[0], *class);
        assert_eq!(
            row[1..4],
            [format!("{p:.6}"), format!("{r:.6}"), format!("{f1:.6}")]
        );
        assert_eq!(row[4], support.to_string());
    }
    let (header, matrix) = read_csv(&out.join("confusion_matrix.csv"));
    let mut want = vec!["true".to_string()];
    want.extend(classes.iter().map(|c| format!("pred_{c}")));
    assert_eq!(header, want);
    for (row, (class, counts)) in matrix.iter().zip(classes.iter().zip(&count.matrix)) {
        assert_eq!(row[0], *class);
        let cells: Vec<usize> = row[1..].iter().map(|v| v.parse().expect("count")).collect();
        assert_eq!(&cells, counts);
    }
    let png = image::open(out.join("confusion_matrix.png")).expect("png");
    assert_eq!(
        (png.width(), png.height()),
        pipeline::reporting::confusion_matrix_size(classes.len())
    );
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    assert!(
        report.contains(&format!("accuracy {:.2}%", 100.0 * count.accuracy)),
        "{report}"
    );
    count
}

/// The class-folder layout with a `val/` folder: train on `train/`, evaluate on `val/`, whose
/// images sit in sub-folders too.
#[test]
fn evaluate_scores_a_val_folder_against_a_hand_count() {
    let dir = testkit::temp_dir("score-tree");
    let tree = dir.join("tree");
    let mut train = Vec::new();
    for i in 0..8 {
        train.push((format!("ambulance/a{i}.png"), 0));
        train.push((format!("car/c{i}.png"), 1));
    }
    let train: Vec<(&str, usize)> = train.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    write_tree(&tree.join("train"), &train);
    // (path, true class); the last two look like the other class, so the head gets them
    // wrong and the matrix has an error on each side.
    let val = [
        ("ambulance/v0.png", 0),
        ("ambulance/night/v1.png", 0),
        ("ambulance/night/late/v2.png", 0),
        ("car/v3.png", 1),
        ("car/v4.png", 1),
        ("car/2024/v5.png", 1),
        ("car/2024/v6.png", 1),
        ("ambulance/night/blue.png", 0),
        ("car/red.png", 1),
    ];
    let look = |path: &str, class: usize| match path {
        "ambulance/night/blue.png" | "car/red.png" => 1 - class,
        _ => class,
    };
    let painted: Vec<(&str, usize)> = val.iter().map(|&(p, c)| (p, look(p, c))).collect();
    write_tree(&tree.join("val"), &painted);
    let mut c = config_in(&dir);
    c.data.root = Some(tree.join("train"));
    pipeline::features::extract::run(&c).expect("extract");
    let trained = train_head(&c).expect("train-head");
    c.evaluate.root = Some(tree.join("val"));
    c.evaluate.output = dir.join("results");
    c.validate().expect("valid");
    let summary = evaluate::run(&c).expect("evaluate");
    assert_eq!(summary.evaluation.run, trained.dir);
    assert_eq!(summary.evaluation.images, val.len());
    assert!(summary.evaluation.skipped.is_empty());
    let classes = ["ambulance", "car"];
    let truth: BTreeMap<String, String> = val
        .iter()
        .map(|(p, class)| (p.to_string(), classes[*class].to_string()))
        .collect();
    let count = check_against_hand_count(&dir.join("results"), &classes, "image", "label", &truth);
    // The colours are easy to tell apart, the two odd images are not what they look like:
    // numbers that a constant guess or swapped rows and columns would not give.
    assert_eq!(count.matrix, [[3, 1], [1, 4]], "{count:?}");
    // The printed summary carries the numbers and the matrix.
    let text = summary.to_string();
    assert!(
        text.contains(&format!("accuracy {:.2}%", 100.0 * count.accuracy))
            && text.contains("confusion matrix")
            && text.contains(&dir.join("results").display().to_string()),
        "{text}"
    );
    // A second evaluation reads every feature from the store.
    let again = evaluate::run(&c).expect("again");
    assert_eq!((again.computed, again.from_store), (0, val.len()));
    assert_eq!(again.evaluation.metrics, summary.evaluation.metrics);
}

/// The study's layout: a label CSV of integer labels and one image folder. A head trained on a
/// subset of `train.csv` scores other rows of it, listed in a held-out CSV (some labels written
/// `1.0`: the same class as `1`), its images found through `[data] images`.
#[test]
fn evaluate_scores_a_held_out_csv_of_the_study() {
    let Some(shared) = testkit::shared_dir("evaluate_scores_a_held_out_csv_of_the_study") else {
        return;
    };
    let study = shared.join("data/emergency-vehicles");
    let text = std::fs::read_to_string(study.join("train.csv")).expect("train.csv");
    let mut by_class: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut cells = line.trim_end_matches('\r').split(',');
        let (Some(name), Some(label)) = (cells.next(), cells.next()) else {
            continue;
        };
        by_class
            .entry(label.to_string())
            .or_default()
            .push(name.to_string());
    }
    assert_eq!(by_class.keys().collect::<Vec<_>>(), ["0", "1"]);
    let dir = testkit::temp_dir("score-study");
    let mut train_csv = String::from("image_names,emergency_or_not\n");
    let mut held_csv = String::from("image_names,emergency_or_not\n");
    let mut truth = BTreeMap::new();
    for (label, names) in &by_class {
        for name in &names[..10] {
            train_csv.push_str(&format!("{name},{label}\n"));
        }
        for (i, name) in names[10..14].iter().enumerate() {
            let written = if label == "1" && i % 2 == 0 {
                "1.0"
            } else {
                label.as_str()
            };
            held_csv.push_str(&format!("{name},{written}\n"));
            truth.insert(name.clone(), label.clone());
        }
    }
    std::fs::write(dir.join("subset.csv"), train_csv).expect("csv");
    std::fs::write(dir.join("held-out.csv"), held_csv).expect("csv");
    let mut c = config_in(&dir);
    c.backbone.weights =
        WeightsSource::Local(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"));
    c.preprocess.input_size = Some(64);
    c.data.csv = Some(dir.join("subset.csv"));
    c.data.images = Some(study.join("images"));
    c.data.image_column = "image_names".into();
    c.data.label_column = "emergency_or_not".into();
    pipeline::features::extract::run(&c).expect("extract");
    train_head(&c).expect("train-head");
    c.evaluate.csv = Some(dir.join("held-out.csv"));
    c.evaluate.output = dir.join("results");
    c.validate().expect("valid");
    let summary = evaluate::run(&c).expect("evaluate");
    assert_eq!(summary.evaluation.images, 8);
    assert_eq!(summary.evaluation.dataset, dir.join("held-out.csv"));
    check_against_hand_count(
        &dir.join("results"),
        &["0", "1"],
        "image_names",
        "emergency_or_not",
        &truth,
    );
}

/// A trained run on the tree of [`evaluate_scores_a_val_folder_against_a_hand_count`]'s
/// shape, smaller; returns (dir, config, tree).
fn trained_tree(test: &str) -> (PathBuf, Config, PathBuf) {
    let dir = testkit::temp_dir(test);
    let tree = dir.join("tree");
    let mut files = Vec::new();
    for i in 0..4 {
        files.push((format!("ambulance/a{i}.png"), 0));
        files.push((format!("car/c{i}.png"), 1));
    }
    let files: Vec<(&str, usize)> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    write_tree(&tree.join("train"), &files);
    let mut c = config_in(&dir);
    c.head.train.epochs = 2;
    c.data.root = Some(tree.join("train"));
    pipeline::features::extract::run(&c).expect("extract");
    train_head(&c).expect("train-head");
    (dir, c, tree)
}

#[test]
fn labels_the_run_does_not_know_are_an_error_naming_them() {
    let (dir, mut c, tree) = trained_tree("score-strangers");
    // A class folder the run was not trained on (and an empty one, which labels nothing).
    write_tree(
        &tree.join("val"),
        &[
            ("car/v0.png", 1),
            ("truck/t0.png", 1),
            ("truck/deep/t1.png", 0),
        ],
    );
    std::fs::create_dir_all(tree.join("val/bicycle")).expect("mkdir");
    c.evaluate.root = Some(tree.join("val"));
    c.evaluate.output = dir.join("results");
    let err = evaluate::run(&c).expect_err("truck is unknown");
    let text = err.to_string();
    assert!(
        matches!(&err, Error::UnknownClasses { unknown, .. } if unknown.len() == 1),
        "{err:?}"
    );
    assert!(
        text.contains("`truck`")
            && text.contains(&tree.join("val/truck").display().to_string())
            && text.contains("[ambulance, car]")
            && !text.contains("bicycle"),
        "{text}"
    );
    assert!(!dir.join("results").exists(), "nothing is written");

    // In a CSV: every unknown label, with its lines.
    std::fs::write(
        dir.join("held.csv"),
        "image,label\ncar/c0.png,car\ncar/c1.png,bus\nambulance/a0.png,Ambulance\ncar/c2.png,bus\n",
    )
    .expect("csv");
    c.evaluate.root = None;
    c.evaluate.csv = Some(dir.join("held.csv"));
    c.evaluate.images = Some(tree.join("train"));
    let err = evaluate::run(&c).expect_err("bus is unknown").to_string();
    assert!(
        err.contains("`Ambulance` (line 4)") && err.contains("`bus` (lines 3, 5)"),
        "{err}"
    );
    assert!(err.contains("held.csv"), "{err}");
}

/// `predict` on a folder tree with a config that has no `[data]` at all: every image below
/// the folder, known by its path below it.
#[test]
fn predict_labels_a_nested_folder_without_any_dataset_config() {
    let (dir, _, _) = trained_tree("label-nested");
    let new = dir.join("incoming");
    write_tree(
        &new,
        &[
            ("x.png", 0),
            ("day/y.png", 1),
            ("day/late/z.png", 0),
            (".hidden/w.png", 1),
        ],
    );
    let config = dir.join("predict.toml");
    std::fs::write(
        &config,
        format!(
            "[backbone]\nweights = \"{}\"\n[extract]\ndevice = \"cpu\"\nbatch_size = 2\n\
             [output]\nruns = \"runs\"\n[predict]\ninput = \"incoming\"\noutput = \"labels.csv\"\n",
            random_weights().display()
        ),
    )
    .expect("config");
    let c = Config::load(&config, &[]).expect("no [data] needed for predict");
    assert!(c.data.csv.is_none() && c.data.images.is_none() && c.data.root.is_none());
    let s = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!(s.images, 3);
    let out = std::fs::read_to_string(dir.join("labels.csv")).expect("labels.csv");
    let lines: Vec<&str> = out.lines().collect();
    // The image column is `[data]`'s default; the label column the run's.
    assert_eq!(lines[0], "image,label,prob_ambulance,prob_car");
    let ids: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().expect("id"))
        .collect();
    assert_eq!(ids, ["day/late/z.png", "day/y.png", "x.png"]);
    // Other binaries still need a dataset.
    let err = pipeline::features::extract::run(&c).expect_err("extract needs [data]");
    assert!(err.to_string().contains("`data`"), "{err}");
}
