#!/usr/bin/env bash
# Builds the worker's OCI image with buildah from deploy/Containerfile: FROM scratch, the binary,
# exactly the shared libraries `ldd` says it links (the dynamic loader included), a passwd/group
# with the non-root user rbee (65532). No base image is pulled and no container runtime is run
# (the Containerfile has no RUN step). buildah is installed from Debian's packages if missing.
#
# Usage:  scripts/build-image.sh [--backend cpu|cuda] [--bin PATH] [--tag TAG] [--output DIR]
#                                [--root DIR] [--keep-debug]
#   --backend     cpu (default) or cuda: which binary, which libraries, the BACKEND build arg
#   --bin         the worker binary to put in the image (default: build the release binary,
#                 target/release/llm-worker-rbee-cpu, or for cuda target/cuda/release/
#                 llm-worker-rbee-cuda with scripts/setup-cuda-toolchain.sh's toolchain)
#   --tag         the image name (default: localhost/llm-worker-rbee:<backend>)
#   --output DIR  also write the image to DIR as an OCI image layout (index.json, blobs/), which
#                 `skopeo copy oci:DIR docker://REGISTRY/...` pushes and the tests unpack
#   --root DIR    keep the image in a containers-storage of its own under DIR (vfs driver)
#                 instead of the system's, which podman shares
#   --keep-debug  keep the binary's debug info (line tables: about 90 MB more; function
#                 names for backtraces stay either way)
# Env:    STORAGE_DRIVER  buildah's storage driver for the system storage (its default: overlay)
# Prints the image's size on its last line.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BACKEND=cpu
BIN=""
TAG=""
OUTPUT=""
ROOT=""
KEEP_DEBUG=0

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --backend) BACKEND=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --output) OUTPUT=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --keep-debug) KEEP_DEBUG=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
case "$BACKEND" in
    cpu|cuda) ;;
    *) die "--backend must be cpu or cuda, not $BACKEND" ;;
esac
TAG=${TAG:-localhost/llm-worker-rbee:$BACKEND}

