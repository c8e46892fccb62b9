//! The feature store's guarantees, through the library: readers that never panic on corrupt or
//! hostile bytes (a seeded mutation test), deterministic bytes, duplicates computed once, the
//! lock against readers, what train-head says about a store that lacks rows, and predict
//! reusing and filling the store. The binary's behaviour (cwd, foreign folders, concurrent
//! processes, kill -9, gc, the format-1 upgrade) is in `crates/extract/tests/cli.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{files, fixture, load, shards};
use pipeline::config::{Config, FeatureDType};
use pipeline::features::store::shard;
use pipeline::features::store::{CacheKey, Marker, RowMap, Store};
use pipeline::training::Rng;

fn extract(c: &Config) -> pipeline::features::extract::Summary {
    pipeline::features::extract::run(c).expect("extraction succeeds")
}

// ---------------------------------------------------------------------------------------------
// Mutation ("fuzz") test of every reader.

/// Values a JSON field edit puts in place of a field.
fn strange_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(14) {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(0),
        3 => json!(1e308),
        4 => json!(u64::MAX),
        5 => json!("x"),
        6 => json!([]),
        7 => json!({}),
        8 => json!(true),
        9 => json!("a".repeat(5000)),
        10 => json!("0123456789abcdef".repeat(4)),
        11 => json!([1, 2, 3]),
        12 => json!(2),
        _ => json!(-0.0),
    }
}

/// Replaces, deletes or adds one field somewhere in a JSON value.
fn edit_json(v: &mut serde_json::Value, rng: &mut Rng) {
    use serde_json::Value;
    match v {
        Value::Object(map) if !map.is_empty() && rng.below(4) != 0 => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = &keys[rng.below(keys.len())];
            match rng.below(5) {
                0 => {
                    map.remove(k);
                }
                1 => {
                    map.insert(format!("{k}_extra"), strange_value(rng));
                }
                2 => {
                    map.insert(k.clone(), strange_value(rng));
                }
                _ => {
                    if let Some(inner) = map.get_mut(k) {
                        edit_json(inner, rng);
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() && rng.below(4) != 0 => {
            let i = rng.below(items.len());
            match rng.below(4) {
                0 => {
                    items.remove(i);
                }
                1 => items.push(items[i].clone()),
                2 => items[i] = strange_value(rng),
                _ => edit_json(&mut items[i], rng),
            }
        }
        Value::String(s) if rng.below(2) == 0 => {
            // A JSON document inside a string (the shard's metadata): edit that too.
            if let Ok(mut inner) = serde_json::from_str::<Value>(s) {
                edit_json(&mut inner, rng);
                *s = inner.to_string();
            } else {
                *v = strange_value(rng);
            }
        }
        _ => *v = strange_value(rng),
    }
}

/// One random mutation: bit flips, truncation, insertion, deletion, special bytes, or a JSON
/// field edit (of the whole text, or of a safetensors header with its length prefix redone).
fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let pos = |rng: &mut Rng, len: usize| rng.below(len.max(1));
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                if !b.is_empty() {
                    let i = pos(rng, b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => b.truncate(pos(rng, b.len())),
        2 => {
            let i = pos(rng, b.len() + 1).min(b.len());
            let n = 1 + rng.below(16);
            let insert: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            b.splice(i..i, insert);
        }
        3 => {
            let i = pos(rng, b.len());
            let j = (i + 1 + rng.below(32)).min(b.len());
            if i < j {
                b.drain(i..j);
            }
        }
        4 => {
            let special = [0u8, 0xff, b'{', b'}', b'"', b'9', b'-', b' ', b'\\'];
            if !b.is_empty() {
                let i = pos(rng, b.len());
                b[i] = special[rng.below(special.len())];
            }
        }
        _ => {
            // Whole-text JSON, or a safetensors header after its 8-byte length.
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&b) {
                edit_json(&mut v, rng);
                return serde_json::to_vec(&v).unwrap_or_default();
            }
            let n = b
                .get(..8)
                .map(|l| u64::from_le_bytes(l.try_into().unwrap_or([0; 8])) as usize);
            if let Some(n) = n.filter(|&n| 8 + n <= b.len()) {
                if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&b[8..8 + n]) {
                    edit_json(&mut v, rng);
                    let header = serde_json::to_vec(&v).unwrap_or_default();
                    let mut out = (header.len() as u64).to_le_bytes().to_vec();
                    out.extend(header);
                    out.extend_from_slice(&b[8 + n..]);
                    return out;
                }
            }
            b.truncate(pos(rng, b.len()));
        }
    }
    b
}

/// Feeds `iterations` mutated versions of `valid` to `read`; every call must return (no panic).
/// Returns how many were accepted, and checks that some were refused.
fn fuzz(
    name: &str,
    valid: &[u8],
    iterations: usize,
    seed: u64,
    read: impl Fn(&[u8]) -> bool,
) -> usize {
    assert!(read(valid), "{name}: the unmutated input must be accepted");
    let mut rng = Rng::new(seed);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..iterations {
        let mut input = mutate(valid, &mut rng);
        for _ in 0..rng.below(3) {
            input = mutate(&input, &mut rng);
        }
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&input)))
            .unwrap_or_else(|_| {
                panic!(
                    "{name}: reader panicked on mutation {i} (seed {seed}): {:?}",
                    String::from_utf8_lossy(&input[..input.len().min(400)])
                )
            });
        if ok {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    eprintln!("{name}: {accepted} mutations accepted, {refused} refused");
    assert!(
        refused >= iterations / 4,
        "{name}: only {refused} of {iterations} mutations refused"
    );
    accepted
}

