#!/usr/bin/python3
"""PyTorch reference timings for hra_bench_conv (issue #13).

Times, on the CPU with a fixed number of intra-op threads (torch.set_num_threads), the forward
pass and the forward+backward pass of

  frozen    F.conv2d(x, W, b) with W, b frozen; fwdbwd back-propagates to x (dX), as the C++
            "frozen" cases do
  full      the same with W trainable (dW and dX)
  lora      PEFT's lora.Conv2d: F.conv2d(x, W, b) + lora_B(lora_A(x)) * alpha / r, lora_A a conv
            with the base kernel/stride/padding and r output channels, lora_B a 1x1 conv
            (gradients to A, B and x)
  peft_hra  PEFT's HRAConv2d.forward restated: the dense D x D H from r Householder
            reflections, W.view(C_out, -1) @ H, then F.conv2d with the merged weight
            (gradients to hra_u and x)

at the shapes of bench/bench_conv.cpp: ResNet-like 64->64 3x3 on 56x56 and 256->256 3x3 on
14x14 (n = 32), a small CNN on 28x28 images (1->16 3x3, 16->32 3x3 stride 2, 32->32 3x3
stride 2 on 14x14; n = 128) and the main job's CNN (1->8 3x3 stride 2 on 28x28, 8->16 3x3
stride 2 on 14x14; n = 128), padding 1, r = 8. "fwd" runs under torch.no_grad().
Each case is warmed up once, then repeated until --min-time seconds and --min-iters
iterations have passed; the median is reported.

Output: a table on stdout and, with --json FILE, a list of records
  {method, pass, C_in, H, C_out, k, stride, n, r, threads, ms_median, iterations, torch_version}
whose names match hra_bench_conv's cases (r = 0 for frozen and full).

Run with Debian's python3-torch, on an otherwise idle machine:
  /usr/bin/python3 bench/torch_conv_reference.py --threads 2 --json torch_conv.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

if __name__ == "__main__":
    # Debian's torch may run parts of its CPU work on OpenBLAS / OpenMP pools that read these
    # at load time: size them from --threads before torch is imported, unless already set.
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--threads", type=int, default=2)
    _threads = max(1, _pre.parse_known_args()[0].threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("torch_conv_reference.py needs PyTorch: apt-get install python3-torch "
             "and run it with /usr/bin/python3")

# (C_in, H, C_out, k, stride, n): the shapes of hra_bench_conv.
SHAPES = (
    (64, 56, 64, 3, 1, 32),
    (256, 14, 256, 3, 1, 32),
    (1, 28, 16, 3, 1, 128),
    (16, 28, 32, 3, 2, 128),
    (32, 14, 32, 3, 2, 128),
    (1, 28, 8, 3, 2, 128),
    (8, 14, 16, 3, 2, 128),
)
METHODS = ("frozen", "full", "lora", "peft_hra")
RANK = 8


def peft_hra_delta_weight(hra_u):
    """PEFT's get_delta_weight (apply_GS=False): H <- H - 2 (H u) u^T, one reflection a time."""
    d, r = hra_u.shape
    unit = hra_u / hra_u.norm(dim=0)
    h = torch.eye(d, dtype=hra_u.dtype)
    for i in range(r):
        u = unit[:, i:i + 1]
        h = h - 2 * h @ u @ u.t()
    return h


def build(method, shape, gen):
    """Returns (params, forward): forward(x) -> y; params get gradients in fwdbwd."""
    c_in, _, c_out, k, stride, _ = shape
    pad = k // 2
    d = c_in * k * k
    weight = torch.randn(c_out, c_in, k, k, generator=gen) / math.sqrt(d)
    bias = torch.randn(c_out, generator=gen) * 0.01

    def base(x, w=weight):
        return F.conv2d(x, w, bias, stride, pad)

    if method == "frozen":
        return [], base
    if method == "full":
        return [weight], base
    if method == "lora":
        lora_a = (torch.rand(RANK, c_in, k, k, generator=gen) * 2 - 1) / math.sqrt(d)
        lora_b = torch.randn(c_out, RANK, 1, 1, generator=gen) * 0.01
        scale = float(RANK) / RANK

        def forward(x):
            return base(x) + F.conv2d(F.conv2d(x, lora_a, None, stride, pad), lora_b) * scale

        return [lora_a, lora_b], forward
    hra_u = torch.randn(d, RANK, generator=gen) / math.sqrt(d)

    def forward(x):
        merged = (weight.view(c_out, -1) @ peft_hra_delta_weight(hra_u)).view(weight.shape)
        return base(x, merged)

    return [hra_u], forward


def measure(method, pas, shape, min_time, min_iters):
    c_in, h, c_out, k, stride, n = shape
    gen = torch.Generator().manual_seed(1234)
    params, forward = build(method, shape, gen)
    x = torch.randn(n, c_in, h, h, generator=gen)
    with torch.no_grad():
        grad_out = torch.randn(forward(x).shape, generator=gen)
    if pas == "fwd":
        def step():
            with torch.no_grad():
                forward(x)
    else:
        for p in params:
            p.requires_grad_(True)
        x.requires_grad_(True)
        leaves = params + [x]

        def step():
            for t in leaves:
                t.grad = None
            forward(x).backward(grad_out)
    step()  # warm-up: allocator, thread pools, first touch
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per case (default 1)")
    p.add_argument("--min-iters", type=int, default=3, help="iterations per case (default 3)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--shapes", help="comma-separated indices into the shape list (0-6)")
    p.add_argument("--json", help="write the records to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    records = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':10} {'pass':7} {'C_in':>5} {'H':>4} {'C_out':>5} {'k':>2} {'s':>2} "
          f"{'n':>4} {'r':>2} {'ms':>10}")
    for shape in shapes:
        for method in methods:
            for pas in ("fwd", "fwdbwd"):
                ms, iters = measure(method, pas, shape, args.min_time, args.min_iters)
                c_in, h, c_out, k, stride, n = shape
                r = 0 if method in ("frozen", "full") else RANK
                print(f"{method:10} {pas:7} {c_in:5} {h:4} {c_out:5} {k:2} {stride:2} {n:4} "
                      f"{r:2} {ms:10.3f}", flush=True)
                records.append({"method": method, "pass": pas, "C_in": c_in, "H": h,
                                "C_out": c_out, "k": k, "stride": stride, "n": n, "r": r,
                                "threads": args.threads, "ms_median": round(ms, 4),
                                "iterations": iters, "torch_version": torch.__version__})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(records, out, indent=1)


if __name__ == "__main__":
    main()
