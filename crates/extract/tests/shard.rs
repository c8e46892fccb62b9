//! `extract` as one task of N, as schedulers run it: the part from a Slurm array's or a
//! Kubernetes Indexed Job's variables (and the log saying so), malformed ones refused with the
//! variables named, the same part in two processes at once, the Slurm recipe's scripts
//! (`scripts/slurm/extract.sbatch` run as array tasks without Slurm, `submit.sh` against a
//! stand-in `sbatch`), and the Kubernetes manifests against the Kubernetes schemas (offline,
//! with `kubernetes-validate` from PyPI: `.venv-k8s/bin` or `PATH`; without it the test prints
//! `SKIPPED`, a failure under `PIPELINE_REQUIRE_SHARED=1`). The recipe against a real Slurm
//! is `scripts/slurm/test_slurm.sh` (CI runs it).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The variables a scheduler sets, removed from every child unless a test sets them.
const SCHEDULER_VARS: [&str; 6] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "JOB_COMPLETION_INDEX",
    "PIPELINE_SHARD_COUNT",
];

fn root() -> PathBuf {
    testkit::workspace_root()
}

/// 32x32 input, batch 2.
fn setup(test: &str, n: usize) -> (PathBuf, PathBuf) {
    crate::setup_sized(test, n, 32, 2)
}

fn command(program: impl AsRef<std::ffi::OsStr>, vars: &[(&str, &str)]) -> Command {
    let mut c = Command::new(program);
    for v in SCHEDULER_VARS {
        c.env_remove(v);
    }
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

fn extract(config: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    command(env!("CARGO_BIN_EXE_extract"), vars)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run extract")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// Every file under a store but the lock and the part records.
fn store_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("inside").display().to_string();
            if rel == "parts" || rel == ".lock" {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The unsharded store of `config`'s dataset, in `out`.
fn reference(config: &Path, out: &Path) -> BTreeMap<String, Vec<u8>> {
    let set = format!("extract.out=\"{}\"", out.display());
    ok(extract(config, &["--set", &set], &[]));
    store_files(out)
}

#[test]
fn parts_come_from_slurm_and_kubernetes_variables_and_the_log_says_so() {
    let (dir, config) = setup("shard-env", 9);
    let expected = reference(&config, &dir.join("reference"));
    // Array --array=4-5: task id 5 is part 1 of 2.
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "5"),
        ("SLURM_ARRAY_TASK_MIN", "4"),
        ("SLURM_ARRAY_TASK_MAX", "5"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
    ];
    let o = ok(extract(&config, &[], &slurm));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "extract: shard 1/2 (from Slurm array (SLURM_ARRAY_TASK_ID=5, SLURM_ARRAY_TASK_MIN=4"
        ),
        "{err}"
    );
    assert!(err.contains("batches 1, 3 of 5"), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("extract (shard 1/2, 2 of 5 batches): 4 computed now"),
        "{out}"
    );
    assert!(out.contains("waiting for part 0 of 2"), "{out}");
    // A Kubernetes Indexed Job's pod 0 of 2 finishes the partition.
    let k8s = [("JOB_COMPLETION_INDEX", "0"), ("PIPELINE_SHARD_COUNT", "2")];
    let o = ok(extract(&config, &[], &k8s));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("shard 0/2 (from Kubernetes Indexed Job (JOB_COMPLETION_INDEX=0, PIPELINE_SHARD_COUNT=2))"),
        "{err}"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("all 2 parts are in"), "{out}");
    assert_eq!(store_files(&dir.join("features")), expected, "the union");
    // The flag wins over the environment: part 1 of 2 again, nothing to compute.
    let o = ok(extract(&config, &["--shard", "1/2"], &k8s));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shard 1/2 (from --shard 1/2)"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 computed now"));
}

