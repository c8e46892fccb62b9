//! Feature extraction: parity with the reference VGG16, the end-to-end run on the study's data,
//! store reuse / incremental updates / resume, and every bad input the extraction issue names.
//! (The store's own guarantees are in `tests/store.rs`, the binary's in
//! `crates/extract/tests/cli.rs`.)
//!
//! Store-logic tests use a generated dataset and seeded random VGG16 weights at a 32x32 input,
//! so they run in seconds and without `../shared`; the parity and end-to-end tests use the real
//! data and weights through `testkit::shared_dir`.

use candle_core::{Device, Tensor};
use pipeline::config::{Config, ConvAlgorithm, OnBadImage};
use pipeline::device::DeviceChoice;
use pipeline::features::BackboneOptions;
use pipeline::{Vgg16Features, Weights, WeightsSource};

use crate::common::{fixture, load, random_weights, shards};

fn extract(c: &Config) -> pipeline::features::extract::Summary {
    pipeline::features::extract::run(c).expect("extraction succeeds")
}

fn extract_err(c: &Config) -> String {
    match pipeline::features::extract::run(c) {
        Ok(s) => panic!("expected an error, got {s}"),
        Err(e) => e.to_string(),
    }
}

fn features(c: &Config) -> (Vec<Vec<f32>>, Vec<usize>, Vec<usize>) {
    let set = load(c).expect("features load");
    (set.features.to_vec2().expect("f32"), set.labels, set.rows)
}

