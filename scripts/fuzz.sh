#!/usr/bin/env bash
# Run each fuzz target for a set time, one after another, and record what happened.
#
#   bash scripts/fuzz.sh SECONDS [TARGET...]       (what `make fuzz FUZZ_SECONDS=...` runs)
#
# Each target runs as one libFuzzer process (no -jobs/-fork workers: the build machine has two
# cores and other builds share them) under `nice -n 19`, on its working corpus
# fuzz/corpus/<target>/ (git-ignored, grown by libFuzzer) seeded from the committed
# fuzz/seeds/<target>/. A crash stops that target and is kept under fuzz/artifacts/<target>/;
# the next target still runs. The figures (executions, exec/s, corpus, crashes) go to
# bench/results/fuzz-<date>.json, and scripts/fuzz_report.py rewrites the table of
# docs/RELIABILITY.md from every such file (FUZZ_TAG=x names it fuzz-<date>-x.json, so that two
# runs can go side by side). Exits non-zero when some target crashed.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${1:?usage: fuzz.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(onnx_model engine_file image_decode kserve_request yolo_labels coco_json repository_config)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: nice -n 19 cargo install cargo-fuzz --locked" >&2
    exit 2
fi

# One thread for tract's matrix products: the runs stay one core each.
export KESTREL_CPU_THREADS=1
logs=fuzz/logs${FUZZ_TAG:+-$FUZZ_TAG}
mkdir -p "$logs"
date_tag=$(date -u +%Y%m%d)
results=()
status=0
(cd fuzz && nice -n 19 cargo +nightly fuzz build) || exit 2
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before=$(ls "fuzz/artifacts/$t" | wc -l)
    log="$logs/$t.log"
    echo "== $t: $seconds s" >&2
    started=$(date +%s)
    (cd fuzz && nice -n 19 cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1) \
        >"$log" 2>&1
    rc=$?
    elapsed=$(($(date +%s) - started))
    after=$(ls "fuzz/artifacts/$t" | wc -l)
    [ "$rc" -ne 0 ] && status=1
    results+=("$t $seconds $elapsed $rc $((after - before))")
    tail -n 12 "$log" >&2
done
printf '%s\n' "${results[@]}" | python3 scripts/fuzz_report.py record \
    --out "bench/results/fuzz-$date_tag${FUZZ_TAG:+-$FUZZ_TAG}.json" --logs "$logs" \
    --command "make fuzz FUZZ_SECONDS=$seconds FUZZ_TARGETS='${targets[*]}'"
python3 scripts/fuzz_report.py table --results bench/results --doc docs/RELIABILITY.md
exit $status
