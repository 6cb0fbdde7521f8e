#!/usr/bin/env bash
# Regenerate the committed seed corpora of the fuzz targets (fuzz/seeds/<target>/) with Kestrel's
# own code (fuzz/src/seeds.rs: the exporter's models, the runtime's engine files, synthetic scenes
# and datasets, the KServe request encoder). The generator runs as an ignored test of the normal
# workspace build, so it needs no nightly toolchain and no sanitizer build.
set -euo pipefail
cd "$(dirname "$0")/.."
KESTREL_FUZZ_SEEDS_OUT="$PWD/fuzz/seeds" nice -n 19 cargo test -p kestrel-tests --locked \
    --test fuzz_regressions -- --ignored --exact write_fuzz_seeds --nocapture
du -sh fuzz/seeds
