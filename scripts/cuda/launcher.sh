#!/bin/sh
# Launcher of a CUDA build (installed by scripts/build_cuda.sh as dist/cuda/bin/<name>, one copy
# per binary; the real binary is ../libexec/<name>, <name> taken from how this script is called).
#
# The CUDA binaries are dynamically linked against the NVIDIA driver (libcuda.so.1) and the
# CUDA 13 runtime libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc). The
# driver comes with the GPU; the runtime libraries may be a CUDA toolkit's or the ones
# PyTorch's CUDA wheels install. This script finds them, then execs the binary; when something
# cannot be found it says what and how to provide it, instead of the loader's bare
# "error while loading shared libraries".
#
# Where it looks, in this order (for libraries the previous places did not provide):
#   1. $PIPELINE_CUDA_LIBS (colon-separated folders)
#   2. $LD_LIBRARY_PATH
#   3. the system loader cache (ldconfig -p; what the loader finds by itself)
#   4. $CUDA_HOME/lib64, /usr/local/cuda/lib64
#   5. nvidia/*/lib (nvidia/cu13/lib for CUDA 13 wheels) of the first python3 on PATH that has
#      the `nvidia` package (PyTorch's CUDA wheels bring it)
#   6. the build's own toolchain (.venv-cuda), while it exists (libexec/build-lib-dirs.txt)
# What the binary still lacks is read from `ldd` with the folders found so far, so the list of
# libraries is the binary's own, never a list kept here.
#
# PIPELINE_LAUNCHER_DEBUG=1 prints the LD_LIBRARY_PATH chosen.

# Exit status when libraries are missing: the loader's own (and the shell's "cannot execute").
missing_status=127

# Resolve symlinks to this script, so a link to it from elsewhere (~/bin/extract) works.
self=$0
while [ -L "$self" ]; do
    link=$(readlink "$self") || break
    case $link in
    /*) self=$link ;;
    *) self=$(dirname "$self")/$link ;;
    esac
done
name=$(basename "$self")
here=$(cd "$(dirname "$self")" && pwd) || exit 1
libexec=$here/../libexec
real=$libexec/$name

say() { printf '%s: %s\n' "$name" "$*" >&2; }

if [ ! -x "$real" ]; then
    say "the binary $real is missing: this launcher runs ../libexec/<its own name>"
    exit 126
fi

# The folders chosen so far, colon-separated (what LD_LIBRARY_PATH will be).
chosen=""

# add DIR: appends DIR to $chosen unless it is empty, not a folder or already there.
add() {
    [ -n "$1" ] && [ -d "$1" ] || return 0
    case ":$chosen:" in
    *":$1:"*) return 0 ;;
    esac
    chosen=${chosen:+$chosen:}$1
}

# add_list LIST: add for each folder of a colon-separated LIST.
add_list() {
    old_ifs=$IFS
    IFS=:
    set -f
    for d in $1; do add "$d"; done
    set +f
    IFS=$old_ifs
}

# missing: the libraries the loader would not find with LD_LIBRARY_PATH=$chosen, one a line.
# ldd is glibc's; without it, nothing is reported missing and the loader has the last word.
missing() {
    command -v ldd >/dev/null 2>&1 || return 0
    # The subshell keeps the caller's LD_LIBRARY_PATH as it was.
    # shellcheck disable=SC2030
    (
        if [ -n "$chosen" ]; then
            LD_LIBRARY_PATH=$chosen
            export LD_LIBRARY_PATH
        else
            unset LD_LIBRARY_PATH
        fi
        ldd "$real" </dev/null 2>/dev/null
    ) | awk '$2 == "=>" && $3 == "not" && $4 == "found" { print $1 }' | sort -u
}

# try_dir DIR: adds DIR when it holds one of the libraries still missing.
try_dir() {
    [ -n "$1" ] && [ -d "$1" ] || return 0
    for lib in $still_missing; do
        if [ -e "$1/$lib" ]; then
            add "$1"
            still_missing=$(missing)
            return 0
        fi
    done
}

# python_lib_dirs: nvidia/*/lib of the first python3 on PATH that has the nvidia package.
python_lib_dirs() {
    printf '%s\n' "$PATH" | tr ':' '\n' | while IFS= read -r d; do
        [ -n "$d" ] && [ -x "$d/python3" ] || continue
        "$d/python3" -c '
import glob, os, sys
try:
    import nvidia
except ImportError:
    sys.exit(1)
for p in list(getattr(nvidia, "__path__", [])):
    for lib in sorted(glob.glob(os.path.join(p, "*", "lib"))):
        print(lib)
' </dev/null 2>/dev/null && exit 0
    done
}

