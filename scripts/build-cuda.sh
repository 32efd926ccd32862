#!/usr/bin/env bash
# Builds (or type-checks) peft-studio with candle's CUDA backend on a machine that has no GPU and
# no CUDA install: the CUDA 13.0 compiler, headers and libraries come from PyPI wheels, candle's
# kernels are compiled for $CUDA_COMPUTE_CAP without asking a GPU, and the driver library
# (libcuda.so, which only an NVIDIA driver installs) is replaced at link time by a stub.
#
#   scripts/build-cuda.sh check            # cargo check --features cuda (CI)
#   scripts/build-cuda.sh build            # cargo build --release --features cuda --bin peft-studio
#   scripts/build-cuda.sh test             # cargo test --release --features cuda (on a GPU machine)
#   scripts/build-cuda.sh build --no-default-features ...   # extra arguments go to cargo
#
# Environment:
#   CUDA_COMPUTE_CAP     GPU generation to compile for (default 80: Ampere and newer run the PTX;
#                        90 for Hopper: H100/H200)
#   PEFT_CUDA_TOOLKIT    where the wheels are unpacked (default ~/.cache/peft-studio/cuda-13.0)
#   CARGO_TARGET_DIR     default target/cuda, so the CPU build in target/ is not rebuilt
#
# The binary needs, at run time, an NVIDIA driver (libcuda.so.1) and CUDA 13 libraries
# (libcublas, libcublasLt, libcurand, libnvrtc, libcudart): a PyTorch cu130 install has them
# (point LD_LIBRARY_PATH at its nvidia/cu13/lib), or use $PEFT_CUDA_TOOLKIT/cuda/lib.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-build}"
shift || true
case "$mode" in
    check | build | test) ;;
    *)
        echo "usage: scripts/build-cuda.sh check|build|test [cargo arguments]" >&2
        exit 2
        ;;
esac

toolkit="${PEFT_CUDA_TOOLKIT:-$HOME/.cache/peft-studio/cuda-13.0}"
# One CUDA release for every part (cudarc 0.19 accepts 11.4 to 13.4).
compiler_wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
# Only a linked binary needs these (cuBLAS alone is a 420 MB wheel).
library_wheels=(
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)

# Each group in its own folder: pip --target does not merge into an existing `nvidia/`.
install_wheels() {
    local group=$1
    shift
    [ -f "$toolkit/$group/.installed" ] && return 0
    python3 -m pip --version >/dev/null 2>&1 || {
        echo "build-cuda: python3 -m pip is needed to fetch CUDA from PyPI" >&2
        exit 1
    }
    echo "build-cuda: installing $* into $toolkit/$group" >&2
    rm -rf "${toolkit:?}/$group"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --target "$toolkit/$group" "$@"
    touch "$toolkit/$group/.installed"
}

mkdir -p "$toolkit"
install_wheels compiler "${compiler_wheels[@]}"
[ "$mode" != check ] && install_wheels libraries "${library_wheels[@]}"

cuda="$toolkit/compiler/nvidia/cu13"
[ -x "$cuda/bin/nvcc" ] || {
    echo "build-cuda: $cuda/bin/nvcc is missing after the install" >&2
    exit 1
}

# The linker wants unversioned names (libcublas.so); the wheels ship libcublas.so.13.
mkdir -p "$toolkit/cuda/lib"
for lib in "$cuda"/lib/lib*.so.* "$toolkit"/libraries/nvidia/cu13/lib/lib*.so.*; do
    [ -e "$lib" ] || continue
    base="$(basename "$lib")"
    ln -sf "$lib" "$toolkit/cuda/lib/$base"
    ln -sf "$lib" "$toolkit/cuda/lib/${base%%.so.*}.so"
done

# A stub libcuda.so: every driver entry point cudarc declares, as an empty function. It is only
# linked against (soname libcuda.so.1); at run time the real driver's library is loaded.
if [ "$mode" != check ] && [ ! -f "$toolkit/stubs/libcuda.so" ]; then
    find_cudarc() {
        find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -name 'cudarc-0.19.*' |
            sort | tail -1
    }
    cudarc="$(find_cudarc)"
    [ -n "$cudarc" ] || cargo fetch --quiet
    cudarc="$(find_cudarc)"
    mkdir -p "$toolkit/stubs"
    grep -hoE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" | sed -E 's/^\s+fn //; s/\($//' | sort -u |
        sed 's/.*/void &(void) {}/' >"$toolkit/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$toolkit/stubs/libcuda.so" "$toolkit/stubs/libcuda.c"
fi

export CUDA_HOME="$cuda" CUDA_PATH="$cuda"
export PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
export LIBRARY_PATH="$toolkit/cuda/lib:$toolkit/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$toolkit/cuda/lib -L native=$toolkit/stubs"

start=$(date +%s)
if [ "$mode" = check ]; then
    cargo check --features cuda --all-targets "$@"
elif [ "$mode" = test ]; then
    # The real driver, not the stub, must be found at run time.
    LD_LIBRARY_PATH="$toolkit/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        cargo test --release --features cuda "$@"
else
    cargo build --release --features cuda --bin peft-studio "$@"
    bin="$CARGO_TARGET_DIR/release/peft-studio"
    echo "build-cuda: $bin ($(du -h "$bin" | cut -f1)); run it with LD_LIBRARY_PATH=$toolkit/cuda/lib"
fi
echo "build-cuda: $mode took $(($(date +%s) - start)) s (compute capability $CUDA_COMPUTE_CAP)"