#[test]
fn readers_return_errors_never_panic_on_thousands_of_mutated_inputs() {
    let start = Instant::now();
    let path = Path::new("mutated");
    // The marker.
    let marker = serde_json::to_vec(&Marker::current()).expect("json");
    fuzz("marker", &marker, 3000, 1, |b| {
        Marker::parse(b, path).is_ok()
    });
    // space.json.
    let key = pipeline::features::store::example_key(64, "f16");
    fuzz("space.json", &key.canonical_json(), 4000, 2, |b| {
        CacheKey::from_json(b, path).is_ok()
    });
    // A row map (with a skipped row and a duplicate) that validates.
    let rows: Vec<pipeline::features::store::Row> = (0..12)
        .map(|i| pipeline::features::store::Row {
            id: format!("img{i}.png"),
            label: Some(i % 2),
            hash: (i != 5).then(|| format!("{:064x}", i % 10)),
            skipped: (i == 5).then(|| "unreadable".to_string()),
        })
        .collect();
    let classes = vec!["a".to_string(), "b".to_string()];
    let map = RowMap {
        format: 2,
        kind: "dataset".into(),
        source: "csv /x images /y".into(),
        space: key.id(),
        weights: "w.safetensors".into(),
        fingerprint: pipeline::features::store::rowmap::fingerprint(&classes, &rows),
        classes,
        batch_size: 4,
        views: vec!["original".into()],
        complete: true,
        counts: pipeline::features::store::rowmap::count(&rows),
        rows,
        written_by: "test".into(),
    };
    let map_bytes = map.to_json();
    let accepted = fuzz("row map", &map_bytes, 4000, 3, |b| {
        RowMap::from_json(b, path).is_ok()
    });
    // Edits that keep a row map valid are rare (the fingerprint covers the rows).
    assert!(accepted < 4000);
    // A shard: full decode (checksum) and header-only decode.
    let space = key.id();
    let hashes: Vec<String> = (0..3).map(|i| format!("{:064x}", i + 1)).collect();
    let data: Vec<u8> = (0..3 * key.dim * 2).map(|i| (i % 251) as u8).collect();
    let (_, shard_bytes, _) = shard::encode(&key, &space, hashes, &data).expect("encode");
    fuzz("shard", &shard_bytes, 4000, 4, |b| {
        shard::decode(b, &key, &space).is_ok()
    });
    fuzz("shard header", &shard_bytes, 4000, 5, |b| {
        shard::decode_header(b, b.len() as u64, &key, &space).is_ok()
    });
    // Header-only reads of files, as the index does them.
    let dir = testkit::temp_dir("fuzz-files");
    let file = dir.join("shard.safetensors");
    fuzz("shard file", &shard_bytes, 400, 6, |b| {
        std::fs::write(&file, b).expect("write");
        matches!(shard::read_header(&file, &key, &space), Ok(Ok(_)))
    });
    let elapsed = start.elapsed();
    eprintln!("mutation test: {:.2} s", elapsed.as_secs_f64());
    assert!(
        elapsed < Duration::from_secs(60),
        "too slow for CI: {elapsed:?}"
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn same_inputs_give_byte_identical_stores() {
    let (dir, mut c) = fixture("deterministic", 9);
    c.extract.dtype = FeatureDType::F16;
    c.extract.out = dir.join("first");
    extract(&c);
    c.extract.out = dir.join("second");
    extract(&c);
    let (a, b) = (files(&dir.join("first")), files(&dir.join("second")));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same file names"
    );
    assert_eq!(a, b, "same bytes");
    assert_eq!(
        shards(&dir.join("first")).len(),
        5,
        "9 images in batches of 2"
    );
    // Each shard is a standard safetensors file with exactly one metadata key.
    for (path, hashes) in shards(&dir.join("first")) {
        let bytes = std::fs::read(&path).expect("shard");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors");
        let m = meta.metadata().clone().expect("metadata");
        assert_eq!(m.keys().collect::<Vec<_>>(), vec!["pipeline"]);
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let t = st.tensor("features").expect("features");
        assert_eq!(t.shape(), [hashes.len(), 512]);
        assert_eq!(t.dtype(), safetensors::Dtype::F16);
    }
    // Rewriting the same store (delete everything, extract again) gives the same bytes too.
    std::fs::remove_dir_all(dir.join("second")).expect("rm");
    extract(&c);
    assert_eq!(files(&dir.join("second")), a);
}

#[test]
fn byte_identical_images_are_computed_once() {
    let (dir, c) = fixture("duplicates", 4);
    // Rows 4..8 repeat images 0 and 1 under other names, and row 8 repeats row 0's name.
    for (copy, of) in [("dup-a.png", 0), ("dup-b.png", 1), ("dup-c.png", 0)] {
        std::fs::copy(
            dir.join(format!("images/img00{of}.png")),
            dir.join(format!("images/{copy}")),
        )
        .expect("copy");
    }
    let mut csv = std::fs::read_to_string(dir.join("labels.csv")).expect("csv");
    csv.push_str("dup-a.png,car\ndup-b.png,car\ndup-c.png,ambulance\nimg000.png,ambulance\n");
    std::fs::write(dir.join("labels.csv"), csv).expect("csv");
    let s = extract(&c);
    assert_eq!((s.rows, s.unique, s.computed, s.images), (8, 4, 4, 8));
    let set = load(&c).expect("load");
    let rows: Vec<Vec<f32>> = set.features.to_vec2().expect("f32");
    assert_eq!(rows.len(), 8);
    assert_eq!(rows[4], rows[0]);
    assert_eq!(rows[5], rows[1]);
    assert_eq!(rows[6], rows[0]);
    assert_eq!(rows[7], rows[0]);
    assert_ne!(rows[1], rows[0]);
    let stored: usize = shards(&c.extract.out).iter().map(|s| s.1.len()).sum();
    assert_eq!(stored, 4, "each distinct image stored once");
}

#[test]
fn readers_wait_for_a_writer_and_give_up_after_lock_timeout() {
    let (_dir, mut c) = fixture("lock", 3);
    extract(&c);
    c.extract.lock_timeout = Some(1);
    let writer = Store::open_exclusive(&c.extract.out, None, "test").expect("lock");
    let start = Instant::now();
    let err = load(&c).expect_err("lock held").to_string();
    assert!(
        err.contains(".lock") && err.contains("lock_timeout"),
        "{err}"
    );
    assert!(start.elapsed() >= Duration::from_secs(1));
    // A second writer waits too.
    let err = pipeline::features::extract::run(&c)
        .expect_err("lock held")
        .to_string();
    assert!(err.contains("still locked"), "{err}");
    drop(writer);
    // Readers share: two at once are fine, and a writer waits for both.
    let r1 = Store::open_shared(&c.extract.out, None, "test")
        .expect("shared")
        .expect("store");
    let r2 = Store::open_shared(&c.extract.out, Some(Duration::ZERO), "test").expect("shared");
    assert!(r2.is_some());
    assert!(Store::open_exclusive(&c.extract.out, Some(Duration::ZERO), "test").is_err());
    drop((r1, r2));
    assert_eq!(load(&c).expect("free again").rows, vec![0, 1, 2]);
}

#[test]
fn train_head_names_what_the_store_lacks_and_refuses_corrupt_row_maps() {
    let (_dir, mut c) = fixture("lacking", 7);
    c.extract.batch_size = 3;
    extract(&c);
    let plan = pipeline::features::extract::Plan::new(&c).expect("plan");
    // The shard of batch 1 (rows 3..6) disappears.
    let (path, _) = shards(&c.extract.out)
        .into_iter()
        .find(|(_, h)| h.contains(plan.hashes[4].as_ref().expect("hash")))
        .expect("shard");
    std::fs::remove_file(&path).expect("rm");
    let err = load(&c).expect_err("lacking").to_string();
    assert!(
        err.contains("3 of 7 images")
            && err.contains("batch 1")
            && err.contains("cargo run -p extract"),
        "{err}"
    );
    assert_eq!(extract(&c).computed, 3);
    // `batch_size: 0` (the old `shard_rows: 0` crash) and other edits: an error naming the file.
    let map_path = c
        .extract
        .out
        .join("datasets")
        .join(format!("{}.json", plan.view));
    let text = std::fs::read_to_string(&map_path).expect("row map");
    for (from, to) in [
        ("\"batch_size\":3", "\"batch_size\":0"),
        ("\"label\":1", "\"label\":7"),
        ("\"stored\":7", "\"stored\":8"),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(&map_path, text.replacen(from, to, 1)).expect("edit");
        let err = load(&c).expect_err("corrupt row map").to_string();
        assert!(err.contains(&map_path.display().to_string()), "{err}");
    }
    std::fs::write(&map_path, &text).expect("restore");
    // A shard whose bytes were altered: train-head refuses it by checksum, extract recomputes.
    let (victim, _) = shards(&c.extract.out)
        .into_iter()
        .find(|(_, h)| h.contains(plan.hashes[0].as_ref().expect("hash")))
        .expect("shard of batch 0");
    let mut bytes = std::fs::read(&victim).expect("shard");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, bytes).expect("write");
    let err = load(&c).expect_err("corrupt shard").to_string();
    assert!(
        err.contains("checksum") && err.contains(&victim.display().to_string()),
        "{err}"
    );
    assert_eq!(extract(&c).computed, 3);
    assert_eq!(load(&c).expect("repaired").rows, (0..7).collect::<Vec<_>>());
}

