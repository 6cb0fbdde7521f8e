# Developer entry points that are not plain cargo commands.

FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= onnx_model engine_file image_decode kserve_request yolo_labels coco_json repository_config

.PHONY: fuzz fuzz-corpus fuzz-table

# Each fuzz target for FUZZ_SECONDS seconds, one after another (needs cargo-fuzz and a nightly
# toolchain); figures to bench/results/fuzz-<date>.json and the table of docs/RELIABILITY.md.
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Regenerate the committed seed corpora (fuzz/seeds/) with Kestrel's own code.
fuzz-corpus:
	bash scripts/fuzz-corpus.sh

# Rewrite the fuzzing table of docs/RELIABILITY.md from bench/results/fuzz-*.json.
fuzz-table:
	python3 scripts/fuzz_report.py table --results bench/results --doc docs/RELIABILITY.md
