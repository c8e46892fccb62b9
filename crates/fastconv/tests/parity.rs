//! Golden test: real VGG16 weights on the two reference images must reproduce the reference
//! pool5 features (`../shared/reference/SOURCE.md` names the PyTorch script that made them) at
//! `max|diff| / max|ref| <= 1e-5` in f32, and within 1e-2 in bf16.
//!
//! The data lives outside the repository; without it the test prints "SKIPPED" and passes,
//! unless `PIPELINE_REQUIRE_SHARED=1`.

use std::path::{Path, PathBuf};

use fastconv::{Precision, Schedule, Vgg16Cpu};

fn shared() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("PIPELINE_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("PIPELINE_REQUIRE_SHARED=1 but {} not found", dir.display());
    }
    eprintln!(
        "SKIPPED: ../shared not found (looked for {})",
        dir.display()
    );
    None
}

/// Reads a little-endian f32, C-order `.npy` file (format 1.0 or 2.0): shape and data.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an .npy file");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).expect("ascii header");
    assert!(
        header.contains("'descr': '<f4'"),
        "expected <f4 data: {header}"
    );
    assert!(
        header.contains("'fortran_order': False"),
        "expected C order: {header}"
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("dim"))
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "data length vs shape"
    );
    (shape, data)
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    max_diff / max_ref
}

fn check(precision: Precision, bound: f32) {
    let Some(shared) = shared() else { return };
    let weights = std::fs::read(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"))
        .expect("weights");
    let net = Vgg16Cpu::from_safetensors(&weights, precision).expect("network");
    let mut inputs = Vec::new();
    let mut wants = Vec::new();
    for name in ["chelsea", "coffee"] {
        let (shape, input) = read_npy(&shared.join(format!("reference/{name}_vgg16_input.npy")));
        assert_eq!(shape, [1, 3, 224, 224]);
        let (shape, want) = read_npy(&shared.join(format!("reference/{name}_vgg16_pool5.npy")));
        assert_eq!(shape, [1, 512, 7, 7]);
        let got = net.forward(&input, 1, 224).expect("forward");
        let err = rel_err(&got, &want);
        println!("{name} {precision:?}: max|diff|/max|ref| = {err:e}");
        assert!(err <= bound, "{name} {precision:?}: {err:e} > {bound:e}");
        inputs.extend_from_slice(&input);
        wants.extend_from_slice(&want);
    }
    // Both batch schedules must give the batch-1 features.
    for schedule in [Schedule::Rows, Schedule::Images] {
        let net = Vgg16Cpu::from_safetensors(&weights, precision)
            .expect("network")
            .with_schedule(schedule);
        let both = net.forward(&inputs, 2, 224).expect("batched forward");
        let err = rel_err(&both, &wants);
        println!("batch of 2 {precision:?} {schedule:?}: max|diff|/max|ref| = {err:e}");
        assert!(
            err <= bound,
            "batch 2 {precision:?} {schedule:?}: {err:e} > {bound:e}"
        );
    }
}

#[test]
fn f32_pool5_matches_reference() {
    check(Precision::F32, 1e-5);
}

#[test]
fn bf16_pool5_within_one_percent() {
    check(Precision::Bf16, 1e-2);
}
