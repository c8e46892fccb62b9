//! The `extract` binary as a user runs it: exit codes and messages for bad input, and a cache
//! that ends complete and correct after the process is killed at arbitrary moments.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pipeline::FeatureStore;

fn extract(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_extract"))
        .args(args)
        .output()
        .expect("run extract")
}

/// A generated dataset, random weights and a pipeline.toml using them (64x64 input, batch 2).
fn setup(test: &str, n: usize) -> (PathBuf, PathBuf) {
    let dir = testkit::temp_dir(test);
    testkit::write_dataset(&dir, n);
    testkit::write_vgg_weights(&dir.join("w.safetensors"), |_, _| None);
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        "[data]\ncsv = \"labels.csv\"\nimages = \"images\"\nimage_column = \"file\"\n\
         label_column = \"class\"\n[backbone]\nweights = \"w.safetensors\"\n\
         [preprocess]\ninput_size = 64\n[extract]\nbatch_size = 2\ndevice = \"cpu\"\n",
    )
    .expect("config");
    (dir, config)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unknown_config_key_exits_non_zero_naming_the_key() {
    let (_dir, config) = setup("cli-unknown-key", 2);
    let c = config.to_str().expect("utf8");
    let o = extract(&["--config", c, "--set", "extract.batchsize=4"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("extract.batchsize"), "{}", stderr(&o));
    let o = extract(&["--config", "/nonexistent/pipeline.toml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/pipeline.toml"),
        "{}",
        stderr(&o)
    );
    let o = extract(&["--bogus"]);
    assert!(!o.status.success());
    let o = extract(&["--help"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--set"));
}

#[test]
fn relative_paths_resolve_against_the_config_and_summary_is_printed() {
    let (dir, config) = setup("cli-summary", 3);
    let o = extract(&["--config", config.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("3 images") && out.contains("images/s") && out.contains("cpu"),
        "{out}"
    );
    assert!(dir.join("features/manifest.json").exists());
    let again = extract(&["--config", config.to_str().expect("utf8")]);
    assert!(stderr(&again).contains("up to date"), "{}", stderr(&again));
}

fn load(out: &Path) -> (Vec<Vec<f32>>, Vec<usize>) {
    let set = FeatureStore::new(out).load().expect("complete cache");
    (set.features.to_vec2().expect("f32"), set.rows)
}

#[test]
fn killed_at_any_moment_then_rerun_gives_the_complete_correct_cache() {
    let (dir, config) = setup("cli-kill", 24);
    let c = config.to_str().expect("utf8");
    let reference = dir.join("reference");
    let set_ref = format!("extract.out={}", reference.display());
    let o = extract(&["--config", c, "--set", &set_ref]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = load(&reference);
    let out = dir.join("killed");
    let set_out = format!("extract.out={}", out.display());
    for delay_ms in [30, 120, 250, 400, 600, 900, 1300] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_extract"))
            .args(["--config", c, "--set", &set_out])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL: no chance to clean up
        let _ = child.wait();
    }
    let o = extract(&["--config", c, "--set", &set_out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(load(&out), expected);
}
