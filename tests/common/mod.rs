//! Fixtures shared by the integration tests under `tests/`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pipeline::config::Config;

/// Seeded random VGG16 weights, written once per test process.
pub fn random_weights() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = testkit::temp_dir("random-vgg16").join("vgg16-random.safetensors");
        testkit::write_vgg_weights(&path, |_, _| None);
        path
    })
}

/// A generated CSV + images dataset of `n` rows and a fast config (32x32 input, batch 2).
pub fn fixture(test: &str, n: usize) -> (PathBuf, Config) {
    let dir = testkit::temp_dir(test);
    let (csv, images) = testkit::write_dataset(&dir, n);
    let mut c = Config::default();
    c.data.csv = Some(csv);
    c.data.images = Some(images);
    c.data.image_column = "file".into();
    c.data.label_column = "class".into();
    c.backbone.weights = random_weights().display().to_string();
    c.preprocess.input_size = Some(32);
    c.extract.batch_size = 2;
    c.extract.device = "cpu".into();
    c.extract.out = dir.join("features");
    c.validate().expect("valid config");
    (dir, c)
}
