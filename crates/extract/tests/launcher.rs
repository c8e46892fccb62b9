//! The CUDA build's launcher (`scripts/cuda/launcher.sh`, staged as `dist/cuda/bin/<name>` by
//! `scripts/build_cuda.sh`), tested without CUDA: gcc builds a tiny shared library standing in
//! for libcublas (`libcudafake.so.1`) and a tiny program linked against it, installed in the
//! same `bin/` + `libexec/` layout as the real binaries, in folders whose names have spaces.
//! The launcher learns what is missing from `ldd`, so the fake library goes through the very
//! code path a missing libcublas would.
//!
//! Needs gcc (CI has it); without it each test prints `SKIPPED`, a failure when
//! `PIPELINE_REQUIRE_SHARED=1`, like the tests that need `../shared`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The library the fake program needs; its one function returns 42.
const FAKE_LIB: &str = "libcudafake.so.1";

const FAKE_LIB_C: &str = "int fake_value(void) { return 42; }\n";

/// Prints the library's value and each argument in brackets, exits with `$FAKE_EXIT`.
const FAKE_PROGRAM_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
int fake_value(void);
int main(int argc, char **argv) {
    printf("fake_value=%d\n", fake_value());
    for (int i = 1; i < argc; i++) printf("arg[%d]=<%s>\n", i, argv[i]);
    const char *code = getenv("FAKE_EXIT");
    return code ? atoi(code) : 0;
}
"#;

fn launcher_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cuda/launcher.sh")
}

/// Whether gcc runs; otherwise prints why the test skips (or fails under
/// `PIPELINE_REQUIRE_SHARED=1`).
fn have_gcc(test: &str) -> bool {
    let ok = Command::new("gcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!("{test}: SKIPPED: gcc not found (it builds the fake CUDA library)");
        if std::env::var(testkit::REQUIRE_VAR).is_ok_and(|v| v == "1") {
            panic!("{msg}, and {}=1 requires it", testkit::REQUIRE_VAR);
        }
        eprintln!("{msg}");
    }
    ok
}

