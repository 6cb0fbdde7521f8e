#!/usr/bin/env bash
# Set up, then run every test of the workspace (CPU only; GPU tests are #[ignore]d here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# NVRTC from the venv, so the kernel-compilation test really compiles kernels.cu here.
nvrtc_lib=$(.venv/bin/python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KESTREL_REQUIRE_NVRTC=1
# The GStreamer plugin as a shared library, for the gst-launch-1.0 / gst-inspect-1.0 tests.
cargo build --locked -p gst-kestrel
cargo test --workspace --locked
