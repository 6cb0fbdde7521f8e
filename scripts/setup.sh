#!/usr/bin/env bash
# Idempotent setup for a Debian 12 machine: system packages, a project-local Python venv with the
# reference tools (onnx, onnxruntime, pycocotools) and libtorch for the trainer, and a check of the
# Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# GStreamer 1.22 (headers for the plugin crate, the check library for its tests, gst-launch-1.0 and
# the base/good elements the pipelines use: videoconvert, videotestsrc, pngenc, multifilesink), and
# Prometheus for `promtool check metrics` on the service's /metrics.
for pkg in pkg-config python3-venv fonts-dejavu-core g++ libgstreamer1.0-dev \
    libgstreamer-plugins-base1.0-dev gstreamer1.0-tools gstreamer1.0-plugins-base \
    gstreamer1.0-plugins-good prometheus; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]} with apt-get"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is not installed. Install Rust 1.92 or newer (rustup), then run this again." >&2
  exit 1
fi
rustc_minor=$(rustc --version | sed -E 's/rustc 1\.([0-9]+).*/\1/')
if [ "$rustc_minor" -lt 92 ]; then
  echo "setup: rustc $(rustc --version) is too old; Kestrel needs 1.92 or newer (rustup update)." >&2
  exit 1
fi
# The TensorRT 11 headers the `tensorrt` feature compiles its shim against: the source of the
# trtx-sys crate, put into the cargo registry by cargo itself (nothing is built; see
# runtime/tensorrt-headers/Cargo.toml). Quick and quiet when already there.
cargo fetch --locked --quiet --manifest-path runtime/tensorrt-headers/Cargo.toml

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating the Python venv in .venv"
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the reference tools into .venv (onnx, onnxruntime, pycocotools, tritonclient)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi
# libtorch for the trainer (tch): PyTorch's wheel without its dependencies (there is no CPU-only
# wheel on PyPI), plus the two small CUDA runtime wheels libtorch_cuda needs to load. The trainer
# finds it through .venv/torch (see .cargo/config.toml).
torch_stamp=.venv/.torch.sha256
torch_want=$(sha256sum scripts/requirements-torch.txt | cut -d' ' -f1)
if [ "$(cat "$torch_stamp" 2>/dev/null)" != "$torch_want" ]; then
  echo "setup: installing libtorch (the torch 2.11 wheel, no dependencies) into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r scripts/requirements-torch.txt
  echo "$torch_want" > "$torch_stamp"
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn "$site/torch" .venv/torch
echo "setup: ready"
