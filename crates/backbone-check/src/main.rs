//! `backbone-check`: the frozen VGG16 on one device, checked and timed without a dataset.
//!
//! - `parity`: runs a preprocessed reference input (`.npy`, `[1, 3, 224, 224]`) and compares the
//!   features with the expected pool5 output: max relative error and cosine, against the bound
//!   of the arithmetic (f32: 1e-4 relative; tf32, f16, bf16: cosine >= 0.999). Exit status 1 when
//!   the bound is missed.
//! - `forward`: the bare batched forward on device-resident random input, best and mean of
//!   `--iters` timed runs after one warm-up: the rate `extract` is measured against.
//!
//! Each prints one `KEY=value` line that `scripts/gpu_check.sh` parses.

mod npy;

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{Device, Tensor};
use pipeline::config::{ComputePrecision, ConvAlgorithm, ExtractConfig};
use pipeline::device::{describe, DeviceChoice};
use pipeline::features::BackboneOptions;
use pipeline::{Vgg16Features, Weights};

const USAGE: &str = "\
backbone-check: parity and speed of the frozen VGG16 on one device

Usage:
  backbone-check parity  --weights W --input X.npy --expected Y.npy [options]
  backbone-check forward --weights W [--batch 128] [--size 224] [--iters 3] [options]

Options:
  --device D         auto (default), cpu, cuda:N
  --compute P        f32 (default), tf32, f16, bf16
  --conv A           CPU algorithm: winograd2x2 (default), winograd4x4, direct
  --workspace-mb N   GPU im2col bound per conv (default 1024)
  --label NAME       name printed in the parity line (default: the input's file stem)
";

/// The parsed command line.
struct Args {
    command: String,
    weights: Option<String>,
    input: Option<String>,
    expected: Option<String>,
    label: Option<String>,
    device: String,
    options: BackboneOptions,
    batch: usize,
    size: usize,
    iters: usize,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match parse(&args).and_then(|a| run(&a)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("backbone-check: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse(raw: &[String]) -> Result<Args, String> {
    let mut it = raw.iter();
    let command = it.next().cloned().unwrap_or_default();
    let defaults = ExtractConfig::default();
    let mut a = Args {
        command,
        weights: None,
        input: None,
        expected: None,
        label: None,
        device: "auto".into(),
        options: BackboneOptions::from_config(&defaults),
        batch: 128,
        size: 224,
        iters: 3,
    };
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .clone();
        let number = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{flag} {v}: expected a positive integer"))
        };
        match flag.as_str() {
            "--weights" => a.weights = Some(value),
            "--input" => a.input = Some(value),
            "--expected" => a.expected = Some(value),
            "--label" => a.label = Some(value),
            "--device" => a.device = value,
            "--compute" => a.options.compute = enum_value(flag, &value)?,
            "--conv" => a.options.conv = enum_value::<ConvAlgorithm>(flag, &value)?,
            "--workspace-mb" => a.options.workspace_bytes = number(&value)? << 20,
            "--batch" => a.batch = number(&value)?,
            "--size" => a.size = number(&value)?,
            "--iters" => a.iters = number(&value)?,
            _ => return Err(format!("unknown argument `{flag}` (try --help)")),
        }
    }
    Ok(a)
}

/// A config enum from its TOML spelling (`f16`, `winograd4x4`, ...).
fn enum_value<T: serde::de::DeserializeOwned>(flag: &str, v: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(v))
        .map_err(|e| format!("{flag} {v}: {e}"))
}

fn run(a: &Args) -> Result<bool, String> {
    let weights = a.weights.as_ref().ok_or("--weights is required")?;
    let weights = Weights::open(weights.into()).map_err(|e| e.to_string())?;
    let device = DeviceChoice::parse(&a.device)
        .and_then(|d| d.open_logged("backbone-check"))
        .map_err(|e| e.to_string())?;
    let model = Vgg16Features::load(&weights, &device, &a.options).map_err(|e| e.to_string())?;
    match a.command.as_str() {
        "parity" => parity(a, &model, &device),
        "forward" => forward(a, &model, &device).map(|()| true),
        other => Err(format!("unknown command `{other}` (parity or forward)")),
    }
}

