//! The front door and the edges around it: image files to network input against an
//! independent (Pillow) reference, the hub weights' built-in preprocessing through a real
//! extraction, labels and blank lines in the CSV, and run selection next to an unfinished
//! (crashed or still running) training run.
//!
//! Every fixture folder here is named so that no word an assertion looks for in a message can
//! come from the folder's own path.

use std::path::{Path, PathBuf};

use pipeline::config::{ChannelOrder, Config, ResizeMode};
use pipeline::data::{Partial, IMAGENET_MEAN, IMAGENET_STD};
use pipeline::device::DeviceChoice;
use pipeline::reporting::runs::RunStatus;
use pipeline::training::study::{read_metrics, train_cnn, train_head, RunMetrics};
use pipeline::{Weights, WeightsSource};

use crate::common::{fixture, random_weights};

/// The cache's features (rows in cache order) and labels; one place to adapt if the cache
/// API changes.
fn features(c: &Config) -> (Vec<Vec<f32>>, Vec<usize>) {
    let set = crate::common::load(c).expect("cache loads");
    (set.features.to_vec2().expect("f32"), set.labels)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `shared/reference/{chelsea,coffee}.png` through the decoder and the `center-crop` recipe,
/// with the preprocessing the Oxford weights' own metadata gives, against
/// `*_vgg16_input.npy` made by Pillow (SOURCE.md: short side to 256 bilinear, centre crop
/// 224, RGB, 0..255 minus the mean).
///
/// Bound: 1e-5 per element, the f32 rounding of subtracting the mean; in fact the values are
/// bit-equal. PNG decoding is lossless, and `center-crop` computes Pillow's bilinear resize
/// itself: the same antialiasing weights (support widened by the scale), the same 22-bit
/// fixed point, the horizontal pass first and rounded to 8 bits, and the long side rounded
/// (chelsea: 451x300 -> 385x256). The looser bound of one grey level, allowed where resize or
/// JPEG implementations differ, is not needed. (The `image` crate's resize used before was up
/// to one grey level off, and truncating the long side to 384 put chelsea up to 42 off.)
#[test]
fn image_files_become_the_pillow_reference_inputs() {
    let Some(shared) = testkit::shared_dir("image_files_become_the_pillow_reference_inputs") else {
        return;
    };
    let weights = Weights::open(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"))
        .expect("weights");
    let prep = Partial::from_metadata(&weights.metadata, &weights.path)
        .expect("metadata")
        .complete(ResizeMode::CenterCrop, "oxford")
        .expect("the file states its preprocessing");
    assert_eq!(
        (prep.input_size, prep.input_scale, prep.mean, prep.std),
        (224, 255.0, [123.68, 116.779, 103.939], [1.0; 3])
    );
    for name in ["chelsea", "coffee"] {
        let got = prep
            .load(&shared.join(format!("reference/{name}.png")))
            .expect("decodes");
        let (shape, want) =
            testkit::read_npy_f32(&shared.join(format!("reference/{name}_vgg16_input.npy")));
        assert_eq!(shape, [1, 3, 224, 224]);
        let err = max_abs_diff(&got, &want);
        eprintln!("{name}: max |diff| {err:e} (one grey level = 1.0 here)");
        assert!(err <= 1e-5, "{name}: max |diff| {err} > 1e-5");
    }
}

/// The same images through a whole extraction (CSV, decoder, center-crop, fastconv VGG16, cache)
/// land on the reference pool5 features within the engine's own parity bound.
#[test]
fn extraction_from_image_files_matches_the_reference_pool5() {
    let Some(shared) =
        testkit::shared_dir("extraction_from_image_files_matches_the_reference_pool5")
    else {
        return;
    };
    let dir = testkit::temp_dir("front-door-e2e");
    std::fs::write(
        dir.join("refs.csv"),
        "image,label\nchelsea.png,cat\ncoffee.png,cup\n",
    )
    .expect("csv");
    let mut c = Config::default();
    c.data.csv = Some(dir.join("refs.csv"));
    c.data.images = Some(shared.join("reference"));
    c.backbone.weights =
        WeightsSource::Local(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"));
    c.preprocess.resize = ResizeMode::CenterCrop;
    c.extract.device = DeviceChoice::Cpu;
    c.extract.out = dir.join("features");
    c.validate().expect("valid");
    pipeline::features::extract::run(&c).expect("extract");
    let (rows, _) = features(&c);
    for (row, name) in rows.iter().zip(["chelsea", "coffee"]) {
        let (_, want) =
            testkit::read_npy_f32(&shared.join(format!("reference/{name}_vgg16_pool5.npy")));
        let err = testkit::max_relative_error(row, &want);
        eprintln!("{name}: pool5 max relative error {err:.2e}");
        assert!(err <= 1e-5, "{name}: max relative error {err:e} > 1e-5");
    }
}

/// Random VGG16 weights without any `__metadata__`, so nothing in the file says how to
/// preprocess.
fn weights_without_metadata(path: &Path) {
    let bytes = std::fs::read(random_weights()).expect("read weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.to_string(), view))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write weights");
}

/// A fake hf-hub cache holding `timm/vgg16.tv_in1k` (weights without metadata): extraction must
/// use the known table's preprocessing (x/255, ImageNet mean/std), giving the very features of
/// an extraction with that recipe written out in `[preprocess]`, and not those of the Oxford
/// recipe.
#[test]
fn hub_weights_bring_their_known_preprocessing_into_a_real_extraction() {
    // hf-hub's cache layout: <HF_HOME>/hub/models--<owner>--<name>/{refs/main, snapshots/<rev>/}.
    let (home, _hf) = crate::common::fake_hf_home("fake-hub-home", weights_without_metadata);
    let cached = home.join("hub/models--timm--vgg16.tv_in1k/snapshots/0123abcd/model.safetensors");

    let (dir, base) = fixture("table-recipe", 5);
    let mut hub = base.clone();
    hub.backbone.weights = WeightsSource::parse("hf:timm/vgg16.tv_in1k").expect("a hub source");
    hub.extract.out = dir.join("hub");
    pipeline::features::extract::run(&hub).expect("hub extraction");
    let set = crate::common::load(&hub).expect("store loads");
    let p = &set.key.preprocessing;
    assert_eq!(
        (p.input_scale, p.mean, p.std, p.channel_order),
        (1.0, IMAGENET_MEAN, IMAGENET_STD, ChannelOrder::Rgb)
    );

    // The same file as a local path has no recipe of its own: it must be given.
    let mut explicit = base.clone();
    explicit.backbone.weights = WeightsSource::Local(cached.clone());
    explicit.extract.out = dir.join("explicit");
    let err = pipeline::features::extract::run(&explicit)
        .expect_err("no preprocessing known")
        .to_string();
    assert!(err.contains("preprocess.input_scale"), "{err}");
    explicit.preprocess.input_scale = Some(1.0);
    explicit.preprocess.mean = Some(IMAGENET_MEAN);
    explicit.preprocess.std = Some(IMAGENET_STD);
    explicit.preprocess.channel_order = Some(ChannelOrder::Rgb);
    pipeline::features::extract::run(&explicit).expect("explicit extraction");

    let mut oxford = explicit.clone();
    oxford.preprocess.input_scale = Some(255.0);
    oxford.preprocess.mean = Some([123.68, 116.779, 103.939]);
    oxford.preprocess.std = Some([1.0; 3]);
    oxford.extract.out = dir.join("oxford");
    pipeline::features::extract::run(&oxford).expect("oxford extraction");

    let (from_hub, labels) = features(&hub);
    let (from_explicit, _) = features(&explicit);
    let (from_oxford, _) = features(&oxford);
    assert_eq!(labels.len(), 5);
    assert_eq!(from_hub, from_explicit, "the table's recipe, exactly");
    let flat = |rows: &[Vec<f32>]| rows.concat();
    let apart = testkit::max_relative_error(&flat(&from_oxford), &flat(&from_hub));
    assert!(
        apart > 0.1,
        "the Oxford recipe must give other features (max relative difference {apart:e})"
    );
}

/// Labels `1`, `1.0` and ` 01` are one class, named "1"; blank lines are not rows.
#[test]
fn integer_labels_written_differently_are_one_class_and_blank_lines_are_skipped() {
    let (dir, mut c) = fixture("label-spelling", 4);
    std::fs::write(
        dir.join("labels.csv"),
        "file,class\nimg000.png,1\n\nimg001.png,1.0\n,\nimg002.png, 01\nimg003.png,0\n\n",
    )
    .expect("csv");
    let s = pipeline::features::extract::run(&c).expect("extract");
    assert_eq!(s.images, 4);
    let set = crate::common::load(&c).expect("store loads");
    assert_eq!(set.row_map.classes, ["0", "1"]);
    assert_eq!(features(&c).1, [1, 1, 1, 0]);
    // A label outside the configured classes still names its line (blank lines counted).
    c.data.classes = Some(vec!["0".into(), "2".into()]);
    let err = pipeline::features::extract::run(&c)
        .expect_err("label 1 is not a class")
        .to_string();
    assert!(err.contains("line 2") && err.contains("`1`"), "{err}");
}

/// A fixture with extraction done and short training settings.
fn trained_setup(test: &str, n: usize) -> (PathBuf, Config) {
    let (dir, mut c) = fixture(test, n);
    c.split.val_fraction = 0.25;
    c.head.train.epochs = 2;
    c.head.train.batch_size = 4;
    c.cnn.train.epochs = 1;
    c.cnn.train.batch_size = 4;
    c.cnn.channels = vec![2, 2];
    c.cnn.input_size = 16;
    c.output.runs = dir.join("runs");
    pipeline::features::extract::run(&c).expect("extract");
    (dir, c)
}

/// Writes `metrics` into a new run directory `name` beside `like` (config and cache key
/// copied), as training writes it after an epoch; no weights, as after a crash.
fn crashed_run(like: &Path, name: &str, metrics: &RunMetrics) -> PathBuf {
    let dir = like.with_file_name(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in ["config.toml", "cache_key.json"] {
        std::fs::copy(like.join(f), dir.join(f)).expect("copy");
    }
    std::fs::write(
        dir.join("metrics.json"),
        serde_json::to_vec_pretty(metrics).expect("json"),
    )
    .expect("write");
    dir
}

#[test]
fn an_unfinished_run_next_to_a_finished_one_breaks_nothing() {
    let (dir, mut c) = trained_setup("run-choice", 12);
    let head = train_head(&c).expect("train-head");
    let finished = read_metrics(&head.dir).expect("finished metrics");
    assert_eq!(finished.status, RunStatus::Finished);

    // A newer head run that died after its first epoch: status "running", the final numbers
    // null (serde_json writes the NaNs training starts with as null), no weights.
    let mut partial = finished.clone();
    partial.status = RunStatus::Running;
    partial.train_accuracy = f64::NAN;
    partial.val_accuracy = f64::NAN;
    partial.confusion_matrix.clear();
    partial.train = None;
    partial.val = None;
    partial.history.truncate(1);
    let crashed = crashed_run(&head.dir, "head-linear-29991231-235959", &partial);
    let text = std::fs::read_to_string(crashed.join("metrics.json")).expect("read");
    assert!(
        text.contains("\"status\": \"running\"") && text.contains("\"train_accuracy\": null"),
        "{text}"
    );
    // read_metrics understands it (null -> NaN) ...
    let back = read_metrics(&crashed).expect("an unfinished file still reads");
    assert!(back.status == RunStatus::Running && back.val_accuracy.is_nan());
    // ... and an older file without `status` counts by its `finished` flag.
    let mut old: serde_json::Value = serde_json::from_str(&text).expect("json");
    old.as_object_mut().expect("object").remove("status");
    old["finished"] = serde_json::Value::Bool(false);
    let old_dir = head.dir.with_file_name("head-mlp-29991231-235958");
    std::fs::create_dir_all(&old_dir).expect("mkdir");
    std::fs::write(old_dir.join("metrics.json"), old.to_string()).expect("write");
    assert_eq!(
        read_metrics(&old_dir).expect("old format").status,
        RunStatus::Running
    );
    // And a run whose metrics.json is garbage.
    let garbled = head.dir.with_file_name("head-linear-29991231-235957");
    std::fs::create_dir_all(&garbled).expect("mkdir");
    std::fs::write(garbled.join("metrics.json"), "{\"model\": \"head\", ").expect("write");

    // predict passes over all three for the finished run.
    assert_eq!(
        pipeline::inference::predict::choose_run(&c).expect("a finished run"),
        head.dir
    );
    c.predict.input = Some(dir.join("images"));
    c.predict.output = Some(dir.join("out.csv"));
    let s = pipeline::inference::predict::run(&c).expect("predict uses the finished run");
    assert_eq!((s.images, &s.run), (12, &head.dir));

    // Naming the unfinished run is an error that says so.
    c.predict.run = Some(crashed.clone());
    let err = pipeline::inference::predict::run(&c)
        .expect_err("unfinished")
        .to_string();
    assert!(
        err.contains("head-linear-29991231-235959")
            && err.contains("unfinished")
            && err.contains("running"),
        "{err}"
    );
    c.predict.run = Some(garbled.clone());
    let err = pipeline::inference::predict::run(&c)
        .expect_err("garbled")
        .to_string();
    assert!(
        err.contains("head-linear-29991231-235957") && err.contains("metrics.json"),
        "{err}"
    );

    // Training commands reach their report: the head row comes from the finished run and the
    // report lists what it passed over.
    let cnn = train_cnn(&c).expect("train-cnn reports despite the unfinished runs");
    let report = std::fs::read_to_string(cnn.dir.join("report.md")).expect("report");
    let head_name = head
        .dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        report.contains("VGG16 + linear head")
            && report.contains(&format!("`{head_name}`"))
            && report.contains("Passed over")
            && report.contains("head-linear-29991231-235959")
            && report.contains("head-mlp-29991231-235958")
            && report.contains("head-linear-29991231-235957"),
        "{report}"
    );
    assert!(
        cnn.table.contains("CNN baseline") && cnn.table.contains("VGG16 + linear head"),
        "{}",
        cnn.table
    );
    // A second head run still trains and reports.
    let again = train_head(&c).expect("train-head again");
    assert_eq!(again.metrics.status, RunStatus::Finished);
}