#[test]
fn parity_with_reference_vgg16_pool5() {
    let Some(shared) = testkit::shared_dir("parity_with_reference_vgg16_pool5") else {
        return;
    };
    let weights = Weights::open(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"))
        .expect("weights");
    let load = |conv| {
        let options = BackboneOptions {
            conv,
            ..BackboneOptions::default()
        };
        Vgg16Features::load(&weights, &Device::Cpu, &options).expect("load")
    };
    let direct = load(ConvAlgorithm::Direct);
    let winograd2 = load(ConvAlgorithm::Winograd2x2);
    let winograd4 = load(ConvAlgorithm::Winograd4x4);
    let candle =
        Vgg16Features::load_candle(&weights, &Device::Cpu, candle_core::DType::F32, 1 << 30)
            .expect("load");
    for (engine, model) in [
        ("fast direct", &direct),
        ("fast winograd2x2", &winograd2),
        ("fast winograd4x4", &winograd4),
        ("candle", &candle),
    ] {
        for image in ["chelsea", "coffee"] {
            let (shape, input) =
                testkit::read_npy_f32(&shared.join(format!("reference/{image}_vgg16_input.npy")));
            let (_, expected) =
                testkit::read_npy_f32(&shared.join(format!("reference/{image}_vgg16_pool5.npy")));
            let x = Tensor::from_vec(input, shape, &Device::Cpu).expect("input");
            let got: Vec<f32> = model
                .forward(&x)
                .expect("forward")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let err = testkit::max_relative_error(&got, &expected);
            eprintln!("{engine} engine, {image}: max relative error {err:.2e}");
            assert!(
                err <= 1e-5,
                "{engine} engine, {image}: max relative error {err:e} > 1e-5"
            );
        }
    }
}

#[test]
fn extracts_a_subset_of_the_real_study_data() {
    let Some(shared) = testkit::shared_dir("extracts_a_subset_of_the_real_study_data") else {
        return;
    };
    let dir = testkit::temp_dir("e2e-real");
    let data = shared.join("data/emergency-vehicles");
    let mut c = Config::default();
    c.data.csv = Some(data.join("train.csv"));
    c.data.images = Some(data.join("images"));
    c.data.image_column = "image_names".into();
    c.data.label_column = "emergency_or_not".into();
    c.data.limit = Some(5);
    c.backbone.weights =
        WeightsSource::Local(shared.join("weights/vgg16-oxford-imagenet-features.safetensors"));
    c.extract.batch_size = 3;
    c.extract.device = DeviceChoice::Cpu;
    c.extract.out = dir.join("features");
    let summary = extract(&c);
    assert_eq!((summary.images, summary.computed), (5, 5));
    let set = load(&c).expect("load");
    assert_eq!(set.features.dims(), &[5, 25088]);
    // The first five rows of train.csv, in order.
    let csv = std::fs::read_to_string(data.join("train.csv")).expect("csv");
    let rows: Vec<(String, usize)> = csv
        .lines()
        .skip(1)
        .take(5)
        .map(|l| {
            let (n, y) = l.split_once(',').expect("two columns");
            (n.to_string(), y.trim().parse().expect("int label"))
        })
        .collect();
    assert_eq!(
        set.ids,
        rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()
    );
    assert_eq!(set.labels, rows.iter().map(|r| r.1).collect::<Vec<_>>());
    let m = &set.row_map;
    assert!(m.complete);
    assert_eq!((m.counts.stored, set.key.dim, m.counts.rows), (5, 25088, 5));
    assert_eq!(m.classes, vec!["0", "1"]);
    assert_eq!(
        set.key.weights_sha256,
        "bfdfb452d5b8b1fd3f9ad10a52668ad952959535ce95c73d886b6e6365fc58ae"
    );
    assert_eq!(set.key.preprocessing.mean, [123.68, 116.779, 103.939]);
    assert_eq!(set.key.preprocessing.input_scale, 255.0);
    // Features are post-ReLU max-pools: non-negative, and not all zero.
    let v: Vec<f32> = set
        .features
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    assert!(v.iter().all(|x| *x >= 0.0) && v.iter().any(|x| *x > 0.0));
    // One row map, one space, and the marker.
    let maps = std::fs::read_dir(c.extract.out.join("datasets"))
        .expect("datasets")
        .count();
    assert_eq!(maps, 1);
    assert!(c.extract.out.join("STORE.json").is_file());
    assert_eq!(shards(&c.extract.out).len(), 2, "5 rows in batches of 3");
}

#[test]
fn rerun_with_same_inputs_reuses_the_cache() {
    let (_dir, c) = fixture("reuse", 5);
    let first = extract(&c);
    assert_eq!((first.images, first.computed), (5, 5));
    let before = features(&c);
    let second = extract(&c);
    assert_eq!(
        (second.images, second.computed),
        (5, 0),
        "second run must reuse"
    );
    assert_eq!(features(&c), before);
    // String labels map to sorted class indices: ambulance = 0, car = 1.
    assert_eq!(before.1, vec![0, 1, 1, 0, 1]);
}

#[test]
fn changed_image_computes_that_image_and_new_weights_or_preprocessing_a_new_space() {
    let (dir, mut c) = fixture("invalidate", 4);
    extract(&c);
    let original = features(&c);
    // One image's bytes change: only that image is computed.
    let img = image::RgbImage::from_pixel(40, 30, image::Rgb([1, 2, 3]));
    img.save(dir.join("images/img002.png")).expect("save");
    let s = extract(&c);
    assert_eq!((s.computed, s.reused), (1, 3));
    let changed = features(&c);
    assert_ne!(changed.0[2], original.0[2]);
    assert_eq!(changed.0[0], original.0[0]);
    assert_eq!(changed.0[3], original.0[3]);
    // Preprocessing override: another space, everything computed.
    c.preprocess.mean = Some([0.0, 0.0, 0.0]);
    assert_eq!(extract(&c).computed, 4);
    // Other weights: another space too.
    let other = dir.join("other.safetensors");
    std::fs::copy(random_weights(), &other).expect("copy");
    let mut bytes = std::fs::read(&other).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&other, bytes).expect("write");
    c.backbone.weights = WeightsSource::Local(other.clone());
    assert_eq!(extract(&c).computed, 4);
    // A changed label changes the dataset's row map, not its features: nothing to compute.
    let csv = dir.join("labels.csv");
    let text = std::fs::read_to_string(&csv)
        .expect("csv")
        .replace("img001.png,car", "img001.png,ambulance");
    std::fs::write(&csv, text).expect("csv");
    assert_eq!(extract(&c).computed, 0);
    assert_eq!(features(&c).1, vec![0, 0, 1, 0]);
    // Back to the first weights and preprocessing: that space still holds everything.
    c.preprocess.mean = None;
    c.backbone.weights = WeightsSource::Local(random_weights().to_path_buf());
    assert_eq!(extract(&c).computed, 0);
    assert_eq!(features(&c).0, changed.0);
}

