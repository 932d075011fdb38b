#!/usr/bin/python3
"""PyTorch reference timings for the hra benchmarks (issue #4, SPEC section 9).

Times, in float32 on the CPU with a fixed number of intra-op threads, the
forward pass and the forward+backward pass of

  frozen       y = x W^T + b                          (W, b frozen, no adapter)
  lora         y = x W^T + b + scale * (x A^T) B^T     (PEFT-style LoRA,
               A (r, d_in) random, B (d_out, r) zero, scale = alpha / r)
  peft_hra     PEFT's HRA linear forward, restated: a dense d_in x d_in H is
               built from r Householder reflections, merged into W, and the
               input goes through F.linear with the merged weight
  peft_hra_gs  the same with apply_GS=True (Gram-Schmidt on the reflectors,
               then H = I - 2 U U^T)

on the same shapes as the C++ benchmarks.  "fwd" runs under torch.no_grad();
"fwdbwd" runs the forward with autograd and back-propagates a fixed random
output gradient to the adapter parameters and to the input (W and b never
require grad).

Output: a table on stdout and, with --json FILE, a list of records
  {method, pass, d_in, d_out, r, n, threads, ms_median, iterations,
   torch_version}
The frozen linear has no rank; its records carry r = 0.  Each case runs in
a worker process under a wall-time cap (--max-seconds-per-case): a case with
no timed iteration inside the cap, one over the memory guard, and the larger
r / n of a layer that already overran are recorded with "skipped": reason
instead of ms_median and iterations.

The PEFT source restated below is huggingface/peft,
src/peft/tuners/hra/layer.py (HRALinear.get_delta_weight and
HRALinear.forward).  Its chain variant updates H by rank-1 steps
(H - 2 (H u) u^T, O(d^2) each), and its forward additionally multiplies
eye(d_in) by H and W by H: two dense products per step regardless of n.

The timings are only meaningful on an otherwise idle machine: with other
work on the cores, the many small products of the HRA restatement slow down
far more than one large product does.

Run with Debian's python3-torch (apt-get install python3-torch):
  /usr/bin/python3 bench/torch_reference.py --quick --threads 2 --json out.json
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time

if __name__ == "__main__":
    # Debian's torch runs its matrix products on OpenBLAS (pthread build), whose
    # thread pool ignores torch.set_num_threads: size it from --threads before
    # the library loads, unless the caller already chose.
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--threads", type=int, default=2)
    _threads = max(1, _pre.parse_known_args()[0].threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit(
        "torch_reference.py needs PyTorch: apt-get install python3-torch "
        "and run it with /usr/bin/python3"
    )

METHODS = ("frozen", "lora", "peft_hra", "peft_hra_gs")
PASSES = ("fwd", "fwdbwd")

# The sweep of the C++ benchmarks: square d plus one d_out != d_in layer.
FULL_SHAPES = ((256, 256), (1024, 1024), (4096, 4096), (4096, 1024))  # (d_in, d_out)
FULL_RANKS = (2, 8, 32, 128)
FULL_BATCHES = (1, 64, 512)

# --quick: SPEC section 9's comparison points (d=1024 r=8 n=512; the headline
# d=4096 r=8 and r=32 at n=512), the rectangular layer and one small case.
QUICK_CASES = (
    (256, 256, 8, 64),
    (1024, 1024, 8, 512),
    (4096, 4096, 8, 512),
    (4096, 4096, 32, 512),
    (4096, 1024, 8, 512),
)

LORA_ALPHA = 16.0


# --------------------------------------------------------------------------
# The layers.  Each builder returns (params, forward) where forward(x) -> y
# and params are the tensors that get gradients in the "fwdbwd" pass.
# --------------------------------------------------------------------------


def frozen_linear(weight, bias, r, gen):
    del r, gen

    def forward(x):
        return F.linear(x, weight, bias)

    return [], forward


def lora_linear(weight, bias, r, gen):
    d_out, d_in = weight.shape
    # PEFT initialises A with kaiming-uniform and B with zeros, so the adapter
    # starts as the identity map; the timing does not depend on the values.
    bound = 1.0 / math.sqrt(d_in)
    lora_a = (torch.rand(r, d_in, generator=gen) * 2 - 1) * bound
    lora_b = torch.zeros(d_out, r)
    scale = LORA_ALPHA / r

    def forward(x):
        return F.linear(x, weight, bias) + (x @ lora_a.t() @ lora_b.t()) * scale

    return [lora_a, lora_b], forward


def hra_reflectors(d_in, r, gen):
    # PEFT's symmetric init (reset_hra_parameters) repeats each column twice,
    # which makes consecutive reflections cancel; random columns keep every
    # reflection distinct.  Only the values differ, not the work.
    return torch.randn(d_in, r, generator=gen) / math.sqrt(d_in)


def peft_hra_delta_weight(hra_u):
    """H of PEFT's HRALinear.get_delta_weight with apply_GS=False.

    Restated from huggingface/peft src/peft/tuners/hra/layer.py
    (HRALinear.get_delta_weight): the columns of hra_u are normalised, H starts
    as the d x d identity and for each reflector u_i
        H <- H - 2 * H @ u_i @ u_i^T
    Python evaluates that left to right, ((2 * H) @ u_i) @ u_i^T, so every step
    is a scaled copy of H, a d x d matrix-vector product and a d x d outer
    product: O(d^2) memory traffic per reflector, and autograd keeps the
    scaled d x d copy of each step for the backward pass.
    """
    d = hra_u.shape[0]
    u = hra_u / hra_u.norm(dim=0)
    h = torch.eye(d, dtype=hra_u.dtype)
    for i in range(hra_u.shape[1]):
        ui = u[:, i].view(-1, 1)
        h = h - 2 * h @ ui @ ui.t()
    return h


def peft_hra_gs_delta_weight(hra_u):
    """H of PEFT's HRALinear.get_delta_weight with apply_GS=True.

    Same source: classical Gram-Schmidt over the columns of hra_u (each new
    column has its projections on the previous unit columns subtracted one at
    a time, then is normalised), then H = I - 2 Q Q^T with Q the d x r result.
    """
    d, r = hra_u.shape
    q = [(hra_u[:, 0] / hra_u[:, 0].norm()).view(-1, 1)]
    for i in range(1, r):
        ui = hra_u[:, i].view(-1, 1)
        for j in range(i):
            ui = ui - (q[j].t() @ ui) * q[j]
        q.append((ui / ui.norm()).view(-1, 1))
    q = torch.cat(q, dim=1)
    return torch.eye(d, dtype=hra_u.dtype) - 2 * q @ q.t()


def make_peft_hra(delta_weight):
    def build(weight, bias, r, gen):
        d_in = weight.shape[1]
        hra_u = hra_reflectors(d_in, r, gen)

        def forward(x):
            # HRALinear.forward (unmerged, one active adapter): the merged
            # weight starts as eye(in_features) and is multiplied by each
            # adapter's H with torch.mm -- a full d x d x d product even for a
            # single adapter -- then W @ H and F.linear with the bias.
            new_weight = torch.eye(d_in, dtype=x.dtype)
            new_weight = torch.mm(new_weight, delta_weight(hra_u))
            new_weight = torch.mm(weight, new_weight)
            return F.linear(x, new_weight, bias)

        return [hra_u], forward

    return build


BUILDERS = {
    "frozen": frozen_linear,
    "lora": lora_linear,
    "peft_hra": make_peft_hra(peft_hra_delta_weight),
    "peft_hra_gs": make_peft_hra(peft_hra_gs_delta_weight),
}


# --------------------------------------------------------------------------
# Timing.  Cases run in a worker process so that a case over its time cap can
# be stopped (a single dense d x d product cannot be interrupted from Python);
# the worker is replaced after a timeout or a crash.
# --------------------------------------------------------------------------


def mem_available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def predicted_bytes(method, pas, d_in, d_out, r, n):
    """Rough peak memory of one iteration (float32), for the memory guard."""
    act = 4 * n * (d_in + d_out) * 3
    if method in ("frozen", "lora"):
        return 4 * d_out * d_in + act
    dense = 4 * d_in * d_in
    if method == "peft_hra" and pas == "fwdbwd":
        # one saved d x d copy per reflector, plus H, W H and their gradients
        return (r + 6) * dense + act
    return 6 * dense + act


def measure(case, min_time, min_iters, cap):
    """Runs in the worker: times one case, returns {ms_median, iterations} or {skipped}."""
    method, pas, d_in, d_out, r, n = case
    t_setup = time.perf_counter()
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
    bias = torch.randn(d_out, generator=gen) * 0.01
    params, forward = BUILDERS[method](weight, bias, r, gen)
    x = torch.randn(n, d_in, generator=gen)
    grad_out = torch.randn(n, d_out, generator=gen)

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

    deadline = t_setup + cap
    start = time.perf_counter()
    step()  # warm-up: allocator, thread pools, first touch of the buffers
    warm = time.perf_counter() - start
    if time.perf_counter() + warm > deadline:
        return {
            "skipped": f"one iteration takes about {warm:.1f} s (warm-up); no timed "
            f"iteration fits in --max-seconds-per-case={cap:g}"
        }

    times = []
    case_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        step()
        now = time.perf_counter()
        times.append(now - t0)
        if len(times) >= min_iters and now - case_start >= min_time:
            break
        if now + times[-1] > deadline:  # the next iteration would overrun the cap
            break
    return {
        "ms_median": round(statistics.median(times) * 1e3, 4),
        "iterations": len(times),
    }


def worker_main(conn, threads):
    torch.set_num_threads(threads)
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            result = measure(*job)
        except Exception as e:  # reported as a skipped case, the sweep goes on
            result = {"skipped": f"error: {type(e).__name__}: {e}"}
        conn.send(result)


class Worker:
    """A spawned process that runs measure() for one case at a time."""

    def __init__(self, threads):
        self.threads = threads
        self.proc = None
        self.conn = None

    def _start(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, self.threads), daemon=True)
        self.proc.start()
        child.close()

    def stop(self):
        if self.proc is None:
            return
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.proc = self.conn = None

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(timeout=10)
            except (OSError, EOFError):
                pass
        self.stop()

    def run(self, job, timeout):
        """measure(*job) in the worker; None if it did not answer within timeout seconds."""
        if self.proc is not None and not self.proc.is_alive():
            self.stop()
        if self.proc is None:
            self._start()
        try:
            self.conn.send(job)
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(timeout=5)
            code = self.proc.exitcode
            self.stop()
            return {"skipped": f"worker process died (exit code {code}; out of memory?)"}
        self.stop()
        return None


class Case:
    def __init__(self, method, pas, d_in, d_out, r, n):
        self.method, self.pas = method, pas
        self.d_in, self.d_out, self.r, self.n = d_in, d_out, r, n

    def family(self):
        return (self.method, self.pas, self.d_in, self.d_out)


def run_case(case, args, worker, over_cap):
    """Times one case; returns its record (with ms_median or skipped).

    over_cap maps a (method, pass, d_in, d_out) family to the (r, n) pairs that
    did not finish within the cap; the cost grows with r and with n, so a case
    with both at least as large is skipped without running.
    """
    record = {
        "method": case.method,
        "pass": case.pas,
        "d_in": case.d_in,
        "d_out": case.d_out,
        "r": case.r,
        "n": case.n,
        "threads": args.threads,
        "torch_version": torch.__version__,
    }
    cap = args.max_seconds_per_case
    for r_old, n_old in over_cap.get(case.family(), []):
        if case.r >= r_old and case.n >= n_old:
            record["skipped"] = (
                f"r={r_old} n={n_old} of this layer already exceeded "
                f"--max-seconds-per-case={cap:g}"
            )
            return record

    need = predicted_bytes(case.method, case.pas, case.d_in, case.d_out, case.r, case.n)
    avail = mem_available_bytes()
    if avail is not None and need > args.max_memory_fraction * avail:
        record["skipped"] = (
            f"needs about {need / 2**30:.1f} GiB, more than "
            f"{args.max_memory_fraction:g} of the {avail / 2**30:.1f} GiB available"
        )
        return record

    job = (
        (case.method, case.pas, case.d_in, case.d_out, case.r, case.n),
        args.min_time,
        args.min_iters,
        cap,
    )
    # The worker keeps to the cap itself between iterations; the grace covers
    # one iteration that overruns it, after which the worker is killed.
    result = worker.run(job, timeout=cap * 1.25 + 10)
    if result is None:
        result = {"skipped": f"stopped after exceeding --max-seconds-per-case={cap:g}"}
    if "skipped" in result and not result["skipped"].startswith("error"):
        over_cap.setdefault(case.family(), []).append((case.r, case.n))
    record.update(result)
    return record


def parse_shape(text):
    parts = text.lower().split("x")
    if len(parts) == 1:
        d = int(parts[0])
        return (d, d)
    if len(parts) == 2:
        return (int(parts[0]), int(parts[1]))
    raise argparse.ArgumentTypeError(f"bad shape {text!r}: use D or DINxDOUT")


def int_list(text):
    return [int(v) for v in text.split(",") if v]


def build_cases(args):
    if args.quick:
        grid = list(QUICK_CASES)
    else:
        grid = [
            (d_in, d_out, r, n)
            for (d_in, d_out) in FULL_SHAPES
            for n in FULL_BATCHES
            for r in FULL_RANKS
        ]
    if args.shapes:
        grid = [g for g in grid if (g[0], g[1]) in set(args.shapes)]
    if args.ranks:
        grid = [g for g in grid if g[2] in args.ranks]
    if args.batches:
        grid = [g for g in grid if g[3] in args.batches]

    cases = []
    seen_frozen = set()
    # Ranks ascend within a (shape, n) so the skip prediction has a smaller r.
    grid.sort(key=lambda g: (g[0] * g[1], g[0], g[1], g[3], g[2]))
    for d_in, d_out, r, n in grid:
        for method in args.methods:
            for pas in args.passes:
                if method == "frozen":
                    if (pas, d_in, d_out, n) in seen_frozen:
                        continue
                    seen_frozen.add((pas, d_in, d_out, n))
                    cases.append(Case(method, pas, d_in, d_out, 0, n))
                else:
                    cases.append(Case(method, pas, d_in, d_out, r, n))
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="only a few cases: d=256 r=8 n=64, d=1024 r=8, d=4096 r=8 and r=32, "
        "4096x1024 r=8 (n=512)",
    )
    p.add_argument(
        "--shapes",
        type=lambda s: [parse_shape(t) for t in s.split(",") if t],
        help="keep only these layers, comma separated: D (square) or DINxDOUT, "
        "e.g. 1024,4096x1024",
    )
    p.add_argument("--ranks", type=int_list, help="keep only these r, e.g. 8,32")
    p.add_argument("--batches", type=int_list, help="keep only these n, e.g. 512")
    p.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=list(METHODS),
        help="comma separated subset of " + ",".join(METHODS),
    )
    p.add_argument(
        "--passes",
        type=lambda s: s.split(","),
        default=list(PASSES),
        help="comma separated subset of fwd,fwdbwd",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=1.0,
        help="seconds of timed iterations per case (default 1.0)",
    )
    p.add_argument(
        "--min-iters",
        type=int,
        default=3,
        help="timed iterations per case at least (default 3)",
    )
    p.add_argument(
        "--max-seconds-per-case",
        type=float,
        default=120.0,
        help="wall-time cap of one case (default 120): timing stops early when the "
        "next iteration would overrun it, a case with no timed iteration inside it "
        "is recorded as skipped (its worker process is killed if need be), and so "
        "are the larger r and n of the same layer and method",
    )
    p.add_argument(
        "--max-memory-fraction",
        type=float,
        default=0.6,
        help="skip a case predicted to need more than this fraction of "
        "MemAvailable (default 0.6)",
    )
    p.add_argument("--json", metavar="OUTPUT", help="write the records to this JSON file")
    args = p.parse_args(argv)

    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for s in args.passes:
        if s not in PASSES:
            p.error(f"unknown pass {s!r}; choose from fwd, fwdbwd")
    if args.threads < 1 or args.min_iters < 1:
        p.error("--threads and --min-iters must be at least 1")

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)

    cases = build_cases(args)
    if not cases:
        p.error("the filters leave no case to run")

    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '')} "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}",
        flush=True,
    )
    header = f"{'method':<12} {'pass':<7} {'d_in':>5} {'d_out':>5} {'r':>4} {'n':>4} {'ms':>12} {'iters':>5}"
    print(header, flush=True)

    worker = Worker(args.threads)
    over_cap = {}
    records = []
    try:
        for case in cases:
            rec = run_case(case, args, worker, over_cap)
            records.append(rec)
            if "skipped" in rec:
                result = f"{'skipped':>12} {'':>5}  {rec['skipped']}"
            else:
                result = f"{rec['ms_median']:>12.3f} {rec['iterations']:>5}"
            print(
                f"{case.method:<12} {case.pas:<7} {case.d_in:>5} {case.d_out:>5} "
                f"{case.r:>4} {case.n:>4} {result}",
                flush=True,
            )
            if args.json:  # rewritten after every case so a long sweep keeps its results
                with open(args.json, "w") as f:
                    json.dump(records, f, indent=1)
                    f.write("\n")
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
