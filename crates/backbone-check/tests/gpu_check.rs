//! The CPU-side parts of `scripts/gpu_check.sh`, run here with `--device cpu` on the real
//! weights, reference files and study images: every step runs and lands in the table, a failing
//! step says why and lets the rest run, and a missing PyTorch is a skip, not a failure.
//!
//! It needs the workspace's `extract` binary beside `backbone-check` (as `cargo test
//! --workspace` builds them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu_check.sh")
}

fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_backbone-check"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    assert!(
        dir.join("extract").is_file(),
        "{}: no `extract` binary beside backbone-check: run `cargo test --workspace` (or build -p extract)",
        dir.display()
    );
    dir
}

fn gpu_check(test: &str, shared: &Path, computes: &str) -> (Output, String) {
    let out = testkit::temp_dir(test);
    let o = Command::new("bash")
        .arg(script())
        .args(["--bin", bin_dir().to_str().expect("utf8")])
        .args(["--device", "cpu", "--computes", computes])
        .args(["--count", "3", "--batch", "2", "--size", "32"])
        .args(["--python", "/nonexistent/python3"])
        .args(["--weights"])
        .arg(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"))
        .arg("--reference")
        .arg(shared.join("reference"))
        .arg("--data")
        .arg(shared.join("data/emergency-vehicles"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run gpu_check.sh");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    (o, stdout)
}

/// The table's rows as (step, compute, result, images/s, note).
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| step") && !l.starts_with("| ---"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn every_step_runs_on_the_cpu_and_lands_in_one_table() {
    let Some(shared) = testkit::shared_dir("every_step_runs_on_the_cpu_and_lands_in_one_table")
    else {
        return;
    };
    let (o, table) = gpu_check("gpu-check-ok", &shared, "f32 bf16");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{table}\n{stderr}");
    let rows = rows(&table);
    let find = |step: &str, compute: &str| {
        rows.iter()
            .find(|r| r[0] == step && r[1] == compute)
            .unwrap_or_else(|| panic!("no row `{step}` / {compute} in\n{table}"))
    };
    for compute in ["f32", "bf16"] {
        for image in ["chelsea", "coffee"] {
            let r = find(&format!("parity {image}"), compute);
            assert_eq!(r[2], "ok", "{r:?}");
            assert!(r[5].contains("max_rel") && r[5].contains("cosine"), "{r:?}");
        }
        let r = find("forward batch 2", compute);
        assert_eq!(r[2], "ok", "{r:?}");
        assert!(r[3].parse::<f64>().is_ok_and(|v| v > 0.0), "{r:?}");
        let r = find("extract 3 images", compute);
        assert_eq!(r[2], "ok", "{r:?}");
        assert!(r[3].parse::<f64>().is_ok_and(|v| v > 0.0), "{r:?}");
        assert!(r[5].contains("device cpu"), "{r:?}");
    }
    let r = find("pytorch forward", "-");
    assert_eq!(r[2], "skipped", "{r:?}");
    assert!(table.contains("gpu_check: "), "closing line: {table}");
}

#[test]
fn a_failing_step_says_why_and_the_rest_still_run() {
    let Some(shared) = testkit::shared_dir("a_failing_step_says_why_and_the_rest_still_run") else {
        return;
    };
    // f16 is CUDA arithmetic: on the CPU each f16 step fails, with the reason in the table.
    let (o, table) = gpu_check("gpu-check-fail", &shared, "f16 f32");
    assert_eq!(o.status.code(), Some(1), "{table}");
    let rows = rows(&table);
    let f16: Vec<_> = rows.iter().filter(|r| r[1] == "f16").collect();
    assert_eq!(f16.len(), 4, "parity x2, forward, extract: {table}");
    for r in f16 {
        assert_eq!(r[2], "FAILED", "{r:?}");
        assert!(r[5].contains("extract.compute"), "reason: {r:?}");
    }
    let ok = rows
        .iter()
        .filter(|r| r[1] == "f32" && r[2] == "ok")
        .count();
    assert_eq!(ok, 4, "the f32 steps after the failures still ran: {table}");
}