#[test]
fn malformed_parts_are_errors_naming_their_source_and_write_nothing() {
    let (dir, config) = setup("shard-env-bad", 4);
    // (arguments, variables, what the error must name)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 5] = [
        (
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("SLURM_ARRAY_TASK_MAX", "6"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            &["not contiguous", "SLURM_ARRAY_TASK_MAX=6"],
        ),
        (
            &[],
            &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MIN", "0")],
            &["SLURM_ARRAY_TASK_COUNT is not set"],
        ),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "3")],
            &["JOB_COMPLETION_INDEX=3", "PIPELINE_SHARD_COUNT"],
        ),
        (&["--shard", "3/3"], &[], &["--shard", "3/3"]),
        (
            &["--set", "extract.shard=x/2"],
            &[],
            &["extract.shard", "x/2"],
        ),
    ];
    for (args, vars, needles) in cases {
        let o = extract(&config, args, vars);
        assert!(!o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        for n in needles {
            assert!(err.contains(n), "{args:?} {vars:?}: `{n}` not in {err}");
        }
        assert!(!dir.join("features").exists(), "nothing written: {err}");
    }
}

#[test]
fn the_same_part_in_two_processes_at_once_is_harmless() {
    let (dir, config) = setup("shard-twin-processes", 12);
    let expected = reference(&config, &dir.join("reference"));
    let spawn = || {
        command(env!("CARGO_BIN_EXE_extract"), &[])
            .arg("--config")
            .arg(&config)
            .args(["--shard", "0/2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (spawn(), spawn());
    ok(a.wait_with_output().expect("a"));
    ok(b.wait_with_output().expect("b"));
    let o = ok(extract(&config, &["--shard", "1/2"], &[]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("all 2 parts are in"));
    assert_eq!(store_files(&dir.join("features")), expected);
}

#[test]
fn the_sbatch_script_runs_as_array_tasks() {
    let (dir, config) = setup("shard-sbatch", 10);
    let expected = reference(&config, &dir.join("reference"));
    let bin = Path::new(env!("CARGO_BIN_EXE_extract"))
        .parent()
        .expect("bin folder")
        .to_owned();
    let script = root().join("scripts/slurm/extract.sbatch");
    // --array=7-9: what Slurm sets in each task.
    for id in ["9", "7", "8"] {
        let o = command("bash", &[])
            .arg(&script)
            .args(["--set", "extract.batch_size=2"])
            .current_dir(&dir)
            .env("PIPELINE_BIN", &bin)
            .env("PIPELINE_CONFIG", &config)
            .env("SLURM_ARRAY_JOB_ID", "41")
            .env("SLURM_ARRAY_TASK_ID", id)
            .env("SLURM_ARRAY_TASK_MIN", "7")
            .env("SLURM_ARRAY_TASK_MAX", "9")
            .env("SLURM_ARRAY_TASK_COUNT", "3")
            .env("SLURM_CPUS_PER_TASK", "1")
            .output()
            .expect("bash");
        let o = ok(o);
        let log = String::from_utf8_lossy(&o.stdout);
        assert!(
            log.contains(&format!("extract.sbatch: job 41_{id}")),
            "{log}"
        );
    }
    assert_eq!(
        store_files(&dir.join("features")),
        expected,
        "3 array tasks"
    );
}

/// A stand-in `sbatch` on `PATH` that appends its arguments to `calls` and prints a job id
/// (`--parsable` style, with a cluster name the first time).
fn fake_sbatch(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let calls = dir.join("calls");
    let script = format!(
        "#!/usr/bin/env bash\necho \"$*\" >> '{calls}'\n\
         n=$(wc -l < '{calls}')\nif [ \"$n\" = 1 ]; then echo '100;cluster'; else echo 101; fi\n",
        calls = calls.display()
    );
    let path = bin.join("sbatch");
    std::fs::write(&path, script).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (bin, calls)
}

#[test]
fn submit_sh_submits_the_array_and_train_head_after_it() {
    let dir = testkit::temp_dir("shard-submit");
    let submit = root().join("scripts/slurm/submit.sh");
    let slurm = root().join("scripts/slurm");
    let path = |bin: &Path| {
        format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    };
    for (gpu, script) in [(false, "extract.sbatch"), (true, "extract-gpu.sbatch")] {
        let case = dir.join(script);
        let (bin, calls) = fake_sbatch(&case);
        let mut args: Vec<&str> = if gpu { vec!["--gpu"] } else { vec![] };
        args.extend(["4", "--set", "data.limit=256"]);
        let o = ok(command("bash", &[])
            .arg(&submit)
            .args(&args)
            .env("PATH", path(&bin))
            .output()
            .expect("bash"));
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out.lines().last(), Some("100 101"), "{out}");
        let calls = std::fs::read_to_string(calls).expect("calls");
        let lines: Vec<&str> = calls.lines().collect();
        assert_eq!(
            lines,
            [
                format!(
                    "--parsable --array=0-3 {} --set data.limit=256",
                    slurm.join(script).display()
                ),
                format!(
                    "--parsable --dependency=afterok:100 {} --set data.limit=256",
                    slurm.join("train-head.sbatch").display()
                ),
            ]
        );
    }
    let (bin, calls) = fake_sbatch(&dir.join("bad"));
    for n in ["0", "x", "-1"] {
        let o = command("bash", &[])
            .arg(&submit)
            .arg(n)
            .env("PATH", path(&bin))
            .output()
            .expect("bash");
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("N must be a positive number"));
    }
    assert!(!calls.exists(), "nothing submitted");
}

/// The offline Kubernetes schema validator, if installed.
fn validator() -> Option<PathBuf> {
    let venv = root().join(".venv-k8s/bin/kubernetes-validate");
    if venv.is_file() {
        return Some(venv);
    }
    Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("kubernetes-validate"))
}

#[test]
fn kubernetes_manifests_pass_the_schema_check() {
    let test = "kubernetes_manifests_pass_the_schema_check";
    let manifests: Vec<PathBuf> = {
        let mut m: Vec<PathBuf> = std::fs::read_dir(root().join("k8s"))
            .expect("k8s/")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        m.sort();
        m
    };
    assert_eq!(manifests.len(), 4, "{manifests:?}");
    // Each Indexed Job's PIPELINE_SHARD_COUNT is its `completions` (checked without the tool).
    for path in &manifests {
        let yaml = std::fs::read_to_string(path).expect("read");
        if !yaml.contains("completionMode: Indexed") {
            continue;
        }
        let value_after = |key: &str| -> String {
            let at = yaml
                .find(key)
                .unwrap_or_else(|| panic!("{key} in {}", path.display()));
            let rest = &yaml[at + key.len()..];
            rest.trim_start_matches(|c: char| !c.is_ascii_digit())
                .chars()
                .take_while(char::is_ascii_digit)
                .collect()
        };
        let completions = value_after("completions:");
        assert_eq!(
            value_after("parallelism:"),
            completions,
            "{}",
            path.display()
        );
        assert_eq!(
            value_after("name: PIPELINE_SHARD_COUNT"),
            completions,
            "{}: PIPELINE_SHARD_COUNT must equal completions",
            path.display()
        );
    }
    let Some(tool) = validator() else {
        let msg = format!(
            "{test}: SKIPPED: kubernetes-validate not found (python3 -m venv .venv-k8s && \
             .venv-k8s/bin/pip install kubernetes-validate==1.37.0)"
        );
        if std::env::var(testkit::REQUIRE_VAR).is_ok_and(|v| v == "1") {
            panic!("{msg}, and {}=1 requires it", testkit::REQUIRE_VAR);
        }
        eprintln!("{msg}");
        return;
    };
    let o = Command::new(&tool)
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .args(&manifests)
        .output()
        .expect("run kubernetes-validate");
    let report = text(&o);
    assert!(o.status.success(), "{report}");
    for m in &manifests {
        assert!(
            report.contains(&format!("{} passed", m.display())),
            "{}: {report}",
            m.display()
        );
    }
    // The check can fail: a misspelt field and a wrong type are caught.
    let dir = testkit::temp_dir("k8s-negative");
    let job = std::fs::read_to_string(root().join("k8s/extract-job.yaml")).expect("read");
    for (name, broken) in [
        ("misspelt.yaml", job.replace("parallelism:", "paralelism:")),
        (
            "type.yaml",
            job.replace("completions: 4", "completions: four"),
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, broken).expect("write");
        let o = Command::new(&tool)
            .args(["--strict", "--kubernetes-version", "1.33.0"])
            .arg(&path)
            .output()
            .expect("run kubernetes-validate");
        assert!(!o.status.success(), "{name} should fail: {}", text(&o));
    }
}
