"""Run onnx.checker.check_model(full_check=True) on each model path given; exit non-zero on failure."""
import sys

import onnx

for path in sys.argv[1:]:
    # Passing the path (not a loaded proto) lets the checker handle models over 2 GB too.
    onnx.checker.check_model(path, full_check=True)
    print(f"ok {path}")
