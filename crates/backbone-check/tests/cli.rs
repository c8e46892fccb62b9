//! `backbone-check` as `scripts/gpu_check.sh` runs it, on the CPU: parity with the reference
//! pool5 features (f32 and bf16), the forward's rate line, and clean errors.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backbone-check"))
        .args(args)
        .output()
        .expect("run backbone-check")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn parity_on_the_reference_input_in_f32_and_bf16() {
    let Some(shared) = testkit::shared_dir("parity_on_the_reference_input_in_f32_and_bf16") else {
        return;
    };
    let weights = shared.join("weights/vgg16-oxford-imagenet-features.safetensors");
    let input = shared.join("reference/coffee_vgg16_input.npy");
    let expected = shared.join("reference/coffee_vgg16_pool5.npy");
    for compute in ["f32", "bf16"] {
        let o = run(&[
            "parity",
            "--weights",
            weights.to_str().expect("utf8"),
            "--input",
            input.to_str().expect("utf8"),
            "--expected",
            expected.to_str().expect("utf8"),
            "--device",
            "cpu",
            "--compute",
            compute,
        ]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{compute}: {out}{err}");
        assert!(
            out.starts_with("PARITY label=coffee_vgg16_input device=cpu"),
            "{out}"
        );
        assert!(out.contains(&format!("compute={compute} ")), "{out}");
        assert!(out.contains("result=ok"), "{out}");
    }
    // The wrong expected output fails the bound: exit status 1, result=FAIL.
    let other = shared.join("reference/chelsea_vgg16_pool5.npy");
    let o = run(&[
        "parity",
        "--weights",
        weights.to_str().expect("utf8"),
        "--input",
        input.to_str().expect("utf8"),
        "--expected",
        other.to_str().expect("utf8"),
        "--device",
        "cpu",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).0.contains("result=FAIL"), "{:?}", text(&o));
}

#[test]
fn forward_prints_its_rate_and_errors_are_clean() {
    let dir = testkit::temp_dir("backbone-check-cli");
    let weights = dir.join("w.safetensors");
    testkit::write_vgg_weights(&weights, |_, _| None);
    let w = weights.to_str().expect("utf8");
    let o = run(&[
        "forward",
        "--weights",
        w,
        "--batch",
        "2",
        "--size",
        "32",
        "--iters",
        "2",
        "--device",
        "cpu",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.starts_with("FORWARD device=cpu compute=f32 batch=2 size=32"),
        "{out}"
    );
    assert!(out.contains("images_per_s="), "{out}");

    // f16 is CUDA arithmetic: refused on the CPU with the key named, exit 2, no panic.
    let o = run(&[
        "forward",
        "--weights",
        w,
        "--device",
        "cpu",
        "--compute",
        "f16",
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("extract.compute") && !err.contains("panicked"),
        "{err}"
    );
    // A missing input names the file.
    let o = run(&[
        "parity",
        "--weights",
        w,
        "--input",
        "/nonexistent/x.npy",
        "--expected",
        "/y.npy",
        "--device",
        "cpu",
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/x.npy"), "{err}");
}