fn gcc(args: &[&std::ffi::OsStr]) {
    let o = Command::new("gcc").args(args).output().expect("run gcc");
    assert!(
        o.status.success(),
        "gcc {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A launcher installation: `<root>/install dir/bin/<name>` (the launcher) and
/// `.../libexec/<name>` (the fake program), the library in `<root>/lib dir/<soname>`.
struct Install {
    root: PathBuf,
    lib_dir: PathBuf,
    bin: PathBuf,
}

/// Builds the fake library under `soname` and a program `name` linked against it, and
/// installs the launcher for it.
fn install(test: &str, name: &str, soname: &str) -> Install {
    let root = testkit::temp_dir(test);
    let build = root.join("build dir");
    let lib_dir = root.join("lib dir");
    let prefix = root.join("install dir");
    for d in [
        &build,
        &lib_dir,
        &prefix.join("bin"),
        &prefix.join("libexec"),
    ] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let lib_c = build.join("fake.c");
    let prog_c = build.join("prog.c");
    std::fs::write(&lib_c, FAKE_LIB_C).expect("write fake.c");
    std::fs::write(&prog_c, FAKE_PROGRAM_C).expect("write prog.c");
    // Linked as -lcudafake (the unversioned name), recorded as the soname, as a real build does.
    let link_name = "libcudafake.so";
    let soname_flag = format!("-Wl,-soname,{soname}");
    gcc(&[
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        soname_flag.as_ref(),
        "-o".as_ref(),
        build.join(link_name).as_os_str(),
        lib_c.as_os_str(),
    ]);
    let real = prefix.join("libexec").join(name);
    let search = format!("-L{}", build.display());
    gcc(&[
        "-o".as_ref(),
        real.as_os_str(),
        prog_c.as_os_str(),
        search.as_ref(),
        "-lcudafake".as_ref(),
    ]);
    std::fs::copy(build.join(link_name), lib_dir.join(soname)).expect("install the library");
    let bin = prefix.join("bin").join(name);
    std::fs::copy(launcher_script(), &bin).expect("install the launcher");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Install { root, lib_dir, bin }
}

/// Runs `program` with only PATH from the test's environment plus `env`.
fn run(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the launcher")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The loader's own message, which the launcher exists to replace.
const LOADER_TRACE: &str = "error while loading shared libraries";

#[test]
fn missing_library_is_named_with_a_remedy_and_no_loader_trace() {
    if !have_gcc("missing_library") {
        return;
    }
    let inst = install("launcher-missing", "extract", FAKE_LIB);
    let o = run(&inst.bin, &["--help"], &[]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(127), "stderr: {err}");
    assert!(
        err.contains(&format!("extract: CUDA libraries not found: {FAKE_LIB}")),
        "{err}"
    );
    assert!(err.contains("PIPELINE_CUDA_LIBS"), "{err}");
    assert!(err.contains("pip install"), "{err}");
    assert!(!err.contains(LOADER_TRACE), "{err}");
    assert!(!err.contains("no NVIDIA driver"), "{err}");
    assert!(
        !text(&o.stdout).contains("fake_value"),
        "the binary must not have run"
    );
}

#[test]
fn pipeline_cuda_libs_finds_it_and_arguments_and_exit_code_pass_through() {
    if !have_gcc("pipeline_cuda_libs") {
        return;
    }
    let inst = install("launcher-found", "extract", FAKE_LIB);
    let lib_dir = inst.lib_dir.to_str().expect("utf8 temp path");
    // A folder that does not exist comes first: it is skipped, not fatal.
    let libs = format!("/nonexistent/folder:{lib_dir}");
    let args = ["a b", "", "*", "$HOME", "--set", "x.y=\"q\" 'r'"];
    let o = run(
        &inst.bin,
        &args,
        &[("PIPELINE_CUDA_LIBS", &libs), ("FAKE_EXIT", "7")],
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(7), "stderr: {}", text(&o.stderr));
    assert!(out.starts_with("fake_value=42\n"), "{out}");
    let expected: String = args
        .iter()
        .enumerate()
        .map(|(i, a)| format!("arg[{}]=<{a}>\n", i + 1))
        .collect();
    assert_eq!(&out["fake_value=42\n".len()..], expected);
    assert_eq!(
        text(&o.stderr),
        "",
        "a clean start prints nothing of its own"
    );

    let o = run(&inst.bin, &[], &[("PIPELINE_CUDA_LIBS", lib_dir)]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
}

#[test]
fn ld_library_path_and_a_symlinked_launcher_work_and_debug_shows_the_path() {
    if !have_gcc("ld_library_path") {
        return;
    }
    let inst = install("launcher-symlink", "predict", FAKE_LIB);
    let lib_dir = inst.lib_dir.to_str().expect("utf8 temp path");
    // A link from elsewhere (as in ~/bin) still finds ../libexec/<name> beside the target.
    let elsewhere = inst.root.join("other bin");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let link = elsewhere.join("predict");
    std::os::unix::fs::symlink(&inst.bin, &link).expect("symlink");
    let o = run(
        &link,
        &["x"],
        &[
            ("LD_LIBRARY_PATH", lib_dir),
            ("PIPELINE_LAUNCHER_DEBUG", "1"),
        ],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    assert_eq!(text(&o.stdout), "fake_value=42\narg[1]=<x>\n");
    assert!(
        err.contains(&format!("predict: LD_LIBRARY_PATH={lib_dir}\n")),
        "{err}"
    );
}

#[test]
fn python_nvidia_wheel_folders_are_searched() {
    if !have_gcc("python_nvidia") {
        return;
    }
    let python_ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !python_ok {
        eprintln!("python_nvidia: SKIPPED: no python3 on PATH");
        return;
    }
    let inst = install("launcher-python", "train-head", FAKE_LIB);
    // A site folder laid out like PyTorch's CUDA 13 wheels: nvidia/cu13/lib/<library>.
    let site = inst.root.join("site packages");
    let wheel_lib = site.join("nvidia").join("cu13").join("lib");
    std::fs::create_dir_all(&wheel_lib).expect("mkdir");
    std::fs::copy(inst.lib_dir.join(FAKE_LIB), wheel_lib.join(FAKE_LIB)).expect("copy");
    let site = site.to_str().expect("utf8 temp path");
    let o = run(&inst.bin, &["y"], &[("PYTHONPATH", site)]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "fake_value=42\narg[1]=<y>\n");
}

#[test]
fn missing_driver_says_there_is_no_nvidia_driver() {
    if !have_gcc("missing_driver") {
        return;
    }
    // On a machine with the NVIDIA driver the loader finds the real libcuda.so.1.
    let cache = Command::new("sh")
        .args(["-c", "ldconfig -p 2>/dev/null || /sbin/ldconfig -p"])
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default();
    if cache.contains("libcuda.so.1 ") {
        eprintln!("missing_driver: SKIPPED: this machine has an NVIDIA driver (libcuda.so.1)");
        return;
    }
    let inst = install("launcher-driver", "extract", "libcuda.so.1");
    let o = run(&inst.bin, &["--help"], &[]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(127), "stderr: {err}");
    assert!(
        err.contains("extract: libcuda.so.1 not found: there is no NVIDIA driver"),
        "{err}"
    );
    assert!(err.contains("cargo build --release"), "{err}");
    assert!(!err.contains("CUDA libraries not found"), "{err}");
    assert!(!err.contains(LOADER_TRACE), "{err}");
}

#[test]
fn a_missing_real_binary_is_a_clear_error() {
    let root = testkit::temp_dir("launcher-no-binary");
    let bin_dir = root.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("mkdir");
    let bin = bin_dir.join("extract");
    std::fs::copy(launcher_script(), &bin).expect("install the launcher");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let o = run(&bin, &[], &[]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(126), "{err}");
    assert!(err.contains("libexec/extract is missing"), "{err}");
}
