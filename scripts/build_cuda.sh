#!/usr/bin/env bash
# Builds the CUDA binaries on a machine with no GPU and no CUDA install.
#
# Users with a CUDA 13 toolkit (nvcc on PATH, libraries in lib64/) do not need this script:
# `cargo build --release --features cuda` is enough. This script is for everyone else, CI
# included. It
#   1. installs the pinned CUDA toolchain (scripts/cuda/requirements.txt: nvcc and the link
#      libraries, all from PyPI's NVIDIA wheels) into .venv-cuda/;
#   2. prepares target/cuda-link/: unversioned names for the wheels' libraries (the linker
#      looks for libcublas.so, the wheels carry only libcublas.so.13) and a link stub
#      libcuda.so (soname libcuda.so.1) standing in for the NVIDIA driver, which a build
#      machine does not have; every stub function returns CUDA_ERROR_STUB_LIBRARY (34), as in
#      the CUDA toolkit's lib64/stubs;
#   3. builds the binaries with `--features cuda` into target/cuda/ (its own target directory,
#      so the CPU build in target/release is never rebuilt);
#   4. stages dist/cuda/: libexec/<name> (the stripped binaries), bin/<name> (the launcher,
#      scripts/cuda/launcher.sh, which finds the CUDA libraries at run time and explains what is
#      missing) and BUILD-INFO.txt; with --package also dist/cuda-<commit>.tar.xz.
#
# Re-runnable: pip is skipped when the pinned set is already installed, the link folder is
# only rewritten when its content changes, and cargo rebuilds only what changed. Each phase
# prints its wall time, and the total is printed at the end.
set -euo pipefail

# The binaries built and staged (crates/<name>, each with a `cuda` feature).
BINARIES=(extract predict train-head train-cnn)
# The libraries candle/cudarc link with `dynamic-linking` (besides the driver, libcuda).
LINK_LIBS=(cudart cublas cublasLt curand nvrtc)
# CUresult CUDA_ERROR_STUB_LIBRARY: what every function of the stub driver returns.
STUB_RESULT=34

usage() {
    cat <<'EOF'
Usage: scripts/build_cuda.sh [--package] [--test] [--compute-cap N] [--skip-pip] [--help]

Builds the CUDA binaries (extract, predict, train-head, train-cnn) without a CUDA install and
stages them in dist/cuda/ (run them as dist/cuda/bin/<name>).

  --compute-cap N  GPU compute capability the kernels are compiled for (default:
                   $CUDA_COMPUTE_CAP, else 90 = Hopper, e.g. H100/H200; 80 = A100,
                   86 = RTX 30xx, 89 = RTX 40xx/L4). Kernels run on that architecture only.
  --package        also write dist/cuda-<commit>.tar.xz of dist/cuda/
  --test           also run the CPU tests of the CUDA build (pipeline's unit tests and
                   extract's tests) with the link stub playing the driver: no GPU is used,
                   `auto` must fall back to the CPU and `cuda` must be a clear error
  --skip-pip       use .venv-cuda/ as it is (no pip, e.g. offline)
  --help           this text

The first run takes 35-50 minutes on 2 cores (mostly candle's CUDA kernels); re-runs, seconds.
EOF
}

package=0
run_tests=0
skip_pip=0
compute_cap=${CUDA_COMPUTE_CAP:-90}
while [ $# -gt 0 ]; do
    case $1 in
    --help | -h)
        usage
        exit 0
        ;;
    --package) package=1 ;;
    --test) run_tests=1 ;;
    --skip-pip) skip_pip=1 ;;
    --compute-cap)
        [ $# -ge 2 ] || { echo "build_cuda.sh: --compute-cap needs a value, e.g. 90" >&2; exit 2; }
        compute_cap=$2
        shift
        ;;
    --compute-cap=*) compute_cap=${1#--compute-cap=} ;;
    *)
        echo "build_cuda.sh: unknown argument '$1' (see --help)" >&2
        exit 2
        ;;
    esac
    shift
done
if ! [[ $compute_cap =~ ^[0-9]{2,3}[af]?$ ]]; then
    echo "build_cuda.sh: compute capability '$compute_cap' is not like 90, 80 or 120" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ -d crates/backbone-check ] && BINARIES+=(backbone-check)

VENV=$ROOT/.venv-cuda
REQUIREMENTS=$ROOT/scripts/cuda/requirements.txt
LINK_DIR=$ROOT/target/cuda-link
TARGET_DIR=$ROOT/target/cuda
DIST=$ROOT/dist/cuda

die() {
    echo "build_cuda.sh: $*" >&2
    exit 1
}
for tool in python3 cargo gcc strip readelf; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH (needed to build)"
done

fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
declare -a timings
phase_name=""
phase_start=0
total_start=$(date +%s)
begin() {
    phase_name=$1
    phase_start=$(date +%s)
    echo
    echo "=== $phase_name"
}
end() {
    local secs=$(($(date +%s) - phase_start))
    echo "=== $phase_name: $(fmt_secs "$secs")"
    timings+=("$(printf '%-10s %s' "$phase_name" "$(fmt_secs "$secs")")")
}

# ---------------------------------------------------------------------------------------------
begin toolchain
stamp=$VENV/.requirements.sha256
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ $skip_pip = 1 ]; then
    [ -x "$VENV/bin/python" ] || die "--skip-pip, but $VENV does not exist: run without --skip-pip once"
    echo "skipping pip (--skip-pip)"
elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    echo "$VENV already has the pinned toolchain ($REQUIREMENTS)"
else
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" ||
        die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q \
        -r "$REQUIREMENTS"
    echo "$want" >"$stamp"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU13=$SITE/nvidia/cu13
[ -x "$CU13/bin/nvcc" ] || die "$CU13/bin/nvcc missing: the wheels did not install as expected"
nvcc_version=$("$CU13/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')
echo "nvcc $nvcc_version at $CU13/bin/nvcc"
end

# ---------------------------------------------------------------------------------------------
begin link
mkdir -p "$LINK_DIR"
for lib in "${LINK_LIBS[@]}"; do
    # The wheels hold lib<name>.so.<major> (the soname the binary will ask for at run time).
    found=$(find "$CU13/lib" -maxdepth 1 -name "lib$lib.so.[0-9]*" | sort | head -n 1)
    [ -n "$found" ] || die "lib$lib.so.* not found in $CU13/lib (is its wheel in $REQUIREMENTS?)"
    ln -sfn "$found" "$LINK_DIR/lib$lib.so"
    echo "lib$lib.so -> $found"
done

# The stub driver defines every cu* function cudarc declares (all CUDA versions it knows: a
# superset of what the build references, which is harmless), read from the cudarc sources
# that Cargo.lock pins.
cargo fetch --locked --quiet
cudarc_dir=$(cargo metadata --locked --format-version 1 --all-features |
    "$VENV/bin/python" -c '
import json, os, sys
dirs = {os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"}
if len(dirs) != 1:
    sys.exit("expected exactly one cudarc in Cargo.lock, found %d" % len(dirs))
print(dirs.pop())')
driver_rs=$cudarc_dir/src/driver/sys/mod.rs
[ -f "$driver_rs" ] || die "$driver_rs not found (cudarc's driver bindings moved?)"
stub_c=$LINK_DIR/libcuda-stub.c
{
    echo "/* Link stub for libcuda.so.1, generated by scripts/build_cuda.sh from"
    echo " * $driver_rs."
    echo " * Every driver function returns CUDA_ERROR_STUB_LIBRARY ($STUB_RESULT). Link-time only. */"
    grep -oE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$driver_rs" | sed -E 's/^[[:space:]]+fn (cu[A-Za-z0-9_]+)\(/\1/' |
        sort -u | sed "s/.*/int &(void) { return $STUB_RESULT; }/"
} >"$stub_c.new"
nsym=$(grep -c '^int cu' "$stub_c.new" || true)
[ "$nsym" -gt 100 ] || die "only $nsym driver functions found in $driver_rs: its format changed?"
if ! cmp -s "$stub_c.new" "$stub_c" || [ ! -f "$LINK_DIR/libcuda.so" ]; then
    mv "$stub_c.new" "$stub_c"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$LINK_DIR/libcuda.so.tmp" "$stub_c"
    mv "$LINK_DIR/libcuda.so.tmp" "$LINK_DIR/libcuda.so"
    echo "stub libcuda.so (soname libcuda.so.1): $nsym driver functions"
else
    rm -f "$stub_c.new"
    echo "stub libcuda.so up to date ($nsym driver functions)"
fi
# With PIPELINE_CUDA_LIBS=<this folder> the stub can play the driver at run time too (tests).
ln -sfn libcuda.so "$LINK_DIR/libcuda.so.1"
end

# ---------------------------------------------------------------------------------------------
begin build
packages=()
for b in "${BINARIES[@]}"; do packages+=(-p "$b"); done
echo "cargo build --release --locked --features cuda --target-dir target/cuda ${packages[*]}"
echo "  (CUDA_COMPUTE_CAP=$compute_cap, nvcc and CUDA_ROOT from $CU13)"
# LIBRARY_PATH reaches the linker without touching RUSTFLAGS (which would rebuild everything).
# cudarc's and candle-kernels' build scripts watch these variables: every cargo command on
# target/cuda must see the same values, or it rebuilds the kernels.
cuda_env=(PATH="$CU13/bin:$PATH" CUDA_ROOT="$CU13" NVCC="$CU13/bin/nvcc"
    CUDA_COMPUTE_CAP="$compute_cap" LIBRARY_PATH="$LINK_DIR${LIBRARY_PATH:+:$LIBRARY_PATH}")
env "${cuda_env[@]}" \
    cargo build --release --locked --features cuda --target-dir "$TARGET_DIR" "${packages[@]}"
end

# ---------------------------------------------------------------------------------------------
if [ $run_tests = 1 ]; then
    begin test
    # The stub libcuda.so.1 plays the driver (every call fails with CUDA_ERROR_STUB_LIBRARY),
    # so these are the CPU tests of the CUDA build, plus device.rs's test that `auto` falls back
    # and `cuda` is an error when the driver is unusable.
    test_env=("${cuda_env[@]}" LD_LIBRARY_PATH="$LINK_DIR:$CU13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
    env "${test_env[@]}" cargo test --release --locked --features cuda --target-dir "$TARGET_DIR" \
        -p pipeline --lib
    env "${test_env[@]}" cargo test --release --locked --features cuda --target-dir "$TARGET_DIR" \
        -p extract
    end
fi

# ---------------------------------------------------------------------------------------------
begin stage
rm -rf "$DIST.tmp"
mkdir -p "$DIST.tmp/bin" "$DIST.tmp/libexec"
for b in "${BINARIES[@]}"; do
    strip -o "$DIST.tmp/libexec/$b" "$TARGET_DIR/release/$b"
    install -m 755 scripts/cuda/launcher.sh "$DIST.tmp/bin/$b"
done
# The launcher's last resort, while this checkout's toolchain exists: the wheels' libraries.
printf '%s\n' "$CU13/lib" >"$DIST.tmp/libexec/build-lib-dirs.txt"

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
dirty=""
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && dirty=" (with uncommitted changes)"
{
    echo "CUDA build of $(basename "$ROOT")"
    echo "commit:             $(git rev-parse HEAD 2>/dev/null || echo unknown)$dirty"
    echo "built:              $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -sm)"
    echo "compute capability: $compute_cap (kernels run on this GPU architecture only)"
    echo "nvcc:               $nvcc_version"
    echo "rustc:              $(rustc --version)"
    echo "wheels:"
    "$VENV/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null |
        grep -i '^nvidia-' | sed 's/^/  /'
    echo "needs at run time (DT_NEEDED):"
    readelf -d "$DIST.tmp/libexec/${BINARIES[0]}" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
    echo "binaries (bytes, unstripped -> stripped):"
    for b in "${BINARIES[@]}"; do
        printf '  %-16s %10d -> %10d\n' "$b" "$(stat -c %s "$TARGET_DIR/release/$b")" \
            "$(stat -c %s "$DIST.tmp/libexec/$b")"
    done
    echo
    echo "Run dist/cuda/bin/<name>: it finds the CUDA libraries (PIPELINE_CUDA_LIBS,"
    echo "LD_LIBRARY_PATH, the loader cache, CUDA_HOME, /usr/local/cuda, a python3 with"
    echo "PyTorch's nvidia wheels) and says what is missing. PIPELINE_LAUNCHER_DEBUG=1 shows it."
} >"$DIST.tmp/BUILD-INFO.txt"
rm -rf "$DIST"
mv "$DIST.tmp" "$DIST"
cat "$DIST/BUILD-INFO.txt"
end

# ---------------------------------------------------------------------------------------------
if [ $package = 1 ]; then
    begin package
    tarball=$ROOT/dist/cuda-$commit.tar.xz
    # The build-lib-dirs file only makes sense on this machine: leave it out of the archive.
    # The binaries share most of their bytes (candle, its kernels); a dictionary larger than one
    # binary lets xz find that: 14.5 MB instead of 39 MB for the four, in less time (2-5
    # minutes on 2 cores; 2.4 GB of memory to compress, 192 MiB to decompress).
    tar -C "$ROOT/dist" --exclude=cuda/libexec/build-lib-dirs.txt -cf - cuda |
        xz -T1 --lzma2=preset=6,dict=192MiB >"$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    echo "$tarball: $(stat -c %s "$tarball") bytes"
    end
fi

echo
echo "=== timings"
printf '%s\n' "${timings[@]}"
echo "total      $(fmt_secs $(($(date +%s) - total_start)))"
echo
echo "Run: dist/cuda/bin/extract --help"
