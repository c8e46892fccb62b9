//! Fixtures shared by the integration tests under `tests/`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pipeline::config::Config;
use pipeline::device::DeviceChoice;
use pipeline::WeightsSource;

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
    c.backbone.weights = WeightsSource::Local(random_weights().to_path_buf());
    c.preprocess.input_size = Some(32);
    c.extract.batch_size = 2;
    c.extract.device = DeviceChoice::Cpu;
    c.extract.out = dir.join("features");
    c.validate().expect("valid config");
    (dir, c)
}

/// The features of the dataset `c` names, loaded from its store as `train-head` loads them.
pub fn load(c: &Config) -> pipeline::Result<pipeline::FeatureSet> {
    let plan = pipeline::features::extract::Plan::new(c)?;
    pipeline::features::extract::load_features(c, &plan)
}

/// Every shard file under a store: (path, content hashes in row order), sorted by path.
pub fn shards(out: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut found = Vec::new();
    let spaces = out.join("spaces");
    for space in std::fs::read_dir(&spaces).expect("spaces").flatten() {
        let dir = space.path();
        let id = space.file_name().to_string_lossy().into_owned();
        let key_path = dir.join("space.json");
        let key = pipeline::CacheKey::from_json(
            &std::fs::read(&key_path).expect("space.json"),
            &key_path,
        )
        .expect("valid space.json");
        for f in std::fs::read_dir(&dir).expect("space dir").flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if pipeline::features::store::shard::is_shard_name(&name) {
                let header = pipeline::features::store::shard::read_header(&f.path(), &key, &id)
                    .expect("readable")
                    .expect("valid shard");
                found.push((f.path(), header.hashes));
            }
        }
    }
    found.sort();
    found
}

/// Every file under `dir` (relative path -> bytes), the lock file left out.
pub fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if e.file_name() != ".lock" {
                let rel = p.strip_prefix(root).expect("inside").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Serialises the tests that point `HF_HOME` at a fake hub cache: they share one process now.
static HF_HOME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A fake hf-hub cache holding `timm/vgg16.tv_in1k` (`<HF_HOME>/hub/models--timm--vgg16.tv_in1k/
/// {refs/main, snapshots/<rev>/model.safetensors}`, the file written by `write`), with `HF_HOME`
/// pointing at it for as long as the returned guard lives.
pub fn fake_hf_home(
    test: &str,
    write: impl FnOnce(&Path),
) -> (PathBuf, std::sync::MutexGuard<'static, ()>) {
    let guard = HF_HOME.lock().unwrap_or_else(|p| p.into_inner());
    let home = testkit::temp_dir(test);
    let repo = home.join("hub/models--timm--vgg16.tv_in1k");
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::create_dir_all(repo.join("snapshots/0123abcd")).expect("mkdir");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("ref");
    write(&repo.join("snapshots/0123abcd/model.safetensors"));
    std::env::set_var("HF_HOME", &home);
    (home, guard)
}