#[test]
fn predict_reuses_the_store_and_adds_what_it_computes() {
    let (dir, mut c) = fixture("predict-store", 8);
    c.split.val_fraction = 0.25;
    c.head.train.epochs = 1;
    c.output.runs = dir.join("runs");
    extract(&c);
    pipeline::training::study::train_head(&c).expect("train-head");
    let before = shards(&c.extract.out).len();
    // Images of the dataset are in the store already.
    c.predict.input = Some(dir.join("images"));
    c.predict.output = Some(dir.join("out.csv"));
    let s = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!((s.images, s.from_store, s.computed), (8, 8, 0));
    let first = std::fs::read_to_string(dir.join("out.csv")).expect("csv");
    // New images are computed once, then found.
    let new = dir.join("new");
    std::fs::create_dir_all(&new).expect("mkdir");
    for i in 0..3u8 {
        image::RgbImage::from_pixel(20, 20, image::Rgb([i * 80, 10, 200]))
            .save(new.join(format!("n{i}.png")))
            .expect("png");
    }
    std::fs::copy(dir.join("images/img003.png"), new.join("old.png")).expect("copy");
    c.predict.input = Some(new.clone());
    c.predict.output = Some(dir.join("new.csv"));
    let s = pipeline::inference::predict::run(&c).expect("predict new");
    assert_eq!((s.images, s.from_store, s.computed), (4, 1, 3));
    let computed_csv = std::fs::read_to_string(dir.join("new.csv")).expect("csv");
    assert_eq!(
        shards(&c.extract.out).len(),
        before + 2,
        "3 images in batches of 2"
    );
    let s = pipeline::inference::predict::run(&c).expect("predict again");
    assert_eq!((s.from_store, s.computed), (4, 0));
    // Stored and computed features give the very same predictions.
    assert_eq!(
        std::fs::read_to_string(dir.join("new.csv")).expect("csv"),
        computed_csv
    );
    c.predict.input = Some(dir.join("images"));
    c.predict.output = Some(dir.join("out.csv"));
    pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!(
        std::fs::read_to_string(dir.join("out.csv")).expect("csv"),
        first
    );
    // gc keeps what predict stored (its row map references it).
    let store = Store::open_exclusive(&c.extract.out, None, "test").expect("lock");
    let report = store.gc("test").expect("gc");
    assert_eq!(report.freed_shards, 0, "{report}");
    drop(store);
    // Without a store, predict computes everything and says so; nothing is created.
    let mut run_config = pipeline::reporting::runs::read_config(
        &pipeline::inference::predict::choose_run(&c).expect("run"),
    )
    .expect("config");
    run_config.extract.out = dir.join("no-store");
    let run = pipeline::inference::predict::choose_run(&c).expect("run");
    let toml = toml::to_string(&run_config).expect("toml");
    std::fs::write(run.join("config.toml"), toml).expect("write");
    let s = pipeline::inference::predict::run(&c).expect("predict without store");
    assert_eq!((s.from_store, s.computed), (0, 8));
    assert!(!dir.join("no-store").exists());
    assert_eq!(
        std::fs::read_to_string(dir.join("out.csv")).expect("csv"),
        first
    );
}

