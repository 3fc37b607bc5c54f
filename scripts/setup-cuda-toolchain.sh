#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain from PyPI wheels into a cache directory, outside git, and
# prints the environment that `cargo build --features cuda` needs.
#
# Usage:  eval "$(scripts/setup-cuda-toolchain.sh)"
# Output: `export NAME=value` lines on stdout (also written to $PREFIX/env.sh); progress on stderr.
# Env:    LLM_WORKER_CACHE  cache directory (default: ~/.cache/llm-worker-rbee)
#         PYTHON            interpreter whose pip downloads the wheels (default: python3)
#
# Why these pins: the GPU machines we may be lent run driver 580 (CUDA 13.0) on H100/H200
# (compute capability 9.0). PTX written by a newer nvcc carries a PTX ISA that driver 580 cannot
# JIT, so nvcc, its front end and the headers are all CUDA 13.0 (update 1).
# What the build needs, found by building: nvcc (+ crt headers, nvvm/cicc, cccl) for
# candle-kernels' PTX and libmoe.a; cudart for candle-kernels' link line; cublas, cublasLt,
# curand and nvrtc for cudarc's `dynamic-linking` link line; libcuda (the driver) for the same
# link line, which no wheel ships: a stub exporting the driver API's names stands in for it at
# link time only, as NVIDIA's own lib64/stubs/libcuda.so does. At run time the GPU machine's
# driver and CUDA libraries are used.
#
# Idempotent: an install whose stamp matches the pins is reused as is.
set -euo pipefail

PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.88
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)
COMPUTE_CAP=90

CACHE=${LLM_WORKER_CACHE:-"$HOME/.cache/llm-worker-rbee"}
PREFIX="$CACHE/cuda-13.0"
ROOT="$PREFIX/site/nvidia/cu13"
STAMP="$PREFIX/.installed"
PYTHON=${PYTHON:-python3}

log() { printf '[setup-cuda-toolchain] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The layout line changes when this script changes what it adds to the wheels.
want_stamp=$(printf '%s\n' "${PINS[@]}" "layout=2")

install() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (needed for pip)"
    command -v gcc >/dev/null || die "gcc not found (nvcc's host compiler, also builds the libcuda stub)"
    mkdir -p "$CACHE"
    local work
    work=$(mktemp -d "$CACHE/cuda-13.0.tmp.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT

    log "installing ${#PINS[@]} wheels with pip into $PREFIX (about 700 MB download)"
    # --no-deps: the pins are the whole closure we need; letting pip resolve would pull newer
    # 13.x wheels that nvcc 13.0 does not match.
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --only-binary=:all: --target "$work/site" "${PINS[@]}" >&2

    local root="$work/site/nvidia/cu13"
    [[ -x "$root/bin/nvcc" ]] || die "no executable bin/nvcc in the installed wheels"
    [[ -x "$root/nvvm/bin/cicc" ]] || chmod +x "$root/nvvm/bin/cicc"

    # The linker looks for the unversioned names; the wheels ship only the SONAME files.
    local lib so found
    for lib in cudart cublas cublasLt curand nvrtc; do
        found=""
        for so in "$root/lib/lib$lib.so."*; do
            [[ "$(basename "$so")" =~ ^lib$lib\.so\.[0-9]+$ ]] && { found=$(basename "$so"); break; }
        done
        [[ -n "$found" ]] || die "lib$lib.so.N missing from the wheels"
        ln -sfn "$found" "$root/lib/lib$lib.so"
    done
    # cudaforge and some tools expect lib64 beside lib.
    ln -sfn lib "$root/lib64"

    # Link-time stand-in for the driver: every cu* name that cuda.h declares or maps to, each
    # returning CUDA_ERROR_STUB_LIBRARY (34). Its SONAME is the driver's, so the binary asks the
    # loader for the real libcuda.so.1 at run time. It lives in lib/stubs, which is never put on
    # LD_LIBRARY_PATH.
    mkdir -p "$root/lib/stubs"
    "$PYTHON" - "$root/include/cuda.h" "$work/cuda_stub.c" <<'PY'
import re, sys
header, out = sys.argv[1:]
text = open(header, encoding="utf-8", errors="replace").read()
names = set(re.findall(r"\b(cu[A-Z][A-Za-z0-9_]*)\s*\(", text))
for a, b in re.findall(r"#\s*define\s+(cu[A-Z]\w*)\s+(cu[A-Z]\w*)", text):
    names.update((a, b))
if len(names) < 400:
    sys.exit(f"only {len(names)} driver API names found in {header}")
with open(out, "w") as f:
    f.write("/* generated from cuda.h: link-time stub for libcuda.so.1 */\n")
    for n in sorted(names):
        f.write(f"int {n}(void) {{ return 34; }}\n")
PY
    gcc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$work/cuda_stub.c"

    # A one-line kernel proves nvcc, cicc, ptxas and the headers work together.
    printf '__global__ void k(float *x) { x[threadIdx.x] *= 2.0f; }\n' >"$work/probe.cu"
    "$root/bin/nvcc" -gencode=arch=compute_90a,code=sm_90a -c -o "$work/probe.o" "$work/probe.cu" >&2 \
        || die "nvcc could not compile a probe kernel"
    "$root/bin/nvcc" --ptx -arch=compute_90 -o "$work/probe.ptx" "$work/probe.cu" >&2 \
        || die "nvcc could not emit PTX for a probe kernel"

    printf '%s\n' "$want_stamp" >"$work/.installed"
    chmod 755 "$work"
    rm -f "$work/cuda_stub.c" "$work/probe.cu" "$work/probe.o" "$work/probe.ptx"
    rm -rf "$PREFIX"
    mv "$work" "$PREFIX"
    trap - EXIT
    log "installed CUDA 13.0 toolchain in $PREFIX"
}

# One installer at a time: a second one (CI beside a developer's build) waits, then finds the
# stamp, instead of replacing the tree under the first one's feet.
mkdir -p "$CACHE"
exec 9>"$CACHE/cuda-13.0.lock"
flock 9
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" && -x "$ROOT/bin/nvcc" ]]; then
    log "using cached toolchain in $PREFIX"
else
    install
fi

nvcc_version=$("$ROOT/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[[ "$nvcc_version" == "13.0" ]] || die "nvcc reports release '$nvcc_version', expected 13.0"

# CUDA_ROOT/CUDA_PATH/CUDA_HOME: cudarc's link search and cudaforge's nvcc lookup read them.
# PATH: cudarc's build script runs `nvcc --version` to pick its CUDA 13.0 bindings.
# LIBRARY_PATH: the final link finds cudart & co. and the driver stub without rpath tricks.
# CUDA_COMPUTE_CAP: no GPU here for nvidia-smi; cudaforge turns 90 into sm_90a/compute_90a,
# which runs on H100 and H200 only.
cat >"$PREFIX/env.sh" <<EOF
export CUDA_ROOT='$ROOT'
export CUDA_PATH='$ROOT'
export CUDA_HOME='$ROOT'
export NVCC='$ROOT/bin/nvcc'
export PATH='$ROOT/bin':"\$PATH"
export LIBRARY_PATH='$ROOT/lib:$ROOT/lib/stubs'"\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=$COMPUTE_CAP
EOF
cat "$PREFIX/env.sh"
