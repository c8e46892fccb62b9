//! Training and the verdict, end to end on a generated dataset (random VGG16 weights at 32x32,
//! a tiny CNN): run directories and their files, `metrics.json`'s fixed keys, the report,
//! determinism, prediction, and the bad inputs the training issue names.

use crate::common::fixture;
use pipeline::config::Config;
use pipeline::reporting::{confusion_matrix_size, LINE_CHART_HEIGHT, LINE_CHART_WIDTH};
use pipeline::training::study::{train_cnn, train_head, RunMetrics};

/// A fixture with extraction done and short training settings.
fn trained_setup(test: &str, n: usize) -> (std::path::PathBuf, Config) {
    let (dir, mut c) = fixture(test, n);
    c.split.val_fraction = 0.25;
    c.head.train.epochs = 3;
    c.head.train.batch_size = 4;
    c.cnn.train.epochs = 2;
    c.cnn.train.batch_size = 4;
    c.cnn.channels = vec![2, 2];
    c.cnn.input_size = 16;
    c.output.runs = dir.join("runs");
    pipeline::features::extract::run(&c).expect("extract");
    (dir, c)
}

fn metrics(run: &std::path::Path) -> (RunMetrics, serde_json::Value) {
    let text = std::fs::read_to_string(run.join("metrics.json")).expect("metrics.json");
    (
        serde_json::from_str(&text).expect("RunMetrics"),
        serde_json::from_str(&text).expect("json"),
    )
}

#[test]
fn head_and_cnn_runs_write_everything_and_the_report_compares_them() {
    let (_dir, c) = trained_setup("study-e2e", 16);
    let cnn = train_cnn(&c).expect("train-cnn");
    let head = train_head(&c).expect("train-head");
    for (run, weights, model) in [
        (&cnn.dir, "cnn.safetensors", "cnn"),
        (&head.dir, "head.safetensors", "head"),
    ] {
        for f in [
            "config.toml",
            "metrics.json",
            weights,
            "loss.png",
            "accuracy.png",
            "confusion_matrix.png",
            "report.md",
        ] {
            assert!(run.join(f).is_file(), "{} lacks {f}", run.display());
        }
        // The charts decode as PNGs of the documented sizes.
        for (chart, size) in [
            ("loss.png", (LINE_CHART_WIDTH, LINE_CHART_HEIGHT)),
            ("accuracy.png", (LINE_CHART_WIDTH, LINE_CHART_HEIGHT)),
            ("confusion_matrix.png", confusion_matrix_size(2)),
        ] {
            let img = image::open(run.join(chart))
                .unwrap_or_else(|e| panic!("{} {chart}: {e}", run.display()));
            assert_eq!((img.width(), img.height()), size, "{chart}");
        }
        let (m, json) = metrics(run);
        for key in [
            "model",
            "train_accuracy",
            "val_accuracy",
            "history",
            "confusion_matrix",
            "classes",
        ] {
            assert!(json.get(key).is_some(), "metrics.json lacks `{key}`");
        }
        assert_eq!(json["model"], model);
        assert_eq!(m.classes, vec!["ambulance", "car"]);
        let val_total: usize = m.confusion_matrix.iter().flatten().sum();
        // Per class: round(6 x 0.25) = 2 ambulances, round(10 x 0.25) = 3 cars.
        assert_eq!(val_total, 5);
        assert_eq!(m.split.split.val.len(), 5);
        assert!((0.0..=1.0).contains(&m.val_accuracy));
        assert_eq!(m.status, pipeline::reporting::runs::RunStatus::Finished);
        assert_eq!(json["status"], "finished");
    }
    assert_eq!(metrics(&head.dir).0.history.len(), 3);
    assert_eq!(metrics(&cnn.dir).0.history.len(), 2);
    // Both models used the very same split.
    assert_eq!(
        metrics(&head.dir).0.split.fingerprint,
        metrics(&cnn.dir).0.split.fingerprint
    );
    let report = std::fs::read_to_string(head.dir.join("report.md")).expect("report");
    assert!(
        report.contains("CNN baseline") && report.contains("VGG16 + linear head"),
        "{report}"
    );
    assert!(report.contains("Winner"), "{report}");
    assert!(head.table.contains("CNN baseline"), "{}", head.table);
}