#[test]
fn interrupted_run_resumes_without_missing_or_duplicated_rows() {
    let (_dir, c) = fixture("resume", 7);
    extract(&c);
    let complete = features(&c);
    let plan = pipeline::features::extract::Plan::new(&c).expect("plan");
    let hash = |row: usize| plan.hashes[row].clone().expect("hash");
    let holding = |row: usize| {
        shards(&c.extract.out)
            .into_iter()
            .find(|(_, hashes)| hashes.contains(&hash(row)))
            .expect("a shard holds the row")
            .0
    };
    // The state a kill can leave: a row map not yet complete, a missing shard, a temporary
    // file from a write in progress, and (disk trouble) a truncated shard.
    let map_path = c
        .extract
        .out
        .join("datasets")
        .join(format!("{}.json", plan.view));
    let text = std::fs::read_to_string(&map_path).expect("row map");
    std::fs::write(
        &map_path,
        text.replace("\"complete\":true", "\"complete\":false"),
    )
    .expect("write");
    let second = holding(2);
    std::fs::remove_file(&second).expect("rm shard");
    let tmp = format!("{}.4242-0.tmp", second.display());
    std::fs::write(&tmp, b"partial").expect("tmp");
    let last = holding(6);
    let bytes = std::fs::read(&last).expect("read");
    std::fs::write(&last, &bytes[..bytes.len() - 1]).expect("truncate");
    let err = load(&c)
        .expect_err("an incomplete store must not load")
        .to_string();
    assert!(
        err.contains("incomplete") && err.contains("cargo run -p extract"),
        "{err}"
    );
    let resumed = extract(&c);
    assert_eq!(
        resumed.computed,
        2 + 1,
        "only the 2 rows of the removed shard and the 1 of the truncated one are redone"
    );
    let after = features(&c);
    assert_eq!(
        after.2,
        (0..7).collect::<Vec<_>>(),
        "every row exactly once, in order"
    );
    assert_eq!(after, complete);
    assert!(!std::path::Path::new(&tmp).exists());
    assert_eq!(shards(&c.extract.out).len(), 4);
}

#[test]
fn class_per_folder_dataset() {
    let dir = testkit::temp_dir("folders");
    for (class, n) in [("police", 2), ("bus", 3)] {
        std::fs::create_dir_all(dir.join("data").join(class)).expect("mkdir");
        for i in 0..n {
            image::RgbImage::from_pixel(8, 8, image::Rgb([i * 50, 10, 10]))
                .save(dir.join(format!("data/{class}/{i}.png")))
                .expect("png");
        }
    }
    std::fs::write(dir.join("data/notes.txt"), "not an image").expect("txt");
    let (_, mut c) = fixture("folders-cfg", 1);
    c.data.csv = None;
    c.data.images = None;
    c.data.root = Some(dir.join("data"));
    c.extract.out = dir.join("features");
    c.validate().expect("valid");
    assert_eq!(extract(&c).images, 5);
    let set = load(&c).expect("load");
    assert_eq!(set.row_map.classes, vec!["bus", "police"]);
    assert_eq!(set.labels, vec![0, 0, 0, 1, 1]);
    assert_eq!(set.ids[0], "bus/0.png");
}

#[test]
fn missing_image_is_an_error_naming_file_and_line() {
    let (dir, c) = fixture("missing", 3);
    std::fs::remove_file(dir.join("images/img001.png")).expect("rm");
    let err = extract_err(&c);
    assert!(
        err.contains("img001.png") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn undecodable_image_errors_or_is_skipped_and_listed() {
    let (dir, mut c) = fixture("undecodable", 5);
    std::fs::write(dir.join("images/img003.png"), b"this is not a png").expect("write");
    let err = extract_err(&c);
    assert!(
        err.contains("img003.png") && err.contains("line 5"),
        "{err}"
    );
    c.data.on_bad_image = OnBadImage::Skip;
    let s = extract(&c);
    assert_eq!((s.images, s.skipped), (4, 1));
    let set = load(&c).expect("load");
    assert_eq!(set.rows, vec![0, 1, 2, 4]);
    let skipped = set.row_map.skipped();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].0, "img003.png");
    assert!(skipped[0].1.contains("img003.png"), "{}", skipped[0].1);
    // A rerun knows the bad image by its content: nothing to decode or compute again.
    let again = extract(&c);
    assert_eq!((again.images, again.skipped, again.computed), (4, 1, 0));
    // A missing file is skipped the same way.
    std::fs::remove_file(dir.join("images/img000.png")).expect("rm");
    let s = extract(&c);
    assert_eq!((s.images, s.skipped), (3, 2));
    assert_eq!(load(&c).expect("load").rows, vec![1, 2, 4]);
}