#[test]
fn default_space_id_is_pinned_and_pool4_is_another_space() {
    use pipeline::features::store::Layer;
    let key = pipeline::features::store::example_key(224, "f32");
    // The id of the space every store made before `layer` existed: unchanged, so existing
    // stores and runs stay valid.
    assert_eq!(key.id(), "5f7487a65eb3950e");
    assert!(!String::from_utf8_lossy(&key.canonical_json()).contains("layer"));
    let pool4 = CacheKey {
        layer: Layer::Pool4,
        dim: 512 * 14 * 14,
        ..key.clone()
    };
    assert_ne!(pool4.id(), key.id());
    assert!(String::from_utf8_lossy(&pool4.canonical_json()).contains("\"layer\":\"pool4\""));
    assert_eq!(pool4.differences(&key), vec!["dim", "layer"]);
    // Read back from JSON: validated, dims checked against the layer.
    let path = std::path::Path::new("space.json");
    assert_eq!(
        CacheKey::from_json(&pool4.canonical_json(), path).expect("valid"),
        pool4
    );
    assert_eq!(
        CacheKey::from_json(&key.canonical_json(), path).expect("valid"),
        key
    );
    let wrong_dim = CacheKey {
        dim: key.dim,
        ..pool4.clone()
    };
    assert!(CacheKey::from_json(&wrong_dim.canonical_json(), path).is_err());
    let not_vgg = CacheKey {
        backbone: "efficientnet_lite0".into(),
        ..pool4
    };
    let err = CacheKey::from_json(&not_vgg.canonical_json(), path).expect_err("no pool4");
    assert!(err.to_string().contains("space.json"), "{err}");
}
