#!/usr/bin/env python3
"""Times SAM's large products two ways in libtorch (this venv's torch, 2 threads): as a linear
layer / matrix product (MKL sgemm for fp32) and as a 1x1 convolution (oneDNN). On the AMD build
machine MKL took a generic path at about half oneDNN's speed, which is why src/model routes
fp32 CPU products through convolutions (common::linear_with). Prints JSON lines."""
import json
import platform
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def median_ms(f, n=20):
    f()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    ts.sort()
    return ts[n // 2] * 1e3


def as_conv1x1(a, w, b):
    m, k = a.shape
    n = w.shape[0]
    x = a.view(1, 1, m, k).permute(0, 3, 1, 2)  # rows as channels-last pixels
    return F.conv2d(x, w.view(n, k, 1, 1), b).permute(0, 2, 3, 1).reshape(m, n)


cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
# (rows, in, out): vit_b's MLP, qkv and output projections, the decoder's upscaling and its
# first block's image projections, and one decoder-token product.
shapes = [(4096, 768, 3072), (4096, 3072, 768), (4096, 768, 2304), (4096, 768, 768), (4096, 256, 1024), (16384, 64, 128), (4096, 256, 128), (8, 256, 2048)]
for dt in (torch.float32, torch.bfloat16):
    for m, k, n in shapes:
        a, w, b = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt), torch.randn(n, dtype=dt)
        lin = median_ms(lambda: F.linear(a, w, b))
        conv = median_ms(lambda: as_conv1x1(a, w, b))
        gflop = 2 * m * k * n / 1e9
        print(json.dumps({"cpu": cpu, "torch": torch.__version__, "dtype": str(dt).split(".")[1], "rows": m, "in": k, "out": n,
                          "linear_ms": round(lin, 3), "conv1x1_ms": round(conv, 3),
                          "linear_gflops": round(gflop / lin * 1e3), "conv1x1_gflops": round(gflop / conv * 1e3)}))
