//! The README's quick start on a fresh clone: the committed `pipeline.toml`, no `../shared`,
//! nothing downloaded by hand. A server on 127.0.0.1 stands in for the internet (GitHub's
//! archive of the study's data, in miniature, and the Hugging Face hub with random VGG16
//! weights). `extract` runs as the binary; the following steps run in-process through the same
//! library calls their binaries make (a test can only start its own package's binaries).
//!
//! One test in this file, so setting the process environment (HF_HOME, the cache) is safe.

use std::path::Path;
use std::process::{Command, Output};

use pipeline::config::{Config, LAYER_VAR};
use testkit::archive::{content_digest, sha256_hex, study_entries, zip_bytes, STUDY_TOP};
use testkit::http::{Route, Server};

const REPO: &str = "test-org/vgg16-random";

fn extract(dir: &Path, endpoint: &str, sets: &[String]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_extract"));
    // `cargo run --release -p extract` in the clone: ./pipeline.toml, no --config.
    cmd.current_dir(dir).env("HF_ENDPOINT", endpoint);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().expect("run extract")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn fresh_clone_runs_the_study_with_data_and_weights_fetched_on_first_use() {
    let dir = testkit::temp_dir("fresh-clone");
    let committed = testkit::workspace_root().join("pipeline.toml");
    std::fs::copy(&committed, dir.join("pipeline.toml")).expect("copy pipeline.toml");
    assert!(
        !dir.join("../shared").exists(),
        "no ../shared beside the clone"
    );
    // A fresh machine: the caches are empty folders of this test, no offline layer.
    std::env::set_var("HF_HOME", dir.join("hf"));
    std::env::set_var("PIPELINE_CACHE_DIR", dir.join("cache"));
    std::env::remove_var(LAYER_VAR);
    std::env::remove_var("HF_ENDPOINT");

    let entries = study_entries(20, 4);
    let digest = content_digest(&entries, STUDY_TOP);
    let weights_file = dir.join("served.safetensors");
    testkit::write_vgg_weights(&weights_file, |_, _| None);
    let weights = std::fs::read(&weights_file).expect("weights");
    let server = Server::start();
    server.route("/archive/study.zip", Route::file(zip_bytes(&entries)));
    let etag = sha256_hex(&weights);
    server.hub_file(REPO, "model.safetensors", weights, &etag);
    // The committed config names GitHub and timm's weights; the stand-ins differ in URL,
    // digest and repo (the pinned SHA-256 of timm's file would refuse random weights).
    let sets = vec![
        format!("data.source={}", server.url("/archive/study.zip")),
        format!("data.source_digest={digest}"),
        format!("backbone.weights=hf:{REPO}"),
        "preprocess.input_size=32".to_string(),
    ];

    let o = extract(&dir, &server.endpoint(), &sets);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("20 images"), "{}", text(&o));
    assert_eq!(server.requests("/archive/study.zip").len(), 1);
    drop(server);

    // Second run: everything comes from the caches; there is no server any more.
    let o = extract(&dir, "http://127.0.0.1:9", &sets);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("up to date"), "{}", text(&o));

    // `cargo run --release -p train-head`, then the baseline and prediction on the test images.
    let config = Config::load(&dir.join("pipeline.toml"), &sets).expect("config");
    let head = pipeline::training::study::train_head(&config).expect("train-head");
    assert!(head.dir.join("metrics.json").is_file());
    let mut quick = sets.clone();
    quick.extend(["cnn.epochs=1".to_string(), "cnn.input_size=32".to_string()]);
    let config_cnn = Config::load(&dir.join("pipeline.toml"), &quick).expect("config");
    pipeline::training::study::train_cnn(&config_cnn).expect("train-cnn");
    pipeline::inference::predict::run(&config).expect("predict");
    let predictions = std::fs::read_to_string(dir.join("predictions.csv")).expect("csv");
    assert_eq!(predictions.lines().count(), 1 + 4, "{predictions}");
    assert!(predictions.contains("t003.jpg"), "{predictions}");
}
