//! The `extract` binary as a user runs it: exit codes and messages for bad input, the feature
//! store reused whatever the working directory and path spelling, incremental updates, the
//! user's own files left alone, two processes at once, kill -9 at any moment, `--gc`, and the
//! upgrade of a format-1 cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pipeline::config::Config;

fn extract_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_extract"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run extract")
}

fn extract(args: &[&str]) -> Output {
    extract_in(Path::new("/"), args)
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_extract"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn extract")
}

/// 64x64 input, batch 2.
fn setup(test: &str, n: usize) -> (PathBuf, PathBuf) {
    crate::setup_sized(test, n, 64, 2)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs to success, or fails the test with the output.
fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    o
}

/// The number in the summary's "N computed now".
fn computed(o: &Output) -> usize {
    let out = stdout(o);
    out.split("extract: ")
        .nth(1)
        .and_then(|s| s.split(" computed now").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no summary line in {out:?}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn set_out(out: &Path) -> String {
    format!("extract.out={}", out.display())
}

/// Every file under `dir` (relative path -> bytes), the lock file left out.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
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
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The shard files of a store.
fn shard_files(out: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(spaces) = std::fs::read_dir(out.join("spaces")) else {
        return found;
    };
    for space in spaces.flatten() {
        for f in std::fs::read_dir(space.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            // The store's pattern: shard-<32 hex>.safetensors (not a user's shard-00000...).
            let hex = name
                .strip_prefix("shard-")
                .and_then(|r| r.strip_suffix(".safetensors"));
            if hex.is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit())) {
                found.push(f.path());
            }
        }
    }
    found.sort();
    found
}

/// The dataset's features as train-head loads them: (features, dataset rows).
fn load(config: &Path, overrides: &[String]) -> (Vec<Vec<f32>>, Vec<usize>) {
    let c = Config::load(config, overrides).expect("config");
    let plan = pipeline::features::extract::Plan::new(&c).expect("plan");
    let set = pipeline::features::extract::load_features(&c, &plan).expect("complete store");
    (set.features.to_vec2().expect("f32"), set.rows)
}

