"""The CNN's forward pass without torch: numpy im2col, OpenCV's DNN module, onnxruntime.

    .venv/bin/python benchmarks/bench_cnn.py [--weights weights/mnist-cnn.safetensors]

For each option, in a fresh process pinned to one core: cost per image in batches of 64
(median of 7 timings of 20 batches; the range is shown), start-up (interpreter start to
the first answer: imports, reading the weights, building the network) and RSS after it,
and the largest difference from torch's logits on the same batch. The service runs
onnxruntime (digitwatch/classify.py says why); numpy and cv2.dnn are kept here, as
measured alternatives. The MLP's numpy forward is shown for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH = 64

# The numpy im2col forward, measured and not shipped: what a pure-numpy service would run.
NUMPY_CNN = '''
import numpy as np

def conv3x3_pool(h, w, b):
    """(B, H, W, C) -> 3x3 conv (padding 1) as one im2col product, 2x2 max-pool rounding
    up, then bias and ReLU (they commute with the max). w is (9C, O) in (dy, dx, c) order."""
    n, hh, ww, c = h.shape
    p = np.zeros((n, hh + 2, ww + 2, c), np.float32)
    p[:, 1:-1, 1:-1] = h
    cols = np.concatenate(
        [p[:, dy : dy + hh, dx : dx + ww] for dy in range(3) for dx in range(3)], axis=3
    )
    y = (cols.reshape(n * hh * ww, 9 * c) @ w).reshape(n, hh, ww, -1)
    if hh % 2 or ww % 2:
        y = np.pad(y, ((0, 0), (0, hh % 2), (0, ww % 2), (0, 0)), constant_values=-np.inf)
    y = np.maximum(
        np.maximum(y[:, 0::2, 0::2], y[:, 0::2, 1::2]),
        np.maximum(y[:, 1::2, 0::2], y[:, 1::2, 1::2]),
    )
    y += b
    np.maximum(y, 0, out=y)
    return y

class NumpyCNN:
    def __init__(self, params, blocks):
        self.convs = []
        for i in range(blocks):
            w = params[f"convs.{i}.weight"]  # (O, C, 3, 3)
            self.convs.append(
                (w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]).copy(), params[f"convs.{i}.bias"])
            )
        fc1 = params["fc1.weight"]  # torch's (c, y, x) order -> channels-last (y, x, c)
        c = self.convs[-1][0].shape[1]
        side = round((fc1.shape[1] / c) ** 0.5)
        self.fc1 = fc1.reshape(-1, c, side, side).transpose(2, 3, 1, 0).reshape(-1, len(fc1)).copy()
        self.b1, self.b2 = params["fc1.bias"], params["fc2.bias"]
        self.fc2 = params["fc2.weight"].T.copy()

    def __call__(self, x):
        h = x.reshape(-1, 28, 28, 1)
        for w, b in self.convs:
            h = conv3x3_pool(h, w, b)
        z = h.reshape(len(x), -1) @ self.fc1 + self.b1
        np.maximum(z, 0, out=z)
        return z @ self.fc2 + self.b2
'''

CHILD = """
import os, sys, time, json
t0 = float(sys.argv[3])
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
option, weights = sys.argv[1], sys.argv[2]
import numpy as np
from pathlib import Path
from digitwatch.classify import load_weights, onnx_path
from digitwatch.libc import single_threaded_blas
x = np.load(sys.argv[4])
if option == "numpy":
    exec(NUMPY_CNN)
    single_threaded_blas()
    w = load_weights(Path(weights))
    net = NumpyCNN(w.params, len(w.meta["architecture"]["channels"]))
    forward = lambda b: net(b)
elif option == "cv2.dnn":
    import cv2
    cv2.setNumThreads(1)
    w = load_weights(Path(weights))
    dnn = cv2.dnn.readNetFromONNX(np.frombuffer(w.graph, np.uint8))
    def forward(b):
        dnn.setInput(b.reshape(-1, 1, 28, 28))
        return dnn.forward()
else:  # onnxruntime, mlp: what the service runs
    from digitwatch.classify import Classifier
    c = Classifier(load_weights(Path(weights)))
    forward = lambda b: c.logits(b)[0]
out = np.asarray(forward(x), np.float32)
startup = time.time() - t0
for _ in range(5):
    forward(x)
runs = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(20):
        forward(x)
    runs.append((time.perf_counter() - t) / 20 / len(x) * 1000)
np.save(sys.argv[5], out)
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
print(json.dumps({"runs": sorted(runs), "startup": startup, "rss": rss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=REPO / "weights" / "mnist-cnn.safetensors")
    ap.add_argument("--mlp", type=Path, default=REPO / "weights" / "mnist-mlp.safetensors")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_cnn"))
    args = ap.parse_args()
    import numpy as np

    from digitwatch.mnist import MNIST_MEAN, MNIST_STD, load_mnist
    from digitwatch.preprocess import deskew_all
    from digitwatch.settings import load

    args.out.mkdir(parents=True, exist_ok=True)
    images, _ = load_mnist(load({}).data_dir, train=False, download=False)
    x = deskew_all(images[:BATCH]).reshape(BATCH, -1).astype(np.float32) / 255 - MNIST_MEAN
    x /= MNIST_STD
    np.save(args.out / "x.npy", x)
    reference = None
    try:
        import torch

        from digitwatch.model import load_torch_model

        with torch.no_grad():
            reference = load_torch_model(args.weights)(torch.from_numpy(x)).numpy()
    except ImportError:
        pass
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; one core each")
    print("| option | us per image, batch 64 (range) | start-up | RSS | max logit diff vs torch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1"}
    for option in ("numpy", "cv2.dnn", "onnxruntime", "mlp"):
        weights = args.mlp if option == "mlp" else args.weights
        out = args.out / f"{option}.npy"
        code = f"NUMPY_CNN = {NUMPY_CNN!r}\n{CHILD}"
        argv = [option, str(weights), repr(time.time()), str(args.out / "x.npy"), str(out)]
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True
        )
        if done.returncode:
            print(f"| {option} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        runs = r["runs"]
        diff = "–"
        if reference is not None and option != "mlp":
            diff = f"{float(np.abs(np.load(out) - reference).max()):.1e}"
        name = "MLP, numpy (the service's)" if option == "mlp" else option
        print(
            f"| {name} | {runs[3] * 1000:.0f} ({runs[0] * 1000:.0f}-{runs[-1] * 1000:.0f}) "
            f"| {r['startup']:.2f} s | {r['rss']:.0f} MB | {diff} |"
        )


if __name__ == "__main__":
    main()
