#!/usr/bin/env bash
# CI: the cuda binary still compiles and links. Installs the CUDA 13.0 toolchain from PyPI
# (cached; scripts/setup-cuda-toolchain.sh), builds llm-worker-rbee-cuda in its own target dir,
# and checks what the binary will ask for on a GPU machine. Runs nothing on a GPU: there is none.
#
# Why a build with Rust's optimizer off (profile `cuda-check`) rather than `--release`: on two
# cores a cold `--release` build takes about twice as long, the extra time being LLVM optimizing
# candle and this crate, which checks nothing more. What the check is for is all still there:
# nvcc 13.0 compiles every candle-kernels kernel exactly as in the release build (its build.rs
# fixes the nvcc flags, -O3, sm_90a), every line of this crate is compiled with the cuda feature,
# and the binary links against the CUDA 13.0 libraries. `cargo check` would cost about the same
# (build scripts, hence nvcc, run in check too) and would skip the link.
# The binary that is shipped to a GPU machine is the --release one (scripts/gpu-bundle.sh).
#
# Usage:  scripts/ci-cuda-check.sh
# Env:    CUDA_CHECK_TARGET_DIR  target dir (default: target/cuda, apart from the CPU build's
#                                so neither waits on the other's lock or invalidates its cache)
#         LLM_WORKER_CACHE       where the toolchain is cached (default: ~/.cache/llm-worker-rbee)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

log() { printf '[ci-cuda-check] %s\n' "$*" >&2; }

start=$SECONDS
env_lines=$(scripts/setup-cuda-toolchain.sh)
eval "$env_lines"
log "toolchain ready in $((SECONDS - start))s: $(nvcc --version | tail -n1)"

export CARGO_TARGET_DIR=${CUDA_CHECK_TARGET_DIR:-$REPO/target/cuda}
# cudaforge compiles the kernels on half the cores unless told otherwise.
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}

# A profile of its own, defined here so Cargo.toml stays as it is and the dev and release
# outputs in the same target dir are left alone.
profile=(
    --config 'profile.cuda-check.inherits="dev"'
    --config 'profile.cuda-check.opt-level=0'
    --config 'profile.cuda-check.debug=false'
    --config 'profile.cuda-check.package."*".opt-level=0'
    --profile cuda-check
)
build_start=$SECONDS
cargo build --locked --features cuda --bin llm-worker-rbee-cuda "${profile[@]}"
log "cargo build --features cuda (profile cuda-check): $((SECONDS - build_start))s"

bin="$CARGO_TARGET_DIR/cuda-check/llm-worker-rbee-cuda"
[[ -x "$bin" ]] || { log "FAILED: $bin was not produced"; exit 1; }

# The binary must ask the loader for the real driver (the stub's SONAME), never for the stub
# file, and for CUDA 13's runtime. (The linker drops libraries nothing calls, so the list of
# CUDA libraries is not fixed; today it is cuda, cudart, cublas and curand.)
needed=$(objdump -p "$bin" | awk '/NEEDED/ {print $2}')
for lib in libcuda.so.1 libcudart.so.13; do
    grep -qx "$lib" <<<"$needed" || { log "FAILED: $bin does not link $lib (NEEDED: ${needed//$'\n'/ })"; exit 1; }
done
if grep -qx 'libcuda.so' <<<"$needed"; then
    log "FAILED: $bin names the driver stub's file instead of libcuda.so.1"
    exit 1
fi
if objdump -p "$bin" | grep -E 'R(UN)?PATH' | grep -q stubs; then
    log "FAILED: $bin has an rpath into the driver stub"
    exit 1
fi
# Kernels built for Hopper: candle's PTX modules are embedded as text.
grep -aq '^\.target sm_90a' "$bin" || { log "FAILED: no sm_90a PTX embedded in $bin"; exit 1; }

log "ok: llm-worker-rbee-cuda builds and links for CUDA 13.0 / sm_90a ($(du -h "$bin" | cut -f1)); total $((SECONDS - start))s"
