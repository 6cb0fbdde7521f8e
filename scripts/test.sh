#!/usr/bin/env bash
# Set up, then run every test of the workspace (CPU only; GPU tests are #[ignore]d here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# NVRTC from the venv, so the kernel-compilation test really compiles kernels.cu here.
nvrtc_lib=$(.venv/bin/python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KESTREL_REQUIRE_NVRTC=1
# Everything the tests need, in one build with the tests' feature set; this also writes the
# GStreamer plugin's shared library (target/debug/libgstkestrel.so) for the gst-launch-1.0 and
# gst-inspect-1.0 tests, which `cargo test` alone does not.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
# The TensorRT backend (feature `tensorrt`; no TensorRT here): its shim compiles against the
# TensorRT 11 headers, its unit tests (everything that needs no libnvinfer, and every entry point
# failing with the missing library named), the CLI built with it, and its doctor/error tests.
# One invocation, so dependency features stay those of the workspace build above (only our own
# crates recompile; see the feature-unification block in service/Cargo.toml).
cargo test -p kestrel-runtime -p kestrel-service --features kestrel-service/tensorrt --lib \
    --test cli --locked -- tensorrt engine doctor
# Deployment files (deploy/): the Grafana dashboard's and the alert rules' metric names against
# the service's, promtool check/test rules, the Kubernetes base validated against the API schemas,
# the Dockerfile and the systemd unit; then the Dockerfile's own `cargo build` command (without
# --release: the workspace's debug build already holds the dependencies).
.venv/bin/python scripts/check-deploy.py
read -ra docker_build < <(.venv/bin/python scripts/check-deploy.py --docker-build-debug)
"${docker_build[@]}"
