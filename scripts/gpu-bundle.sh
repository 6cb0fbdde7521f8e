#!/usr/bin/env bash
# Pack what the GPU machine runs: the GPU test binaries and the `kestrel` binary, compressed so
# they fit the 64 MiB a device call carries. Then call the device tool with carry [".gpux"] and
#   bash scripts/gpu-validate.sh                                   # tests, benchmark, profiles; or
#   tar xJf .gpux/bundle.tar.xz; export KESTREL_WORKSPACE=$PWD KESTREL_PYTHON=/opt/torch/.venv/bin/python
#   bash .gpu/run-tests.sh                                         # GPU tests only (the INT8 ones call
#                                                                  # onnxruntime through that Python;
#                                                                  # run-tests.sh takes no arguments:
#                                                                  # its env.sh would exec them)
#   tar xJf .gpux/bundle.tar.xz; OUT=$OUT bash bench/gpu.sh         # Kestrel vs the PyTorch peer
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/tools/gpu-bundle -- -p kestrel-tests --test cuda_engine --test cuda_pre --test cuda_post \
  --test end2end \
  --test cuda_masks
# Without GStreamer: the GPU machine has none (no `kestrel pipeline` there).
cargo build --release --locked -p kestrel-service --no-default-features
cp target/release/kestrel .gpu/bin/ && strip .gpu/bin/kestrel
grep -qx '/.gpux/' .git/info/exclude 2>/dev/null || echo '/.gpux/' >> .git/info/exclude
mkdir -p .gpux && rm -f .gpux/bundle.tar.xz
tar -cJf .gpux/bundle.tar.xz .gpu
du -h .gpux/bundle.tar.xz