#[test]
fn csv_without_the_named_column_is_an_error() {
    let (_dir, mut c) = fixture("column", 2);
    c.data.label_column = "emergency_or_not".into();
    let err = extract_err(&c);
    assert!(
        err.contains("emergency_or_not") && err.contains("labels.csv"),
        "{err}"
    );
}

#[test]
fn empty_dataset_is_an_error() {
    // Not "empty": the word below must come from the message, not the fixture's folder name.
    let (dir, c) = fixture("no-rows", 2);
    std::fs::write(dir.join("labels.csv"), "file,class\n").expect("csv");
    let err = extract_err(&c);
    assert!(err.contains("empty") && err.contains("labels.csv"), "{err}");
}

#[test]
fn label_outside_the_known_classes_is_an_error() {
    let (_dir, mut c) = fixture("label", 3);
    c.data.classes = Some(vec!["car".into(), "truck".into()]);
    let err = extract_err(&c);
    assert!(err.contains("ambulance") && err.contains("line 2"), "{err}");
}

#[test]
fn image_path_escaping_the_images_directory_is_an_error() {
    let (dir, c) = fixture("escape", 2);
    std::fs::write(
        dir.join("labels.csv"),
        "file,class\nimg000.png,car\n../labels.csv,car\n",
    )
    .expect("csv");
    let err = extract_err(&c);
    assert!(
        err.contains("../labels.csv") && err.contains("escapes") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn weights_of_the_wrong_shape_are_an_error_naming_the_tensor() {
    let (dir, mut c) = fixture("bad-weights", 2);
    let path = dir.join("bad.safetensors");
    testkit::write_vgg_weights(&path, |name, _| {
        (name == "features.7.weight").then(|| vec![128, 64, 3, 3])
    });
    c.backbone.weights = WeightsSource::Local(path.clone());
    let err = extract_err(&c);
    assert!(
        err.contains("features.7.weight") && err.contains("[128, 64, 3, 3]"),
        "{err}"
    );
    std::fs::write(&path, b"not safetensors").expect("write");
    let err = extract_err(&c);
    assert!(err.contains("bad.safetensors"), "{err}");
}

#[test]
fn unusual_colour_types_decode_to_rgb() {
    let fixtures = testkit::workspace_root().join("tests/fixtures");
    let p = pipeline::Preprocessing {
        input_size: 4,
        input_scale: 255.0,
        mean: [0.0; 3],
        std: [1.0; 3],
        channel_order: pipeline::config::ChannelOrder::Rgb,
        resize: pipeline::config::ResizeMode::Squash,
    };
    // cmyk.jpg is pure red (C=0, M=Y=255, K=0), written by Pillow.
    let red = p.load(&fixtures.join("cmyk.jpg")).expect("cmyk decodes");
    assert!(
        red[0] > 200.0 && red[16] < 50.0 && red[32] < 50.0,
        "{:?}",
        &red[..4]
    );
    for f in ["gray_alpha.png", "palette.png", "gray16.png"] {
        assert_eq!(p.load(&fixtures.join(f)).expect(f).len(), 48, "{f}");
    }
}

#[test]
fn hub_weights_resolve_from_the_local_hf_cache_without_network() {
    // hf-hub's cache layout: <HF_HOME>/hub/models--<owner>--<name>/{refs/main, snapshots/<rev>/}.
    let (_home, _hf) = crate::common::fake_hf_home("hf-home", |file| {
        std::fs::copy(random_weights(), file).expect("copy");
    });
    let source = WeightsSource::parse("hf:timm/vgg16.tv_in1k").expect("a hub source");
    let path = source.resolve().expect("found in the cache");
    assert!(
        path.ends_with("snapshots/0123abcd/model.safetensors"),
        "{}",
        path.display()
    );
    let known = source.known_preprocessing();
    assert_eq!(known.mean, Some(pipeline::data::IMAGENET_MEAN));
    assert_eq!(known.input_scale, Some(1.0));
    let (_dir, mut c) = fixture("hub", 3);
    c.backbone.weights = source.clone();
    let s = extract(&c);
    assert_eq!(s.images, 3);
    let m = load(&c).expect("load").row_map;
    assert_eq!(m.weights, "hf:timm/vgg16.tv_in1k");
    // A repository that is neither cached nor reachable is an error naming it.
    let missing = WeightsSource::parse("hf:nobody/absent-model").expect("a hub source");
    let err = missing
        .resolve()
        .expect_err("not cached, no network")
        .to_string();
    assert!(err.contains("nobody/absent-model"), "{err}");
}
