//! Benchmark of [`fastconv::Vgg16Cpu`], driven by `scripts/bench_extract.sh`.
//!
//! ```text
//! fastconv-bench extract [--batch N] [--size S] [--precision f32|bf16] [--reps R] [--weights FILE]
//! fastconv-bench profile [--size S] [--precision f32|bf16] [--reps R] [--weights FILE]
//! fastconv-bench peak    [--secs T]
//! (extract/profile: --kernel gemm forces the gemm-crate path instead of the AVX2 direct kernel;
//! --algorithm direct|winograd2|winograd4 picks the convolution algorithm, default direct)
//! ```
//! `extract` prints `RESULT key=value ...` (best of R timed runs after one warm-up);
//! `profile` prints a per-layer table (batch 1, best of R); `peak` measures the FMA ceiling
//! (register-only FMA chains on every rayon thread) and a large sgemm with the `gemm` crate.
//! Without `--weights`, random weights are used (the timing does not depend on the values).

use std::time::Instant;

use fastconv::{Algorithm, Precision, Schedule, Tile, Vgg16Cpu, VGG16_CHANNELS};

struct Args {
    mode: String,
    batch: usize,
    size: usize,
    precision: Precision,
    reps: usize,
    weights: Option<String>,
    secs: f64,
    gemm_only: bool,
    schedule: Schedule,
    algorithm: Algorithm,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: fastconv-bench extract|profile|peak [options]")?;
    let mut args = Args {
        mode,
        batch: 1,
        size: 224,
        precision: Precision::F32,
        reps: 3,
        weights: None,
        secs: 1.0,
        gemm_only: false,
        schedule: Schedule::Auto,
        algorithm: Algorithm::Direct,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--batch" => args.batch = num(&value)?,
            "--size" => args.size = num(&value)?,
            "--schedule" => {
                args.schedule = match value.as_str() {
                    "auto" => Schedule::Auto,
                    "rows" => Schedule::Rows,
                    "images" => Schedule::Images,
                    other => return Err(format!("unknown schedule {other}")),
                }
            }
            "--kernel" => args.gemm_only = value == "gemm",
            "--algorithm" => args.algorithm = parse_algorithm(&value)?,
            "--reps" => args.reps = num(&value)?.max(1),
            "--weights" => args.weights = Some(value),
            "--secs" => args.secs = value.parse().map_err(|e| format!("--secs {value}: {e}"))?,
            "--precision" => {
                args.precision = match value.as_str() {
                    "f32" => Precision::F32,
                    "bf16" => Precision::Bf16,
                    other => return Err(format!("unknown precision {other}")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// `direct`, `winograd2` (F(2x2, 3x3)) or `winograd4` (F(4x4, 3x3)).
fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "direct" => Ok(Algorithm::Direct),
        "winograd2" => Ok(Algorithm::Winograd(Tile::F2x2)),
        "winograd4" => Ok(Algorithm::Winograd(Tile::F4x4)),
        other => Err(format!(
            "unknown algorithm {other} (direct, winograd2, winograd4)"
        )),
    }
}

/// Uniform values in [-scale, scale) from a fixed-seed xorshift generator.
fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

fn network(args: &Args) -> Result<Vgg16Cpu, String> {
    let net = network_inner(args)?.with_schedule(args.schedule);
    Ok(if args.gemm_only { net.gemm_only() } else { net })
}

fn network_inner(args: &Args) -> Result<Vgg16Cpu, String> {
    if let Some(path) = &args.weights {
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        return Vgg16Cpu::from_safetensors_with(&bytes, args.precision, args.algorithm)
            .map_err(|e| e.to_string());
    }
    let mut cin = 3;
    let mut params = Vec::new();
    for (i, &cout) in VGG16_CHANNELS.iter().enumerate() {
        // He-style scale keeps activations O(1) through the 13 layers.
        let scale = (6.0 / (9 * cin) as f32).sqrt();
        params.push((
            random(cout * cin * 9, scale, i as u64 + 1),
            vec![0.01f32; cout],
        ));
        cin = cout;
    }
    Vgg16Cpu::new_with(&params, args.precision, args.algorithm).map_err(|e| e.to_string())
}

/// CPU seconds (user + system, all threads) this process has used, from `/proc/self/stat`;
/// 0 where that file does not exist. Under load from other processes, CPU time per image is a
/// steadier measure of the work done than wall time.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some(rest) = stat.rsplit(')').next() else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0 // USER_HZ, 100 on Linux
}

fn extract(args: &Args) -> Result<(), String> {
    let net = network(args)?;
    let input = random(args.batch * 3 * args.size * args.size, 2.0, 99);
    let gflop_per_image: f64 = net.layer_flops(args.size).iter().sum::<f64>() / 1e9;
    net.forward(&input, args.batch, args.size)
        .map_err(|e| e.to_string())?; // warm-up
    let mut best = f64::INFINITY;
    let cpu_start = cpu_seconds();
    for _ in 0..args.reps {
        let start = Instant::now();
        let out = net
            .forward(&input, args.batch, args.size)
            .map_err(|e| e.to_string())?;
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    let cpu_per_image = (cpu_seconds() - cpu_start) / (args.reps * args.batch) as f64;
    let ips = args.batch as f64 / best;
    println!(
        "RESULT impl=fastconv algorithm={:?} precision={:?} batch={} size={} threads={} best_s={:.4} ms_per_image={:.2} images_per_s={:.3} gflops={:.1} cpu_ms_per_image={:.0}",
        args.algorithm,
        args.precision,
        args.batch,
        args.size,
        rayon::current_num_threads(),
        best,
        1e3 * best / args.batch as f64,
        ips,
        ips * gflop_per_image,
        1e3 * cpu_per_image
    );
    Ok(())
}

fn profile(args: &Args) -> Result<(), String> {
    let net = network(args)?;
    let input = random(3 * args.size * args.size, 2.0, 99);
    let flops = net.layer_flops(args.size);
    net.forward(&input, 1, args.size)
        .map_err(|e| e.to_string())?;
    let mut best = vec![f64::INFINITY; flops.len()];
    for _ in 0..args.reps {
        let (_, times) = net
            .forward_profiled(&input, 1, args.size)
            .map_err(|e| e.to_string())?;
        for (b, t) in best.iter_mut().zip(times) {
            *b = b.min(t.as_secs_f64());
        }
    }
    println!("| layer | in -> out channels | size | GFLOP | ms | GFLOP/s |");
    println!("|---|---|---|---:|---:|---:|");
    let (mut cin, mut side) = (3, args.size);
    for (i, ((&f, &t), &cout)) in flops.iter().zip(&best).zip(&VGG16_CHANNELS).enumerate() {
        println!(
            "| conv{} | {cin} -> {cout} | {side} | {:.3} | {:.2} | {:.1} |",
            i + 1,
            f / 1e9,
            1e3 * t,
            f / t / 1e9
        );
        cin = cout;
        if fastconv::VGG16_POOL_AFTER[i] {
            side /= 2;
        }
    }
    let (f, t): (f64, f64) = (flops.iter().sum(), best.iter().sum());
    println!(
        "| total | | | {:.2} | {:.1} | {:.1} |",
        f / 1e9,
        1e3 * t,
        f / t / 1e9
    );
    Ok(())
}

/// FMA chains on registers only: 12 independent accumulators hide the FMA latency.
/// Returns FLOPs done.
fn fma_loop(iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { fma_avx512(iters) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return unsafe { fma_avx2(iters) };
        }
    }
    let mut acc = [1.0f32; 16];
    for _ in 0..iters {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 32.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(0.999_999);
    let c = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for a in &mut acc {
            *a = _mm256_fmadd_ps(*a, m, c);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 12.0 * 16.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let m = _mm512_set1_ps(0.999_999);
    let c = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..iters {
        for a in &mut acc {
            *a = _mm512_fmadd_ps(*a, m, c);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 12.0 * 32.0
}

fn peak(args: &Args) {
    let threads = rayon::current_num_threads();
    let isa = if cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx512f") {
        "avx512f"
    } else if cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("fma") {
        "avx2+fma"
    } else {
        "scalar"
    };
    // Calibrate a chunk to ~50 ms, then repeat chunks, keeping the best rate over `secs`.
    let mut iters = 1u64 << 20;
    loop {
        let t = Instant::now();
        fma_loop(iters);
        if t.elapsed().as_secs_f64() > 0.05 {
            break;
        }
        iters *= 2;
    }
    let mut best = 0.0f64;
    let until = Instant::now();
    while until.elapsed().as_secs_f64() < args.secs {
        let t = Instant::now();
        let flops: f64 = rayon::broadcast(|_| fma_loop(iters)).iter().sum();
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    println!("RESULT peak=fma isa={isa} threads={threads} gflops={best:.1}");
    let n = 2048;
    let a = random(n * n, 1.0, 1);
    let b = random(n * n, 1.0, 2);
    let mut c = vec![0.0f32; n * n];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: all three are n x n row-major matrices of exactly n * n elements.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        best = best.max(2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&c);
    println!("RESULT peak=sgemm n={n} threads={threads} gflops={best:.1}");
}

fn main() {
    let result = parse().and_then(|args| match args.mode.as_str() {
        "extract" => extract(&args),
        "profile" => profile(&args),
        "peak" => {
            peak(&args);
            Ok(())
        }
        other => Err(format!("unknown mode {other}")),
    });
    if let Err(e) = result {
        eprintln!("fastconv-bench: {e}");
        std::process::exit(2);
    }
}