#[test]
fn unknown_config_key_exits_non_zero_naming_the_key() {
    let (_dir, config) = setup("cli-unknown-key", 2);
    let c = s(&config);
    let o = extract(&["--config", c, "--set", "extract.batchsize=4"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("extract.batchsize"), "{}", stderr(&o));
    let o = extract(&["--config", "/nonexistent/pipeline.toml"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/pipeline.toml"),
        "{}",
        stderr(&o)
    );
    let o = extract(&["--bogus"]);
    assert!(!o.status.success());
    let o = extract(&["--help"]);
    let help = stdout(&o);
    assert!(o.status.success() && help.contains("--set") && help.contains("--gc"));
}

#[test]
fn relative_paths_resolve_against_the_config_and_summary_is_printed() {
    let (dir, config) = setup("cli-summary", 3);
    let o = ok(extract(&["--config", s(&config)]));
    let out = stdout(&o);
    assert!(
        out.contains("3 computed now, 0 reused (of 3 rows, 3 unique images)")
            && out.contains("3 images stored")
            && out.contains("images/s")
            && out.contains("cpu"),
        "{out}"
    );
    assert!(dir.join("features/STORE.json").is_file());
    let again = ok(extract(&["--config", s(&config)]));
    assert!(stderr(&again).contains("up to date"), "{}", stderr(&again));
    assert_eq!(computed(&again), 0);
}

#[test]
fn working_directory_and_path_spelling_do_not_matter() {
    let (dir, config) = setup("cli-cwd", 5);
    // From the config's folder, with the relative name.
    let first = ok(extract_in(&dir, &["-c", "pipeline.toml"]));
    assert_eq!(computed(&first), 5);
    // From another folder, with the absolute path.
    let other = testkit::temp_dir("cli-cwd-elsewhere");
    let second = ok(extract_in(&other, &["-c", s(&config)]));
    assert_eq!(computed(&second), 0, "{}", stderr(&second));
    assert!(!stderr(&second).contains("rebuild"), "{}", stderr(&second));
    // From a sub-folder, through `..`, with other spellings of the same files in --set.
    let third = ok(extract_in(
        &dir.join("images"),
        &[
            "-c",
            "../pipeline.toml",
            "--set",
            "data.csv=./images/../labels.csv",
            "--set",
            "data.images=images/.",
            "--set",
            "extract.out=features/",
        ],
    ));
    assert_eq!(computed(&third), 0, "{}", stderr(&third));
    // Through a symbolic link to the folder.
    #[cfg(unix)]
    {
        let link = other.join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        let fourth = ok(extract_in(&other, &["-c", "link/pipeline.toml"]));
        assert_eq!(computed(&fourth), 0, "{}", stderr(&fourth));
    }
    // One dataset view throughout, and train-head finds it from anywhere.
    let maps = std::fs::read_dir(dir.join("features/datasets"))
        .expect("datasets")
        .count();
    assert_eq!(maps, 1);
    let (_, rows) = load(&config, &[]);
    assert_eq!(rows, vec![0, 1, 2, 3, 4]);
    let text = std::fs::read_to_string(
        dir.join("features/datasets")
            .read_dir()
            .expect("d")
            .flatten()
            .next()
            .expect("map")
            .path(),
    )
    .expect("row map");
    let canonical = dir.canonicalize().expect("canonical");
    assert!(
        text.contains(&canonical.join("labels.csv").display().to_string()),
        "the row map records canonical paths: {text}"
    );
}

#[test]
fn foreign_folder_is_an_error_and_left_byte_for_byte_untouched() {
    let (dir, config) = setup("cli-foreign", 2);
    let out = dir.join("mine");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("manifest.json"), "{\"my\": \"own manifest\"}\n").expect("w");
    std::fs::write(out.join("notes.tmp"), "notes I keep here").expect("w");
    std::fs::write(
        out.join("shard-00000.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    )
    .expect("w");
    let before = files(&out);
    let o = extract(&["-c", s(&config), "--set", &set_out(&out)]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&out.display().to_string())
            && err.contains("manifest.json")
            && err.contains("notes.tmp")
            && err.contains("not a feature store"),
        "{err}"
    );
    assert_eq!(files(&out), before, "every file as it was");
    assert!(!out.join(".lock").exists() && !out.join("STORE.json").exists());
    // gc refuses it the same way.
    let o = extract(&["-c", s(&config), "--set", &set_out(&out), "--gc"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a feature store"), "{}", stderr(&o));
    assert_eq!(files(&out), before);
    // A file where the folder should be.
    let o = extract(&["-c", s(&config), "--set", &set_out(&out.join("notes.tmp"))]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("notes.tmp"), "{}", stderr(&o));
    assert_eq!(files(&out), before);
}

#[test]
fn appended_row_and_changed_image_compute_only_those_images() {
    let (dir, config) = crate::setup_sized("cli-incremental", 300, 32, 128);
    let c = s(&config);
    assert_eq!(computed(&ok(extract(&["-c", c]))), 300);
    // Two more distinct images from a larger generated set.
    let spare = testkit::temp_dir("cli-incremental-spare");
    testkit::write_dataset(&spare, 302);
    std::fs::copy(
        spare.join("images/img300.png"),
        dir.join("images/img300.png"),
    )
    .expect("cp");
    let csv = dir.join("labels.csv");
    let mut text = std::fs::read_to_string(&csv).expect("csv");
    text.push_str("img300.png,car\n");
    std::fs::write(&csv, &text).expect("csv");
    let o = ok(extract(&["-c", c]));
    assert!(
        stdout(&o).contains("1 computed now, 300 reused (of 301 rows, 301 unique images)"),
        "{}",
        stdout(&o)
    );
    // One image's bytes change.
    std::fs::copy(
        spare.join("images/img301.png"),
        dir.join("images/img150.png"),
    )
    .expect("cp");
    let o = ok(extract(&["-c", c]));
    assert_eq!(computed(&o), 1, "{}", stdout(&o));
    // Rows removed: nothing to compute.
    let kept: String = text
        .lines()
        .take(1 + 250)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&csv, kept).expect("csv");
    let o = ok(extract(&["-c", c]));
    assert_eq!(computed(&o), 0, "{}", stdout(&o));
    // The result equals a clean extraction of the final dataset.
    let clean = dir.join("clean");
    ok(extract(&["-c", c, "--set", &set_out(&clean)]));
    assert_eq!(load(&config, &[]), load(&config, &[set_out(&clean)]));
}

#[test]
fn two_concurrent_extracts_one_waits_both_succeed_and_the_store_equals_a_clean_run() {
    let (dir, config) = crate::setup_sized("cli-concurrent", 48, 96, 2);
    let c = s(&config);
    let reference = dir.join("reference");
    ok(extract(&["-c", c, "--set", &set_out(&reference)]));
    let out = dir.join("shared-store");
    let out_arg = set_out(&out);
    let mut a = spawn(&["-c", c, "--set", &out_arg]);
    // Start the second once the first holds the lock (it writes the row map under it).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("datasets").exists() {
        assert!(
            Instant::now() < deadline,
            "first extract never took the lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        a.try_wait().expect("status").is_none(),
        "the first extract finished before the second started: make the dataset larger"
    );
    let b = spawn(&["-c", c, "--set", &out_arg]);
    // (Whether the first process has exited when the second finishes is up to the scheduler:
    // it releases the lock before printing its summary. The second's wait and its "0 computed"
    // are what show the two were serialised.)
    let b = b.wait_with_output().expect("second");
    let a = a.wait_with_output().expect("first");
    let (a, b) = (ok(a), ok(b));
    assert!(
        stderr(&b).contains("waiting for") && stderr(&b).contains(".lock"),
        "{}",
        stderr(&b)
    );
    assert_eq!((computed(&a), computed(&b)), (48, 0));
    assert_eq!(
        files(&out),
        files(&reference),
        "equal to a clean run, byte for byte"
    );
}

#[test]
fn killed_at_any_moment_then_rerun_gives_the_complete_correct_store() {
    let (dir, config) = setup("cli-kill", 40);
    let c = s(&config);
    let reference = dir.join("reference");
    ok(extract(&["-c", c, "--set", &set_out(&reference)]));
    let expected = files(&reference);
    let total = shard_files(&reference).len();
    assert_eq!(total, 20);
    let out = dir.join("killed");
    let out_arg = set_out(&out);
    enum Kill {
        After(Duration),
        AfterShards(usize),
    }
    let kills = [
        Kill::After(Duration::from_millis(5)),
        Kill::After(Duration::from_millis(80)),
        Kill::AfterShards(1),
        Kill::AfterShards(1),
        Kill::AfterShards(2),
        Kill::AfterShards(1),
    ];
    for (i, kill) in kills.iter().enumerate() {
        let before = shard_files(&out).len();
        let mut child = Command::new(env!("CARGO_BIN_EXE_extract"))
            .args(["-c", c, "--set", &out_arg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        match kill {
            Kill::After(d) => std::thread::sleep(*d),
            Kill::AfterShards(n) => {
                let deadline = Instant::now() + Duration::from_secs(120);
                while shard_files(&out).len() < before + n {
                    assert!(Instant::now() < deadline, "kill {i}: no progress");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        assert!(
            child.try_wait().expect("status").is_none(),
            "kill {i} landed after the run had finished"
        );
        child.kill().expect("SIGKILL: no chance to clean up");
        let _ = child.wait();
    }
    let done = shard_files(&out).len();
    assert!(
        0 < done && done < total,
        "{done} of {total} shards before the rerun"
    );
    let o = ok(extract(&["-c", c, "--set", &out_arg]));
    let n = computed(&o);
    assert!(
        0 < n && n < 40,
        "the rerun resumed: {n} of 40 computed\n{}",
        stderr(&o)
    );
    assert_eq!(files(&out), expected, "byte-identical to a clean run");
}

#[test]
fn gc_frees_exactly_the_unreferenced_shards_and_nothing_foreign() {
    let (dir, config) = setup("cli-gc", 6);
    let c = s(&config);
    let out = dir.join("features");
    ok(extract(&["-c", c]));
    let all = shard_files(&out);
    assert_eq!(all.len(), 3);
    let space = all[0].parent().expect("space").to_owned();
    let foreign = [
        out.join("my-notes.txt"),
        space.join("notes.txt"),
        space.join("shard-00000.safetensors"),
        out.join("datasets/readme.md"),
    ];
    for f in &foreign {
        std::fs::write(f, "mine").expect("write");
    }
    // Nothing is unreferenced yet.
    let o = ok(extract(&["-c", c, "--gc"]));
    assert!(stdout(&o).contains("freed 0 files"), "{}", stdout(&o));
    // The last two rows leave the dataset: their shard is no longer referenced.
    let csv = dir.join("labels.csv");
    let text = std::fs::read_to_string(&csv).expect("csv");
    let kept: String = text.lines().take(1 + 4).map(|l| format!("{l}\n")).collect();
    std::fs::write(&csv, kept).expect("csv");
    assert_eq!(computed(&ok(extract(&["-c", c]))), 0);
    assert_eq!(shard_files(&out), all, "extract alone deletes nothing");
    let o = ok(extract(&["-c", c, "--gc"]));
    assert!(
        stdout(&o).contains("freed 1 files (1 shards") && stdout(&o).contains("kept 2 shards"),
        "{}",
        stdout(&o)
    );
    let left = shard_files(&out);
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|p| all.contains(p)));
    for f in &foreign {
        assert_eq!(std::fs::read_to_string(f).expect("still there"), "mine");
    }
    assert_eq!(load(&config, &[]).1, vec![0, 1, 2, 3]);
    // Nothing to collect in an absent folder.
    let o = extract(&["-c", c, "--set", &set_out(&dir.join("absent")), "--gc"]);
    assert!(!o.status.success());
    assert!(!dir.join("absent").exists());
}

/// SHA-256 (hex) of bytes, through the pipeline's own content hashing.
fn sha256(bytes: &[u8], scratch: &Path) -> String {
    let file = scratch.join("hash-me");
    std::fs::write(&file, bytes).expect("write");
    let sample = pipeline::Sample {
        id: "x".into(),
        path: file,
        label: None,
        line: 0,
    };
    pipeline::data::content_hashes(&[sample])
        .remove(0)
        .expect("hash")
}

/// A minimal safetensors file whose metadata is `{"key": key}`.
fn v1_shard(key: &str) -> Vec<u8> {
    let header = format!(
        "{{\"__metadata__\":{{\"key\":\"{key}\",\"shard\":\"0\"}},\"features\":{{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[0,4]}}}}"
    );
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend([0u8; 4]);
    b
}

/// Writes a format-1 cache (manifest, two shards, leftover temporaries) into `out`.
fn write_v1(out: &Path, scratch: &Path, digest_override: Option<&str>) {
    std::fs::create_dir_all(out).expect("mkdir");
    let key = format!(
        "{{\"format\":1,\"dataset_fingerprint\":\"{}\",\"dataset_source\":\"labels.csv\",\
         \"classes\":[\"ambulance\",\"car\"],\"rows\":3,\"backbone\":\"vgg16\",\"weights\":\"w.safetensors\",\
         \"weights_sha256\":\"{}\",\"preprocessing\":{{\"input_size\":64,\"input_scale\":255.0,\
         \"mean\":[123.68,116.779,103.939],\"std\":[1.0,1.0,1.0],\"channel_order\":\"RGB\",\
         \"resize\":\"squash\"}},\"dtype\":\"f32\",\"shard_rows\":2}}",
        "ab".repeat(32),
        "cd".repeat(32)
    );
    let digest = sha256(key.as_bytes(), scratch)[..16].to_string();
    let manifest = format!(
        "{{\"key\":{key},\"complete\":true,\"dim\":2048,\"count\":3,\"skipped\":[],\"written_by\":\"pipeline 0.1.0\"}}"
    );
    std::fs::write(out.join("manifest.json"), manifest).expect("manifest");
    let shard_key = digest_override.unwrap_or(&digest);
    std::fs::write(out.join("shard-00000.safetensors"), v1_shard(shard_key)).expect("shard");
    std::fs::write(out.join("shard-00001.safetensors"), v1_shard(&digest)).expect("shard");
    std::fs::write(out.join("shard-00002.safetensors.tmp"), b"partial").expect("tmp");
    std::fs::write(out.join("manifest.json.tmp"), b"{").expect("tmp");
}

#[test]
fn format_1_cache_is_rebuilt_with_a_message_and_anything_else_is_foreign() {
    let (dir, config) = setup("cli-v1", 3);
    let c = s(&config);
    let out = dir.join("features");
    write_v1(&out, &dir, None);
    let o = ok(extract(&["-c", c]));
    assert!(
        stderr(&o).contains(&format!(
            "old feature cache (format 1) in {}: rebuilding it in format 2",
            out.display()
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(computed(&o), 3);
    let names: Vec<String> = files(&out).into_keys().collect();
    assert!(
        names
            .iter()
            .all(|n| n == "STORE.json" || n.starts_with("spaces/") || n.starts_with("datasets/")),
        "{names:?}"
    );
    assert_eq!(load(&config, &[]).1, vec![0, 1, 2]);
    // A format-1 cache plus a file of the user's: foreign, untouched.
    let mixed = dir.join("mixed");
    write_v1(&mixed, &dir, None);
    std::fs::write(mixed.join("thesis.pdf"), "precious").expect("w");
    let before = files(&mixed);
    let o = extract(&["-c", c, "--set", &set_out(&mixed)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("thesis.pdf"), "{}", stderr(&o));
    assert_eq!(files(&mixed), before);
    // A shard made for another key is not part of that cache: foreign too.
    let other = dir.join("other-key");
    write_v1(&other, &dir, Some("0123456789abcdef"));
    let before = files(&other);
    let o = extract(&["-c", c, "--set", &set_out(&other)]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("shard-00000.safetensors"),
        "{}",
        stderr(&o)
    );
    assert_eq!(files(&other), before);
}