fn parity(a: &Args, model: &Vgg16Features, device: &Device) -> Result<bool, String> {
    let input_path = a.input.as_ref().ok_or("--input is required")?;
    let expected_path = a.expected.as_ref().ok_or("--expected is required")?;
    let input = npy::read(input_path.as_ref())?;
    let expected = npy::read(expected_path.as_ref())?;
    if input.shape.len() != 4 || input.shape[1] != 3 {
        return Err(format!(
            "{input_path}: shape {:?}, expected [n, 3, h, w]",
            input.shape
        ));
    }
    let x = Tensor::from_vec(input.data, input.shape.as_slice(), device).map_err(str_err)?;
    let got: Vec<f32> = model
        .forward(&x)
        .and_then(|f| {
            Ok(f.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        })
        .map_err(|e| e.to_string())?;
    if got.len() != expected.data.len() {
        return Err(format!(
            "{expected_path}: {} values, the backbone gave {}",
            expected.data.len(),
            got.len()
        ));
    }
    let (max_rel, cosine) = compare(&got, &expected.data);
    let compute = a.options.compute;
    let (ok, bound) = match compute {
        ComputePrecision::F32 => (max_rel <= 1e-4, "max_rel<=1e-4"),
        _ => (cosine >= 0.999, "cosine>=0.999"),
    };
    let label = a.label.clone().unwrap_or_else(|| {
        std::path::Path::new(input_path)
            .file_stem()
            .map_or_else(|| input_path.clone(), |s| s.to_string_lossy().into_owned())
    });
    println!(
        "PARITY label={label} device={} compute={} max_rel={max_rel:.3e} cosine={cosine:.7} \
         bound={bound} result={}",
        describe(device),
        compute.name(),
        if ok { "ok" } else { "FAIL" }
    );
    Ok(ok)
}

/// (max |a - b| / max |b|, cosine(a, b)), accumulated in f64.
fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut diff, mut scale, mut dot, mut na, mut nb) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        diff = diff.max((x - y).abs());
        scale = scale.max(y.abs());
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    (
        diff / scale.max(f64::MIN_POSITIVE),
        dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE),
    )
}

fn forward(a: &Args, model: &Vgg16Features, device: &Device) -> Result<(), String> {
    let n = a.batch * 3 * a.size * a.size;
    // Deterministic pixel-like values; the rate does not depend on them.
    let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 255) as f32 - 120.0).collect();
    let x = Tensor::from_vec(values, (a.batch, 3, a.size, a.size), device).map_err(str_err)?;
    let run_once = || -> Result<f64, String> {
        let start = Instant::now();
        let features = model.forward(&x).map_err(|e| e.to_string())?;
        // CUDA launches are asynchronous: the clock stops when the GPU is done.
        device.synchronize().map_err(str_err)?;
        drop(features);
        Ok(start.elapsed().as_secs_f64())
    };
    let warmup = run_once()?;
    let times = (0..a.iters)
        .map(|_| run_once())
        .collect::<Result<Vec<_>, _>>()?;
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "FORWARD device={} compute={} batch={} size={} iters={} warmup_s={warmup:.4} \
         best_s={best:.4} mean_s={mean:.4} images_per_s={:.2}",
        describe(device),
        a.options.compute.name(),
        a.batch,
        a.size,
        a.iters,
        a.batch as f64 / best
    );
    Ok(())
}

fn str_err(e: candle_core::Error) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_options_in_config_spelling() {
        let a = args(&[
            "forward",
            "--compute",
            "bf16",
            "--conv",
            "direct",
            "--batch",
            "4",
            "--workspace-mb",
            "2",
        ])
        .expect("valid");
        assert_eq!(a.command, "forward");
        assert_eq!(a.options.compute, ComputePrecision::Bf16);
        assert_eq!(a.options.conv, ConvAlgorithm::Direct);
        assert_eq!(a.options.workspace_bytes, 2 << 20);
        assert_eq!(a.batch, 4);
        assert!(args(&["forward", "--compute", "f64"])
            .err()
            .is_some_and(|e| e.contains("--compute f64")));
        assert!(args(&["forward", "--batch", "0"]).is_err());
        assert!(args(&["forward", "--batch"]).is_err());
        assert!(args(&["forward", "--nope", "1"]).is_err());
    }

    #[test]
    fn compare_measures_relative_error_and_cosine() {
        let (rel, cos) = compare(&[1.0, 2.0, 4.0], &[1.0, 2.0, 4.0]);
        assert_eq!(rel, 0.0);
        assert!((cos - 1.0).abs() < 1e-12);
        let (rel, cos) = compare(&[1.0, 2.0, 3.0], &[1.0, 2.0, 4.0]);
        assert!((rel - 0.25).abs() < 1e-12);
        assert!(cos < 1.0 && cos > 0.99);
    }
}
