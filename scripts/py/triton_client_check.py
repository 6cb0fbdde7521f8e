"""Check `kestrel serve` with Triton's official HTTP client (tritonclient[http]): liveness and
readiness, model metadata, and one inference with binary tensors and one with JSON tensors,
compared with a reference output.

usage: triton_client_check.py HOST:PORT MODEL INPUT.f32 REFERENCE.f32
Prints JSON: the readiness answers, the metadata's input shape and the largest difference of each
inference from the reference.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, model, inp, ref = sys.argv[1:5]
client = httpclient.InferenceServerClient(url=url)
meta = client.get_model_metadata(model)
shape = meta["inputs"][0]["shape"]
x = np.fromfile(inp, dtype="<f4").reshape(1, 3, int(shape[2]), int(shape[3]))
diffs = {}
for binary in (True, False):
    tensor = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = httpclient.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)
    result = client.infer(model, [tensor], outputs=[wanted])
    y = result.as_numpy(meta["outputs"][0]["name"])
    reference = np.fromfile(ref, dtype="<f4").reshape(y.shape)
    diffs["binary" if binary else "json"] = float(np.abs(y - reference).max())
print(json.dumps({
    "server_live": client.is_server_live(),
    "server_ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "input_shape": shape,
    "max_abs_diff": diffs,
}))