#[test]
fn same_config_and_seed_give_the_same_numbers() {
    let (_dir, c) = trained_setup("study-determinism", 12);
    let a = train_head(&c).expect("first");
    let b = train_head(&c).expect("second");
    assert_eq!(
        metrics(&a.dir)
            .0
            .history
            .iter()
            .map(|r| r.train_loss)
            .collect::<Vec<_>>(),
        metrics(&b.dir)
            .0
            .history
            .iter()
            .map(|r| r.train_loss)
            .collect::<Vec<_>>()
    );
    let weights = |d: &std::path::Path| -> Vec<(String, Vec<f32>)> {
        let mut t: Vec<_> =
            candle_core::safetensors::load(d.join("head.safetensors"), &candle_core::Device::Cpu)
                .expect("head weights")
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        v.flatten_all()
                            .expect("flat")
                            .to_vec1::<f32>()
                            .expect("f32"),
                    )
                })
                .collect();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    assert_eq!(
        weights(&a.dir),
        weights(&b.dir),
        "identical trained weights"
    );
    let x = train_cnn(&c).expect("cnn first");
    let y = train_cnn(&c).expect("cnn second");
    let losses = |d: &std::path::Path| {
        metrics(d)
            .0
            .history
            .iter()
            .map(|r| (r.train_loss, r.val_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&x.dir), losses(&y.dir));
}

#[test]
fn predict_writes_labels_and_probabilities_in_the_training_format() {
    let (dir, mut c) = trained_setup("study-predict", 12);
    train_head(&c).expect("train-head");
    // A CSV of names resolved against [data] images, and a folder.
    std::fs::write(dir.join("new.csv"), "file\nimg001.png\nimg005.png\n").expect("csv");
    c.predict.input = Some(dir.join("new.csv"));
    c.predict.output = Some(dir.join("out.csv"));
    let s = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!(s.images, 2);
    let out = std::fs::read_to_string(dir.join("out.csv")).expect("out");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "file,class,prob_ambulance,prob_car");
    assert_eq!(lines.len(), 3);
    for line in &lines[1..] {
        let cells: Vec<&str> = line.split(',').collect();
        assert!(["ambulance", "car"].contains(&cells[1]), "{line}");
        let p: f64 = cells[2..]
            .iter()
            .map(|v| v.parse::<f64>().expect("prob"))
            .sum();
        assert!((p - 1.0).abs() < 1e-4, "{line}");
    }
    assert!(lines[1].starts_with("img001.png,"));
    c.predict.input = Some(dir.join("images"));
    assert_eq!(
        pipeline::inference::predict::run(&c)
            .expect("folder")
            .images,
        12
    );
}

#[test]
fn missing_cache_says_which_command_to_run() {
    let (_dir, mut c) = fixture("study-no-cache", 6);
    c.extract.out = c.extract.out.join("nothing-here");
    let err = train_head(&c).err().expect("no cache").to_string();
    assert!(err.contains("cargo run -p extract"), "{err}");
}

#[test]
fn cache_from_other_inputs_is_refused() {
    let (dir, mut c) = trained_setup("study-stale", 8);
    c.preprocess.mean = Some([1.0, 2.0, 3.0]);
    let err = train_head(&c).err().expect("stale cache").to_string();
    assert!(
        err.contains("preprocessing") && err.contains("cargo run -p extract"),
        "{err}"
    );
    c.preprocess.mean = None;
    image::RgbImage::from_pixel(40, 30, image::Rgb([9, 9, 9]))
        .save(dir.join("images/img000.png"))
        .expect("png");
    let err = train_head(&c).err().expect("changed dataset").to_string();
    assert!(err.contains("dataset"), "{err}");
}

#[test]
fn nan_loss_stops_with_a_clear_message() {
    // The fixture's folder name holds neither "nan" nor "diverged", so the words below can only
    // come from the message.
    let (_dir, mut c) = trained_setup("study-diverge", 8);
    c.head.train.lr = 1e38;
    c.head.train.epochs = 5;
    let err = train_head(&c).err().expect("diverges");
    assert!(
        matches!(err, pipeline::Error::Diverged { epoch: 1, .. }),
        "{err:?}"
    );
    // Words of the message itself, not of the fixture's folder name.
    let text = err.to_string();
    assert!(
        text.contains("diverged") && text.contains("lower learning rate"),
        "{text}"
    );
}
