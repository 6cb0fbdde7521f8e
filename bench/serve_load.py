"""A bounded load test of `kestrel serve` on loopback: REQUESTS image-endpoint requests from
CONCURRENCY client threads (each with its own keep-alive connection), one synthetic PNG.
Prints JSON: errors, throughput and latency percentiles (milliseconds).

usage: serve_load.py HOST:PORT MODEL IMAGE.png REQUESTS CONCURRENCY
"""
import http.client
import json
import sys
import threading
import time

host, model, image, total, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
body = open(image, "rb").read()
path = f"/v1/models/{model}/detect"
latencies, errors, lock = [], [], threading.Lock()
remaining = [total]


def worker():
    conn = http.client.HTTPConnection(host, timeout=60)
    while True:
        with lock:
            if remaining[0] == 0:
                break
            remaining[0] -= 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "image/png"})
            r = conn.getresponse()
            r.read()
            ok = r.status == 200
        except OSError as e:
            ok = False
            conn = http.client.HTTPConnection(host, timeout=60)
        dt = time.perf_counter() - t0
        with lock:
            (latencies if ok else errors).append(dt)


start = time.perf_counter()
pool = [threading.Thread(target=worker) for _ in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
wall = time.perf_counter() - start
latencies.sort()
pct = lambda p: 1e3 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else None
print(json.dumps({
    "requests": total, "concurrency": threads, "errors": len(errors), "wall_s": wall,
    "requests_per_s": len(latencies) / wall,
    "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": 1e3 * latencies[-1] if latencies else None},
}))