add_list "${PIPELINE_CUDA_LIBS:-}"
# shellcheck disable=SC2031
add_list "${LD_LIBRARY_PATH:-}"
still_missing=$(missing)
py_dirs=""
if [ -n "$still_missing" ]; then
    # The loader cache was consulted by ldd above; what is left needs a folder of our own.
    [ -n "${CUDA_HOME:-}" ] && try_dir "$CUDA_HOME/lib64"
    [ -n "$still_missing" ] && try_dir /usr/local/cuda/lib64
fi
if [ -n "$still_missing" ]; then
    py_dirs=$(python_lib_dirs)
    [ "${PIPELINE_LAUNCHER_DEBUG:-}" = 1 ] && say "python3's nvidia folders: ${py_dirs:-(none)}"
    while IFS= read -r d; do
        [ -n "$still_missing" ] && try_dir "$d"
    done <<EOF_DIRS
$py_dirs
EOF_DIRS
fi
if [ -n "$still_missing" ] && [ -f "$libexec/build-lib-dirs.txt" ]; then
    while IFS= read -r d; do
        [ -n "$still_missing" ] && try_dir "$d"
    done <"$libexec/build-lib-dirs.txt"
fi

if [ "${PIPELINE_LAUNCHER_DEBUG:-}" = 1 ]; then
    say "LD_LIBRARY_PATH=$chosen"
    [ -n "$still_missing" ] && say "still missing: $(printf '%s' "$still_missing" | tr '\n' ' ')"
fi

if [ -n "$still_missing" ]; then
    driver=""
    others=""
    for lib in $still_missing; do
        case $lib in
        libcuda.so.1) driver=1 ;;
        *) others=${others:+$others }$lib ;;
        esac
    done
    if [ -n "$driver" ]; then
        say "libcuda.so.1 not found: there is no NVIDIA driver on this machine."
        say "This is the CUDA build; it runs only where the NVIDIA driver is installed."
        say "On a machine without an NVIDIA GPU, use the CPU build (cargo build --release)."
        say "If the driver is installed in an unusual place, add its folder to PIPELINE_CUDA_LIBS."
    fi
    if [ -n "$others" ]; then
        wheels=""
        for lib in $others; do
            case $lib in
            libcublas.so* | libcublasLt.so*) w=nvidia-cublas ;;
            libcurand.so*) w=nvidia-curand ;;
            libnvrtc.so*) w=nvidia-cuda-nvrtc ;;
            libcudart.so*) w=nvidia-cuda-runtime ;;
            *) w="" ;;
            esac
            case " $wheels " in
            *" $w "*) ;;
            *) wheels=${wheels:+$wheels }$w ;;
            esac
        done
        say "CUDA libraries not found: $others"
        say "Install PyTorch's CUDA 13 wheels (pip install ${wheels:-nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-cuda-runtime})"
        say "into the python3 on PATH, or set PIPELINE_CUDA_LIBS to the folders that hold them."
    fi
    if [ -n "$py_dirs" ]; then
        py_note="python3's nvidia/*/lib folders"
    else
        py_note="python3's nvidia/*/lib folders (no python3 on PATH has the nvidia package)"
    fi
    say "looked in: PIPELINE_CUDA_LIBS, LD_LIBRARY_PATH, the loader cache (ldconfig -p),"
    say "  ${CUDA_HOME:+\$CUDA_HOME/lib64, }/usr/local/cuda/lib64, $py_note;"
    say "  PIPELINE_LAUNCHER_DEBUG=1 shows the folders."
    exit $missing_status
fi

if [ -n "$chosen" ]; then
    LD_LIBRARY_PATH=$chosen
    export LD_LIBRARY_PATH
fi
[ "${PIPELINE_LAUNCHER_DEBUG:-}" = 1 ] && say "exec $real"
exec "$real" "$@"
