//! Archives for fetch tests: zips built in memory, their content digest recomputed here
//! independently of the pipeline, and a small stand-in for the study's GitHub archive.

use std::io::{Cursor, Write};

use sha2::{Digest, Sha256};

/// A zip of `entries` (name, bytes); names ending in `/` are folders.
pub fn zip_bytes(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        if name.ends_with('/') {
            zip.add_directory(name.as_str(), options).expect("zip dir");
        } else {
            zip.start_file(name.as_str(), options).expect("zip file");
            zip.write_all(bytes).expect("zip write");
        }
    }
    zip.finish().expect("zip finish").into_inner()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The content digest of the files of `entries` below the top folder `top`: SHA-256 of the
/// sorted lines `<sha256 of file>  <path>\n` (as `sha256sum` prints them, then `sort`).
pub fn content_digest(entries: &[(String, Vec<u8>)], top: &str) -> String {
    let mut lines: Vec<String> = entries
        .iter()
        .filter(|(name, _)| !name.ends_with('/'))
        .map(|(name, bytes)| {
            let path = name.strip_prefix(&format!("{top}/")).expect("under top");
            format!("{}  {path}\n", hex(&Sha256::digest(bytes)))
        })
        .collect();
    lines.sort();
    hex(&Sha256::digest(lines.concat().as_bytes()))
}

fn jpeg(seed: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(48, 36, |x, y| {
        image::Rgb([
            (x * 5 + seed as u32 * 29) as u8,
            (y * 7 + seed as u32 * 13) as u8,
            (seed * 50) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode jpeg");
    out.into_inner()
}

/// The top folder of [`study_archive`], as GitHub names it (`<repo>-<commit>`).
pub const STUDY_TOP: &str = "CNN-Image-Classification-0123456";

/// A small archive with the study archive's layout: `<top>/Emergency_Vehicles/train.csv`
/// (`image_names,emergency_or_not`, labels alternating 0/1), `test.csv` (`image_names`), and
/// generated JPEGs in `train/` and `test/`, plus a notebook at the top. Returns the entries.
pub fn study_entries(n_train: usize, n_test: usize) -> Vec<(String, Vec<u8>)> {
    let dir = format!("{STUDY_TOP}/Emergency_Vehicles");
    let mut entries = vec![
        (format!("{STUDY_TOP}/"), Vec::new()),
        (format!("{STUDY_TOP}/notebook.ipynb"), b"{}".to_vec()),
        (format!("{dir}/"), Vec::new()),
    ];
    let mut train_csv = String::from("image_names,emergency_or_not\n");
    for i in 0..n_train {
        train_csv.push_str(&format!("{}.jpg,{}\n", 1000 + i, i % 2));
        entries.push((format!("{dir}/train/{}.jpg", 1000 + i), jpeg(i)));
    }
    let mut test_csv = String::from("image_names\n");
    for i in 0..n_test {
        test_csv.push_str(&format!("t{i:03}.jpg\n"));
        entries.push((format!("{dir}/test/t{i:03}.jpg"), jpeg(500 + i)));
    }
    entries.push((format!("{dir}/train.csv"), train_csv.into_bytes()));
    entries.push((format!("{dir}/test.csv"), test_csv.into_bytes()));
    entries
}
