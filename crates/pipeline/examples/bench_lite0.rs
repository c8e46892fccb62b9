//! EfficientNet-Lite0 feature-extraction speed on the CPU engine.
//!
//! `bench_lite0 [weights.safetensors] [batch] [repeats] [size] [engine]` (defaults: the shared
//! `efficientnet-lite0-imagenet.safetensors` beside the checkout, 32, 5, 224, `nhwc`; `candle`
//! times candle's ops, the engine CUDA uses, on the CPU): `repeats`
//! forward passes over one batch of random images; prints the best and median wall time per
//! batch, images/s from each, and the process CPU time per image (user + system, which is less
//! sensitive than wall time to other processes competing for the cores).
//!
//! Output: `key value` lines.

use std::time::Instant;

use candle_core::{Device, Tensor};
use pipeline::{EfficientNetLite0, Weights};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`).
fn cpu_seconds() -> Res<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').ok_or("bad /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // The kernel's USER_HZ is 100 on every Linux platform Rust supports.
    Ok(ticks / 100.0)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let default_weights = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/weights/efficientnet-lite0-imagenet.safetensors"
    );
    let weights = args.get(1).map_or(default_weights, String::as_str);
    let num = |i: usize, d: usize| -> Res<usize> {
        Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let (batch, repeats, size) = (num(2, 32)?, num(3, 5)?.max(1), num(4, 224)?);

    let w = Weights::open(weights.into())?;
    let engine = args.get(5).map_or("nhwc", String::as_str);
    let net = match engine {
        "nhwc" => EfficientNetLite0::load(&w, &Device::Cpu)?,
        "candle" => EfficientNetLite0::load_candle(&w, &Device::Cpu, candle_core::DType::F32)?,
        other => return Err(format!("engine `{other}`: expected `nhwc` or `candle`").into()),
    };
    let x = Tensor::rand(-1f32, 1f32, (batch, 3, size, size), &Device::Cpu)?;
    // One warm-up pass (page faults of the activation buffers, thread-pool start).
    net.forward(&x)?;
    let cpu0 = cpu_seconds()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        let f = net.forward(&x)?;
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(f.dims(), &[batch, 1280]);
    }
    let cpu = cpu_seconds()? - cpu0;
    times.sort_by(f64::total_cmp);
    let (best, median) = (times[0], times[times.len() / 2]);
    println!("engine {engine}");
    println!("threads {}", rayon::current_num_threads());
    println!("batch {batch}");
    println!("size {size}");
    println!("best_batch_s {best:.4}");
    println!("median_batch_s {median:.4}");
    println!("images_per_s_best {:.1}", batch as f64 / best);
    println!("images_per_s_median {:.1}", batch as f64 / median);
    println!(
        "cpu_ms_per_image {:.2}",
        1000.0 * cpu / (batch * repeats) as f64
    );
    Ok(())
}