# buildah (and objcopy) from Debian's packages. --no-install-recommends: a runtime (crun/runc),
# slirp and fuse-overlayfs are only needed for RUN steps and rootless storage, which this build
# has none of.
packages=()
command -v buildah >/dev/null || packages+=(buildah)
command -v objcopy >/dev/null || packages+=(binutils)
if [[ ${#packages[@]} -gt 0 ]]; then
    [[ $(id -u) -eq 0 ]] || die "missing ${packages[*]} (as root: apt-get install ${packages[*]})"
    log "installing ${packages[*]} with apt-get"
    start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; } ||
        die "apt-get install ${packages[*]} failed"
    log "installed in $((SECONDS - start))s"
fi

# The binary.
if [[ -z "$BIN" ]]; then
    cd "$REPO"
    if [[ $BACKEND == cpu ]]; then
        log "building llm-worker-rbee-cpu (release)"
        cargo build --release --bin llm-worker-rbee-cpu
        BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/llm-worker-rbee-cpu"
    else
        eval "$(scripts/setup-cuda-toolchain.sh)"
        log "building llm-worker-rbee-cuda (release, CUDA $(nvcc --version | tail -n1))"
        CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target/cuda} \
            cargo build --release --features cuda --bin llm-worker-rbee-cuda
        BIN="${CARGO_TARGET_DIR:-$REPO/target/cuda}/release/llm-worker-rbee-cuda"
    fi
fi
[[ -x "$BIN" ]] || die "no executable at $BIN"
BIN=$(readlink -f "$BIN")

# The CUDA libraries of scripts/setup-cuda-toolchain.sh are found by ldd (and copied) only with
# their directory on LD_LIBRARY_PATH.
if [[ $BACKEND == cuda && -z "${CUDA_ROOT:-}" ]]; then
    eval "$(cd "$REPO" && scripts/setup-cuda-toolchain.sh)"
fi
ldd_path=${LD_LIBRARY_PATH:-}
[[ $BACKEND == cuda ]] && ldd_path="$CUDA_ROOT/lib${ldd_path:+:$ldd_path}"

CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/llm-worker-image.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
tree="$CONTEXT/$BACKEND"
# /home is in the tree (root-owned); the user's home in it is copied apart, owned by the user.
mkdir -p "$tree/usr/local/bin" "$tree/etc" "$tree/home" "$CONTEXT/home"

if [[ $KEEP_DEBUG -eq 1 ]]; then
    cp "$BIN" "$tree/usr/local/bin/llm-worker-rbee"
else
    # Line tables are of no use without the sources beside them; symbols stay for backtraces.
    objcopy --strip-debug "$BIN" "$tree/usr/local/bin/llm-worker-rbee"
fi

# Exactly what the binary links, as ldd resolves it on this machine. Lines are
# `name => /path (addr)`, `/path (addr)` (the loader) or `name (addr)` (the vDSO, in no file).
# glibc 2.34 and later have the NSS `files` and `dns` modules built in, so host-name lookups
# (the heartbeat's hive URL) need no libnss_* files; the runtime provides resolv.conf and hosts.
libc_dir=""
libs=()
missing=()
while read -r line; do
    case "$line" in
        *"=> not found"*)
            name=${line%% *}
            case "$name" in
                # The NVIDIA driver: the container toolkit mounts the host's (cuda image).
                libcuda.so*|libnvidia-*) log "not copied: $name (the host's driver provides it)" ;;
                *) missing+=("$name") ;;
            esac ;;
        *"=> /"*)
            path=${line#*=> }
            libs+=("${path%% (*}") ;;
        /*)
            libs+=("${line%% (*}") ;;
    esac
done < <(LD_LIBRARY_PATH="$ldd_path" ldd "$BIN")
[[ ${#missing[@]} -eq 0 ]] || die "ldd cannot find ${missing[*]} for $BIN"
for lib in "${libs[@]}"; do
    [[ $(basename "$lib") == libc.so.* ]] && libc_dir=$(dirname "$lib")
done
[[ -n "$libc_dir" ]] || die "ldd names no libc for $BIN (a static binary needs no libraries: not handled)"
for lib in "${libs[@]}"; do
    name=$(basename "$lib")
    case "$name" in
        libcuda.so*|libnvidia-*) log "not copied: $lib (the host's driver provides it)"; continue ;;
    esac
    case "$lib" in
        # System libraries and the loader go where ldd found them (the loader at the path the
        # binary's PT_INTERP names).
        /lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*) dest="$tree$lib" ;;
        # Anything else (the CUDA wheels' libraries) beside libc, a directory the loader
        # searches without an ld.so.cache or LD_LIBRARY_PATH.
        *) dest="$tree$libc_dir/$name" ;;
    esac
    mkdir -p "$(dirname "$dest")"
    cp -L "$lib" "$dest"
done

cat >"$tree/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
rbee:x:65532:65532:rbee:/home/rbee:/sbin/nologin
EOF
cat >"$tree/etc/group" <<'EOF'
root:x:0:
rbee:x:65532:
EOF
cp "$REPO/deploy/Containerfile" "$CONTEXT/Containerfile"

log "context: $(mib "$(du -sb "$tree" | cut -f1)") for $BACKEND: the binary ($(mib "$(stat -c %s "$tree/usr/local/bin/llm-worker-rbee")")) and ${#libs[@]} libraries: $(printf '%s ' "${libs[@]##*/}")"

buildah=(buildah)
if [[ -n "$ROOT" ]]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    # vfs: plain directories, works wherever the process can write (no overlay mounts, which a
    # container inside a container may not allow).
    buildah+=(--root "$ROOT/storage" --runroot "$ROOT/run" --storage-driver vfs)
fi

# A rebuild under the same tag leaves the previous image untagged: removed below, so that
# repeated builds do not pile up copies of the binary in the storage.
previous=$("${buildah[@]}" images --quiet --no-trunc "$TAG" 2>/dev/null | head -n1 || true)

start=$SECONDS
"${buildah[@]}" build --quiet --layers=false --build-arg "BACKEND=$BACKEND" -t "$TAG" \
    -f "$CONTEXT/Containerfile" "$CONTEXT" >/dev/null
log "built $TAG in $((SECONDS - start))s"
current=$("${buildah[@]}" images --quiet --no-trunc "$TAG" | head -n1)
if [[ -n "$previous" && "$previous" != "$current" ]]; then
    "${buildah[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi

if [[ -n "$OUTPUT" ]]; then
    rm -rf "$OUTPUT"
    mkdir -p "$(dirname "$OUTPUT")"
    ref=${TAG##*/}
    [[ $ref == *:* ]] && ref=${ref##*:} || ref=latest
    "${buildah[@]}" push --quiet "$TAG" "oci:$OUTPUT:$ref" >/dev/null
    compressed=$(find "$OUTPUT/blobs" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
    log "wrote the OCI image layout $OUTPUT ($(mib "$compressed") with gzip-compressed layers)"
fi

size=$("${buildah[@]}" images --format '{{.Size}}' "$TAG" | head -n1)
echo "image $TAG ($BACKEND): $size"
