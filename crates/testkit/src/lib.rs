//! Test-only helpers shared by every crate's tests.
//!
//! Tests that need the project's external data (`../shared` beside the checkout: the study's
//! images, pretrained weights, reference outputs) find it through [`shared_dir`] alone. When it
//! is absent the test prints a visible `SKIPPED` line and returns; with
//! `PIPELINE_REQUIRE_SHARED=1` (set by `.ci/run`) the skip becomes a failure, so CI always
//! runs them.
//!
//! [`http`] is a local HTTP server standing in for the internet in download tests, and
//! [`archive`] builds the archives it serves.

use std::path::{Path, PathBuf};

pub mod archive;
pub mod http;

/// The environment variable that turns a missing `../shared` into a test failure.
pub const REQUIRE_VAR: &str = "PIPELINE_REQUIRE_SHARED";
/// Overrides where `shared` is looked for.
pub const DIR_VAR: &str = "PIPELINE_SHARED_DIR";

/// The workspace root (this crate lives in `<root>/crates/testkit`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// `../shared` (or `$PIPELINE_SHARED_DIR`), or `None` after printing why the caller skips.
///
/// # Panics
/// When it is absent and `PIPELINE_REQUIRE_SHARED=1`.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared"));
    if dir.join("weights").is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "{test}: SKIPPED: {} not found (see README: getting the data and weights)",
        dir.display()
    );
    if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
        panic!("{msg}, and {REQUIRE_VAR}=1 requires it");
    }
    eprintln!("{msg}");
    None
}

/// A little-endian float32 `.npy` file: (shape, values in C order).
///
/// # Panics
/// On anything but a C-order `<f4` array (test data only).
pub fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..6],
        b"\x93NUMPY",
        "{}: not a .npy file",
        path.display()
    );
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
        "{}: not float32: {header}",
        path.display()
    );
    assert!(
        header.contains("'fortran_order': False"),
        "{}: fortran order",
        path.display()
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("dimension"))
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "{}: size",
        path.display()
    );
    (shape, data)
}

/// max |a - b| / max |b|: the parity measure of the reference tests.
pub fn max_relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let max_diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let max_ref = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    max_diff / max_ref.max(f32::MIN_POSITIVE)
}

/// A fresh empty directory under the system temp dir, unique to this test and process.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pipeline-test-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Writes `n` generated PNGs (40x30, distinct colours) to `dir/images` and `dir/labels.csv`
/// (`file,class`; every third row "ambulance", the rest "car"); returns (csv, images).
pub fn write_dataset(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("mkdir images");
    let mut csv = String::from("file,class\n");
    for i in 0..n {
        let name = format!("img{i:03}.png");
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            // The green offset keeps images past the 256th distinct from the first ones.
            image::Rgb([
                (x * 6 + i as u32 * 17) as u8,
                (y * 8 + (i / 256) as u32) as u8,
                (i * 40) as u8,
            ])
        });
        img.save(images.join(&name)).expect("save png");
        let label = if i % 3 == 0 { "ambulance" } else { "car" };
        csv.push_str(&format!("{name},{label}\n"));
    }
    let csv_path = dir.join("labels.csv");
    std::fs::write(&csv_path, csv).expect("write csv");
    (csv_path, images)
}

/// Writes seeded random VGG16-shaped weights (`features.N.weight/bias`, He-uniform scaled)
/// with Oxford-style preprocessing metadata. `replace(name, shape)` may substitute a shape.
pub fn write_vgg_weights(path: &Path, replace: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) {
    use safetensors::tensor::TensorView;
    let channels = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512,
    ];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let (mut index, mut in_c) = (0, 3);
    for c in channels {
        if c == 0 {
            index += 1;
            continue;
        }
        let bound = 0.5 * (6.0 / (in_c as f32 * 9.0)).sqrt();
        for (suffix, shape) in [("weight", vec![c, in_c, 3, 3]), ("bias", vec![c])] {
            let name = format!("features.{index}.{suffix}");
            let shape = replace(&name, &shape).unwrap_or(shape);
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|_| (next() * bound).to_le_bytes())
                .collect();
            data.push((name, shape, bytes));
        }
        in_c = c;
        index += 2;
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).expect("view");
            (name.clone(), view)
        })
        .collect();
    let meta = [
        ("input_size", "224"),
        ("input_scale", "255"),
        ("mean", "123.68,116.779,103.939"),
        ("std", "1,1,1"),
        ("channel_order", "RGB"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    safetensors::serialize_to_file(views, Some(meta), path).expect("write weights");
}

/// A PNG whose header announces `width` x `height` RGB pixels but whose data is a few bytes: a
/// decoder that trusts the header allocates `3 * width * height` bytes before finding out.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, adaptive filter, no interlace
    chunk(b"IHDR", &ihdr);
    // A complete zlib stream of one stored block holding 4 zero bytes.
    chunk(
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x04, 0x00, 0xfb, 0xff, 0, 0, 0, 0, 0x00, 0x04, 0x00, 0x01,
        ],
    );
    chunk(b"IEND", &[]);
    out
}
