//! `evaluate` as a user runs it: a pipeline.toml trained on `tree/train`, then
//! `evaluate --set evaluate.root=tree/val`, with the results in the default `evaluation/`
//! folder beside the config; the exit code and message of a config naming no dataset and of a
//! dataset with a class the run does not know.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pipeline::config::Config;

fn evaluate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .current_dir("/")
        .args(args)
        .output()
        .expect("run evaluate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A 40x30 PNG coloured by class.
fn png(path: &Path, class: usize, i: u32) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    image::RgbImage::from_fn(40, 30, |x, y| {
        let c = (i * 9 + x + y) as u8;
        if class == 0 {
            image::Rgb([220, c, 30])
        } else {
            image::Rgb([30, c, 220])
        }
    })
    .save(path)
    .expect("png");
}

/// A class-folder tree (`tree/train`, `tree/val` with a nested folder), random weights, and a
/// pipeline.toml on `tree/train`; extraction and a head run done. Returns (dir, config file).
fn trained(test: &str) -> (PathBuf, PathBuf) {
    let dir = testkit::temp_dir(test);
    for i in 0..4 {
        png(&dir.join(format!("tree/train/ambulance/a{i}.png")), 0, i);
        png(&dir.join(format!("tree/train/car/c{i}.png")), 1, i);
    }
    png(&dir.join("tree/val/ambulance/v0.png"), 0, 10);
    png(&dir.join("tree/val/car/v1.png"), 1, 11);
    png(&dir.join("tree/val/car/more/v2.png"), 1, 12);
    testkit::write_vgg_weights(&dir.join("w.safetensors"), |_, _| None);
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        "[data]\nroot = \"tree/train\"\n[backbone]\nweights = \"w.safetensors\"\n\
         [preprocess]\ninput_size = 32\n[extract]\nbatch_size = 4\ndevice = \"cpu\"\n\
         [split]\nval_fraction = 0.25\n[head]\nepochs = 2\nbatch_size = 4\n",
    )
    .expect("config");
    let c = Config::load(&config, &[]).expect("config");
    pipeline::features::extract::run(&c).expect("extract");
    pipeline::training::study::train_head(&c).expect("train-head");
    (dir, config)
}

#[test]
fn evaluate_prints_the_numbers_and_writes_them_beside_the_config() {
    let (dir, config) = trained("evaluate-cli");
    let config = config.display().to_string();
    let out = evaluate(&["--config", &config, "--set", "evaluate.root=tree/val"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("evaluate: 3 images of")
            && stdout.contains("accuracy ")
            && stdout.contains("macro F1")
            && stdout.contains("confusion matrix"),
        "{stdout}"
    );
    let results = dir.join("evaluation");
    for f in [
        "predictions.csv",
        "metrics.json",
        "per_class.csv",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "report.md",
    ] {
        assert!(
            results.join(f).is_file(),
            "{f} missing in {}",
            results.display()
        );
    }
    let predictions = std::fs::read_to_string(results.join("predictions.csv")).expect("csv");
    assert!(predictions.contains("\ncar/more/v2.png,"), "{predictions}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("metrics.json")).expect("json"))
            .expect("metrics.json");
    assert_eq!(json["images"], 3);
    // The printed accuracy is the written one.
    let accuracy = json["accuracy"].as_f64().expect("accuracy");
    assert!(
        stdout.contains(&format!("accuracy {:.2}%", 100.0 * accuracy)),
        "{stdout}"
    );
}

#[test]
fn bad_requests_exit_non_zero_with_a_message_naming_the_cause() {
    let (dir, config) = trained("evaluate-cli-bad");
    let config = config.display().to_string();
    // No dataset to score.
    let out = evaluate(&["--config", &config]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("evaluate: error: config key `evaluate`")
            && stderr.contains("evaluate.root"),
        "{stderr}"
    );
    // A class the run has never seen.
    png(&dir.join("tree/other/lorry/x.png"), 1, 20);
    png(&dir.join("tree/other/car/y.png"), 1, 21);
    let out = evaluate(&["--config", &config, "--set", "evaluate.root=tree/other"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("`lorry`") && stderr.contains("tree/other/lorry"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // An unknown flag.
    let out = evaluate(&["--bogus"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--bogus: unknown argument"),
        "{}",
        text(&out.stderr)
    );
    // --help.
    let out = evaluate(&["--help"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("evaluate: score a trained head"));
}
