#!/usr/bin/env bash
# CI: a CUDA toolkit that still targets Volta (sm_70), which CUDA 13 cannot: Debian bookworm's
# `nvidia-cuda-toolkit` 11.8.89 (non-free; nvcc 11.8 targets sm_50..sm_90). Prints the path of
# its nvcc on stdout; everything else goes to stderr.
#
# Nothing of it is installed into the system: the two packages (toolkit binaries, and the CUDA
# headers of nvidia-cuda-dev) are downloaded with apt and unpacked into a folder outside the repo,
# reused between runs (a complete install pulls a NVIDIA driver library and GLX diversions, and
# 2.9 GB of CUDA libraries that `nvcc -c` never reads). The host compiler is g++-11, the newest
# that nvcc 11.8 supports (bookworm's default g++ 12 needs -allow-unsupported-compiler); it is
# installed with apt when missing. Needs root (or sudo) for apt on the first run only.
# Environment:
#   MOE_TRAIN_CUDA118_DIR  the unpacked toolkit (default ${TMPDIR:-/tmp}/moe_train_cuda118)
set -euo pipefail
dir="${MOE_TRAIN_CUDA118_DIR:-${TMPDIR:-/tmp}/moe_train_cuda118}"
bin="$dir/usr/lib/nvidia-cuda-toolkit/bin"
log() { echo "cuda118: $*" >&2; }

if [[ -f "$dir/.complete" && -x "$bin/nvcc" ]] && command -v g++-11 >/dev/null; then
  echo "$bin/nvcc"
  exit 0
fi

sudo=()
[[ $(id -u) == 0 ]] || sudo=(sudo)
t0=$(date +%s)
sources=/etc/apt/sources.list.d/moe-train-cuda118.sources
if [[ ! -f "$sources" ]]; then
  log "adding Debian bookworm contrib non-free to apt ($sources)"
  "${sudo[@]}" tee "$sources" >/dev/null <<'EOF'
# moe-train CI (.ci/cuda118_toolkit.sh): Debian's CUDA 11.8 toolkit, the last one here for sm_70
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
if ! apt-cache show nvidia-cuda-toolkit >/dev/null 2>&1 || ! command -v g++-11 >/dev/null; then
  log "apt-get update"
  "${sudo[@]}" apt-get update -qq
fi
if ! command -v g++-11 >/dev/null; then
  log "apt-get install g++-11 (the host compiler nvcc 11.8 supports)"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    g++-11 >&2
fi
t1=$(date +%s)

rm -rf "$dir"
mkdir -p "$dir/debs"
chmod a+rwx "$dir/debs"  # apt downloads as the _apt user
log "apt-get download nvidia-cuda-toolkit nvidia-cuda-dev (about 860 MB)"
(cd "$dir/debs" && apt-get download -q nvidia-cuda-toolkit nvidia-cuda-dev 2>&1 \
  | grep -v "couldn't be accessed by user '_apt'" >&2 || true)
t2=$(date +%s)
log "unpacking the toolkit and the CUDA headers into $dir"
dpkg-deb --fsys-tarfile "$dir"/debs/nvidia-cuda-toolkit_*.deb | tar -x -C "$dir"
dpkg-deb --fsys-tarfile "$dir"/debs/nvidia-cuda-dev_*.deb | tar -x -C "$dir" ./usr/include
rm -rf "$dir/debs"
# Debian's nvcc.profile (a link to /etc/nvcc.profile) names /usr paths: point it at this folder.
rm -f "$bin/nvcc.profile"
cat >"$bin/nvcc.profile" <<'EOF'
TOP = $(_HERE_)/../../..
NVVMIR_LIBRARY_DIR = $(_HERE_)/../libdevice
PATH += $(_HERE_):$(TOP)/bin:
INCLUDES += "-I$(TOP)/include" $(_SPACE_)
EOF
touch "$dir/.complete"
log "ready in $(( $(date +%s) - t0 )) s (apt $(( t1 - t0 )) s, download $(( t2 - t1 )) s," \
  "unpack $(( $(date +%s) - t2 )) s), $(du -sh "$dir" | cut -f1)"
echo "$bin/nvcc"
