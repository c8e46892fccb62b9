//! Golden test: real VGG16 weights on the two reference images must reproduce the reference
//! pool5 features (`../shared/reference/SOURCE.md` names the PyTorch script that made them) at
//! `max|diff| / max|ref| <= 1e-5` in f32, and within 1e-2 in bf16.
//!
//! The data lives outside the repository; without it the test prints "SKIPPED" and passes,
//! unless `PIPELINE_REQUIRE_SHARED=1` (see `testkit::shared_dir`).

use fastconv::{Algorithm, Precision, Schedule, Tile, Vgg16Cpu};
use testkit::{max_relative_error as rel_err, read_npy_f32 as read_npy};

fn check(precision: Precision, bound: f32) {
    check_with(precision, Algorithm::Direct, bound);
}

fn check_with(precision: Precision, algorithm: Algorithm, bound: f32) {
    let Some(shared) = testkit::shared_dir("fastconv parity") else {
        return;
    };
    let weights = std::fs::read(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"))
        .expect("weights");
    let net = Vgg16Cpu::from_safetensors_with(&weights, precision, algorithm).expect("network");
    let mut inputs = Vec::new();
    let mut wants = Vec::new();
    for name in ["chelsea", "coffee"] {
        let (shape, input) = read_npy(&shared.join(format!("reference/{name}_vgg16_input.npy")));
        assert_eq!(shape, [1, 3, 224, 224]);
        let (shape, want) = read_npy(&shared.join(format!("reference/{name}_vgg16_pool5.npy")));
        assert_eq!(shape, [1, 512, 7, 7]);
        let got = net.forward(&input, 1, 224).expect("forward");
        let err = rel_err(&got, &want);
        println!("{name} {precision:?} {algorithm:?}: max|diff|/max|ref| = {err:e}");
        assert!(
            err <= bound,
            "{name} {precision:?} {algorithm:?}: {err:e} > {bound:e}"
        );
        inputs.extend_from_slice(&input);
        wants.extend_from_slice(&want);
    }
    // Both batch schedules must give the batch-1 features.
    for schedule in [Schedule::Rows, Schedule::Images] {
        let net = Vgg16Cpu::from_safetensors_with(&weights, precision, algorithm)
            .expect("network")
            .with_schedule(schedule);
        let both = net.forward(&inputs, 2, 224).expect("batched forward");
        let err = rel_err(&both, &wants);
        println!(
            "batch of 2 {precision:?} {algorithm:?} {schedule:?}: max|diff|/max|ref| = {err:e}"
        );
        assert!(
            err <= bound,
            "batch 2 {precision:?} {algorithm:?} {schedule:?}: {err:e} > {bound:e}"
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

#[test]
fn winograd_f2x2_pool5_within_1e5() {
    // F(2x2, 3x3) keeps the exact path's bound on the real network.
    check_with(Precision::F32, Algorithm::Winograd(Tile::F2x2), 1e-5);
}

#[test]
fn winograd_f4x4_pool5_within_1e4() {
    check_with(Precision::F32, Algorithm::Winograd(Tile::F4x4), 1e-4);
}
