#!/usr/bin/python3
"""Writes BENCHMARKS.md and the overhead chart from the JSON of scripts/run_benchmarks.sh.

Inputs (in --results):
  cpp_<build>.json   Google Benchmark output of build/bench-<build>/bench/hra_bench
  torch.json         bench/torch_reference.py --json output (optional)
  loadavg.txt        load averages around every run (optional)

Every ratio in the report is taken between cases of the same JSON file, i.e. measured in the
same run of the same binary. The PyTorch ratios divide a PyTorch time by a C++ time measured
minutes apart on the same machine.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

NAME_RE = re.compile(
    r"^(?P<method>[a-z_]+)/(?P<pass>[a-z]+)/(?P<scalar>float|double)/d_in:(?P<d_in>\d+)/"
    r"d_out:(?P<d_out>\d+)/r:(?P<r>\d+)/n:(?P<n>\d+)"
)

HEAD = dict(d_in=4096, d_out=4096, r=8, n=512)
SHAPES = [(256, 256), (1024, 1024), (4096, 4096), (4096, 1024)]
RANKS = [2, 8, 32, 128]
BATCHES = [1, 64, 512]

BUILD_INFO = {
    "blas_serial": "Eigen + OpenBLAS (EIGEN_USE_BLAS), OpenBLAS threads, no OpenMP",
    "blas_omp": "Eigen + OpenBLAS, Eigen's OpenMP splits each product (2 x 1 OpenBLAS thread)",
    "eigen_omp": "Eigen's own kernels, OpenMP, -O3 (SSE2 only)",
    "eigen_native": "Eigen's own kernels, OpenMP, -O3 -march=native",
    "eigen_serial": "Eigen's own kernels, 1 thread, -O3 (SSE2 only)",
}

METHOD_LABEL = {
    "frozen": "frozen linear",
    "lora": "LoRA",
    "hra": "HRA (compact WY)",
    "hra_gs": "HRA Gram-Schmidt",
    "one_at_a_time": "HRA one reflection at a time",
    "peft_cpp": "PEFT's algorithm in C++",
    "peft_torch": "PEFT's HRA in PyTorch",
}


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


class CppRun:
    """One Google Benchmark JSON file: times in ms keyed by case."""

    def __init__(self, path):
        with open(path) as f:
            data = json.load(f)
        self.context = data.get("context", {})
        self.cases = {}
        for b in data.get("benchmarks", []):
            if b.get("error_occurred"):
                continue
            agg = b.get("aggregate_name")
            if b.get("run_type") == "aggregate" and agg != "median":
                continue
            m = NAME_RE.match(b.get("run_name", b["name"]))
            if not m:
                continue
            key = (
                m["method"],
                m["pass"],
                m["scalar"],
                int(m["d_in"]),
                int(m["d_out"]),
                int(m["r"]),
                int(m["n"]),
            )
            if key in self.cases and agg != "median":
                continue  # keep the median of repeated cases
            self.cases[key] = {
                "ms": to_ms(b["real_time"], b.get("time_unit", "ns")),
                "saved_bytes": b.get("saved_bytes"),
                "flops": b.get("flops"),
                "reps": b.get("repetitions", 1) if agg == "median" else 1,
                "iterations": b.get("iterations"),
            }

    def ms(self, method, pas, d_in, d_out, r, n, scalar="float"):
        if method == "frozen":
            r = 0
        if method in ("merge", "unmerge"):
            pas, n = "op", 0
        c = self.cases.get((method, pas, scalar, d_in, d_out, r, n))
        return c["ms"] if c else None

    def get(self, method, pas, d_in, d_out, r, n, scalar="float"):
        if method == "frozen":
            r = 0
        return self.cases.get((method, pas, scalar, d_in, d_out, r, n))


PROTO_RE = re.compile(
    r"^(?P<what>[a-z_]+)/d_in:(?P<d_in>\d+)/d_out:(?P<d_out>\d+)/r:(?P<r>\d+)/n:(?P<n>\d+)/w:(?P<w>\d+)"
)


def load_proto(path):
    """hra_bench_proto JSON: {(what, d_in, d_out, r, n, w): ms} (medians when repeated)."""
    with open(path) as f:
        data = json.load(f)
    out, ctx = {}, data.get("context", {})
    for b in data.get("benchmarks", []):
        agg = b.get("aggregate_name")
        if b.get("error_occurred") or (b.get("run_type") == "aggregate" and agg != "median"):
            continue
        m = PROTO_RE.match(b.get("run_name", b["name"]))
        if not m:
            continue
        key = (m["what"], int(m["d_in"]), int(m["d_out"]), int(m["r"]), int(m["n"]), int(m["w"]))
        if key in out and agg != "median":
            continue
        out[key] = to_ms(b["real_time"], b.get("time_unit", "ns"))
    return out, ctx


def to_ms(value, unit):
    return value * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


class TorchRun:
    def __init__(self, path):
        self.records = {}
        self.version = None
        if not path or not os.path.exists(path):
            return
        with open(path) as f:
            data = json.load(f)
        for rec in data:
            self.version = rec.get("torch_version", self.version)
            key = (rec["method"], rec["pass"], rec["d_in"], rec["d_out"], rec["r"], rec["n"])
            self.records[key] = rec

    def ms(self, method, pas, d_in, d_out, r, n):
        if method == "frozen":
            r = 0
        rec = self.records.get((method, pas, d_in, d_out, r, n))
        return rec.get("ms_median") if rec else None

    def skipped(self, method, pas, d_in, d_out, r, n):
        rec = self.records.get((method, pas, d_in, d_out, r, n))
        return rec.get("skipped") if rec else None


# --------------------------------------------------------------------------------------------
# Formatting helpers.
# --------------------------------------------------------------------------------------------


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fr(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def fx(x):
    """A speed-up factor."""
    if x is None:
        return "–"
    return f"{x:.0f}×" if x >= 100 else f"{x:.1f}×"


def fms(x):
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fbytes(b):
    if b is None:
        return "–"
    return f"{b / 2**20:.1f} MiB"


def verdict(ok):
    if ok is None:
        return "n/a"
    return "**PASS**" if ok else "**MISS**"


def shape_label(d_in, d_out):
    return f"{d_in}" if d_in == d_out else f"{d_in}→{d_out}"


def cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_info():
    info = {}
    lscpu = cmd(["lscpu"])
    for line in lscpu.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": info.get("Model name", platform.processor()),
        "cores": info.get("CPU(s)", str(os.cpu_count())),
        "flags_simd": " ".join(
            f for f in ("avx2", "fma", "avx512f") if f in info.get("Flags", "").split()
        ),
        "mem": mem,
        "kernel": platform.release(),
        "os": (cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]).strip() or platform.platform()),
    }


def torch_blas():
    try:
        import torch  # noqa: F401  (Debian's python3-torch)

        cfg = torch.__config__.show()
        m = re.search(r"BLAS_INFO=([^,]+)", cfg)
        blas = m.group(1) if m else "?"
        lib = cmd(["sh", "-c", "readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3"]).strip()
        return f"BLAS_INFO={blas} ({lib or 'system libblas'})"
    except Exception:  # pragma: no cover - torch missing
        return "?"


# --------------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------------


def headline_targets(run, torch, shape=HEAD):
    d_in, d_out, r, n = shape["d_in"], shape["d_out"], shape["r"], shape["n"]
    t = {}
    fz_fb = run.ms("frozen", "fwdbwd", d_in, d_out, 0, n)
    fz_f = run.ms("frozen", "fwd", d_in, d_out, 0, n)
    hra_fb = run.ms("hra", "fwdbwd", d_in, d_out, r, n)
    hra_f = run.ms("hra", "fwd", d_in, d_out, r, n)
    lora_fb = run.ms("lora", "fwdbwd", d_in, d_out, r, n)
    lora_f = run.ms("lora", "fwd", d_in, d_out, r, n)
    t["hra_frozen"] = ratio(hra_fb, fz_fb)
    t["hra_frozen_fwd"] = ratio(hra_f, fz_f)
    t["hra_lora"] = ratio(hra_fb, lora_fb)
    t["hra_lora_fwd"] = ratio(hra_f, lora_f)
    t["peft8"] = ratio(torch.ms("peft_hra", "fwdbwd", d_in, d_out, 8, n), run.ms("hra", "fwdbwd", d_in, d_out, 8, n))
    t["peft32"] = ratio(torch.ms("peft_hra", "fwdbwd", d_in, d_out, 32, n), run.ms("hra", "fwdbwd", d_in, d_out, 32, n))
    t["peft8_fwd"] = ratio(torch.ms("peft_hra", "fwd", d_in, d_out, 8, n), run.ms("hra", "fwd", d_in, d_out, 8, n))
    t["peft32_fwd"] = ratio(torch.ms("peft_hra", "fwd", d_in, d_out, 32, n), run.ms("hra", "fwd", d_in, d_out, 32, n))
    t["merge"] = ratio(run.ms("merge", "op", d_in, d_out, r, 0), fz_f)
    t["unmerge"] = ratio(run.ms("unmerge", "op", d_in, d_out, r, 0), fz_f)
    wy = []
    for rr in (8, 32, 128):
        for pas in ("fwd", "fwdbwd"):
            s = ratio(run.ms("one_at_a_time", pas, d_in, d_out, rr, n), run.ms("hra", pas, d_in, d_out, rr, n))
            if s is not None:
                wy.append((s, rr, pas))
    t["wy"] = min(wy) if wy else None
    t["wy_all"] = wy
    t["ms"] = dict(fz_fb=fz_fb, fz_f=fz_f, hra_fb=hra_fb, hra_f=hra_f, lora_fb=lora_fb, lora_f=lora_f)
    return t


def write_report(args):
    results = args.results
    runs = {}
    for fn in sorted(os.listdir(results)):
        m = re.match(r"cpp_(\w+)\.json$", fn)
        if m:
            try:
                runs[m.group(1)] = CppRun(os.path.join(results, fn))
            except (OSError, ValueError) as e:
                print(f"bench_report.py: skipping {fn}: {e}", file=sys.stderr)
    if args.primary not in runs:
        sys.exit(f"bench_report.py: no {results}/cpp_{args.primary}.json")
    run = runs[args.primary]
    torch = TorchRun(os.path.join(results, "torch.json"))
    ctx = run.context
    mach = machine_info()
    loads = []
    if os.path.exists(os.path.join(results, "loadavg.txt")):
        with open(os.path.join(results, "loadavg.txt")) as f:
            loads = [line.strip() for line in f if line.strip()]
    commit = cmd(["git", "rev-parse", "--short", "HEAD"]).strip() or "?"
    date = ctx.get("date") or datetime.datetime.now().isoformat(timespec="seconds")
    T = headline_targets(run, torch)
    L = []
    w = L.append

    w("# Benchmarks")
    w("")
    w(
        "Generated by `scripts/run_benchmarks.sh` (which calls `scripts/bench_report.py`); do not "
        "edit by hand, rerun the script. "
        + ("This is a **--quick** smoke run: only the headline shape and one small case. " if args.quick else "")
        + f"Run of {date[:19]} at commit `{commit}`; raw JSON in `{results}/`."
    )
    w("")
    w(
        "All C++ ratios are between cases of **the same run of the same binary** (build "
        f"`{args.primary}`: {BUILD_INFO.get(args.primary, args.primary)}). Times are wall-clock "
        "medians (Google Benchmark `real_time`; the headline cases are the median of "
        f"{max((c['reps'] for c in run.cases.values()), default=1)} repetitions). "
        "*fwd* is the training forward (`Layer::forward`, which keeps what backward needs); "
        "*fwd+bwd* adds `backward()` with the input gradient (W is frozen: the frozen layer's "
        "backward is Wᵀ·dY, every adapter adds its parameter gradients)."
    )
    w("")

    # ---------------------------------------------------------------- machine
    w("## Machine")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| CPU | {mach['cpu']} ({mach['cores']} cores; SIMD: {mach['flags_simd']}) |")
    w(f"| Memory / OS | {mach['mem']}, {mach['os']}, Linux {mach['kernel']} |")
    w(f"| Threads | {args.threads} (the headline) |")
    w(f"| Compiler | {ctx.get('compiler', '?')} |")
    w(f"| Flags ({args.primary}) | `{ctx.get('cxx_flags', '?')}` |")
    w(f"| Eigen | {ctx.get('eigen_version', '?')} (SIMD in use: {ctx.get('eigen_simd', '?')}) |")
    w(f"| BLAS ({args.primary}) | {ctx.get('blas', '?')} |")
    w(f"| Google Benchmark | {ctx.get('library_version', '1.7.1 (Debian libbenchmark-dev)')} |")
    w(
        f"| PyTorch | {torch.version or 'not run'} (Debian python3-torch, float32; {torch_blas()}) |"
    )
    if loads:
        w(f"| Load average (1/5/15 min) around each run | {'; '.join(loads)} |")
    w("")

    # ---------------------------------------------------------------- targets
    h = HEAD
    w("## Headline targets")
    w("")
    w(
        f"d_in = d_out = {h['d_in']}, r = {h['r']}, n = {h['n']}, float, {args.threads} threads, "
        f"build `{args.primary}`."
    )
    w("")
    w("| Target | Goal | Measured | Result |")
    w("|---|---|---|---|")
    ms = T["ms"]
    w(
        f"| HRA fwd+bwd ÷ frozen fwd+bwd | ≤ 1.05 | {fr(T['hra_frozen'])} "
        f"({fms(ms['hra_fb'])} ms vs {fms(ms['fz_fb'])} ms) | "
        f"{verdict(None if T['hra_frozen'] is None else T['hra_frozen'] <= 1.05)} |"
    )
    w(
        f"| HRA ÷ LoRA at equal r (fwd+bwd) | ≤ 1.00 | {fr(T['hra_lora'])} "
        f"({fms(ms['hra_fb'])} ms vs {fms(ms['lora_fb'])} ms; fwd: {fr(T['hra_lora_fwd'])}) | "
        f"{verdict(None if T['hra_lora'] is None else T['hra_lora'] <= 1.0)} |"
    )
    w(
        f"| PEFT's HRA in PyTorch ÷ HRA, r = 8 (fwd+bwd) | ≥ 25× | {fx(T['peft8'])} "
        f"(fwd: {fx(T['peft8_fwd'])}) | {verdict(None if T['peft8'] is None else T['peft8'] >= 25)} |"
    )
    w(
        f"| PEFT's HRA in PyTorch ÷ HRA, r = 32 (fwd+bwd) | ≥ 60× | {fx(T['peft32'])} "
        f"(fwd: {fx(T['peft32_fwd'])}) | {verdict(None if T['peft32'] is None else T['peft32'] >= 60)} |"
    )
    w(
        f"| merge ÷ one frozen forward (n = 512) | ≤ 0.05 | {fr(T['merge'])} "
        f"({fms(run.ms('merge', 'op', h['d_in'], h['d_out'], h['r'], 0))} ms vs {fms(ms['fz_f'])} ms; "
        f"unmerge {fr(T['unmerge'])}) | {verdict(None if T['merge'] is None else T['merge'] <= 0.05)} |"
    )
    if T["wy"]:
        s, rr, pas = T["wy"]
        detail = ", ".join(f"r={r_} {p}: {fx(v)}" for v, r_, p in sorted(T["wy_all"], key=lambda z: (z[1], z[2])))
        w(
            f"| compact WY faster than one reflection at a time, every r ≥ 8 | > 1× | "
            f"smallest {fx(s)} (r={rr}, {pas}); {detail} | {verdict(s > 1.0)} |"
        )
    else:
        w("| compact WY faster than one reflection at a time, every r ≥ 8 | > 1× | – | n/a |")
    w("")
    w(
        "The WY check is made at the headline layer; the ratio table below shows it at every "
        "layer and rank (column *one-at-a-time ÷ WY*)."
    )
    w("")

    # ---------------------------------------------------------------- ratio table
    w("## Ratios, n = 512, float (same run)")
    w("")
    w(
        "Ratios < 1 mean HRA is faster, except the speed-up columns (×), which divide the other "
        "method's time by HRA's. All fwd+bwd unless marked fwd. PEFT-in-C++ is PEFT's algorithm "
        "restated in C++ (dense H by r rank-1 updates, W·H, product; autograd's backward); "
        "PEFT-in-PyTorch is `bench/torch_reference.py`."
    )
    w("")
    w(
        "| layer | r | HRA÷frozen fwd | HRA÷frozen | HRA÷LoRA | PEFT-PyTorch÷HRA | PEFT-C++÷HRA "
        "| one-at-a-time÷WY | merge÷frozen fwd | GS÷chain |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|")
    n = 512
    for d_in, d_out in SHAPES:
        for r in RANKS:
            hra_fb = run.ms("hra", "fwdbwd", d_in, d_out, r, n)
            if hra_fb is None:
                continue
            fz_fb = run.ms("frozen", "fwdbwd", d_in, d_out, 0, n)
            fz_f = run.ms("frozen", "fwd", d_in, d_out, 0, n)
            pt = torch.ms("peft_hra", "fwdbwd", d_in, d_out, r, n)
            pt_txt = fx(ratio(pt, hra_fb))
            if pt is None and torch.skipped("peft_hra", "fwdbwd", d_in, d_out, r, n):
                pt_txt = "skipped¹"
            w(
                f"| {shape_label(d_in, d_out)} | {r} "
                f"| {fr(ratio(run.ms('hra', 'fwd', d_in, d_out, r, n), fz_f))} "
                f"| {fr(ratio(hra_fb, fz_fb))} "
                f"| {fr(ratio(hra_fb, run.ms('lora', 'fwdbwd', d_in, d_out, r, n)))} "
                f"| {pt_txt} "
                f"| {fx(ratio(run.ms('peft_cpp', 'fwdbwd', d_in, d_out, r, n), hra_fb))} "
                f"| {fx(ratio(run.ms('one_at_a_time', 'fwdbwd', d_in, d_out, r, n), hra_fb))} "
                f"| {fr(ratio(run.ms('merge', 'op', d_in, d_out, r, 0), fz_f))} "
                f"| {fr(ratio(run.ms('hra_gs', 'fwdbwd', d_in, d_out, r, n), hra_fb))} |"
            )
    w("")
    w(
        "¹ skipped by `torch_reference.py`'s time cap (`--max-seconds-per-case`), predicted from "
        "the smaller rank. – : not measured (PEFT-in-C++ runs at d_in = 4096 only for r ∈ {8, 32}; "
        "see *Method*)."
    )
    w("")

    # ---------------------------------------------------------------- batch dependence
    w("## Overhead against the batch size (fwd+bwd ÷ frozen fwd+bwd, float)")
    w("")
    w("| layer | r | " + " | ".join(f"HRA n={b}" for b in BATCHES) + " | " + " | ".join(f"LoRA n={b}" for b in BATCHES) + " | frozen fwd+bwd ms (n=1/64/512) |")
    w("|---|---|" + "---|" * (2 * len(BATCHES) + 1))
    for d_in, d_out in SHAPES:
        for r in (8, 32):
            cells = []
            for meth in ("hra", "lora"):
                for b in BATCHES:
                    cells.append(fr(ratio(run.ms(meth, "fwdbwd", d_in, d_out, r, b), run.ms("frozen", "fwdbwd", d_in, d_out, 0, b))))
            if all(c == "–" for c in cells):
                continue
            fz = "/".join(fms(run.ms("frozen", "fwdbwd", d_in, d_out, 0, b)) for b in BATCHES)
            w(f"| {shape_label(d_in, d_out)} | {r} | " + " | ".join(cells) + f" | {fz} |")
    w("")
    w(
        "At n = 1 the frozen product is a matrix-vector product (memory-bound, ~1 flop per byte "
        "of W), so every adapter's fixed costs (factorising U, the r×r solve, copies) weigh more."
    )
    w("")

    # ---------------------------------------------------------------- memory
    w("## Memory kept between forward and backward (headline layer, float)")
    w("")
    w(
        "`Layer::saved_bytes()` after `forward()`, reported by the benchmark as the counter "
        "`saved_bytes` (d_in = d_out = 4096, n = 512). The layers' output Y (d_out×n, 8 MiB) is "
        "counted for every layer, since each keeps it in its own buffer."
    )
    w("")
    w("| layer | r = 8 | r = 32 | what |")
    w("|---|---|---|---|")
    what = {
        "frozen": "Y (W is frozen, so X is not needed)",
        "lora": "X (dropout input), A·X (r×n), Y",
        "hra": "H·X (d_in×n), Y, r×n coefficients + S factors (O(r·b))",
        "hra_gs": "H·X, Y, Qᵀ·X (r×n), Q (d×r), R",
        "one_at_a_time": "H·X, Y (inputs of each reflection are rebuilt)",
        "peft_cpp": "r+1 dense d_in×d_in H's (autograd keeps every intermediate), W·H, X, Y",
    }
    base = run.get("frozen", "fwdbwd", h["d_in"], h["d_out"], 0, h["n"])
    for meth in ("frozen", "lora", "hra", "hra_gs", "one_at_a_time", "peft_cpp"):
        cells = []
        for r in (8, 32):
            c = run.get(meth, "fwdbwd", h["d_in"], h["d_out"], r, h["n"])
            if c and c.get("saved_bytes") is not None:
                extra = ""
                if base and base.get("saved_bytes") and meth != "frozen":
                    extra = f" ({c['saved_bytes'] / base['saved_bytes']:.2f}× frozen)"
                cells.append(fbytes(c["saved_bytes"]) + extra)
            else:
                cells.append("–")
        w(f"| {METHOD_LABEL[meth]} | " + " | ".join(cells) + f" | {what[meth]} |")
    w("")

    # ---------------------------------------------------------------- backends
    w("## Builds: OpenBLAS, OpenMP, Eigen's own kernels")
    w("")
    w(
        f"The same benchmark binary built five ways, headline layer (4096², n = 512, float), "
        f"{args.threads} threads. Each row's ratios come from its own run."
    )
    w("")
    w(
        "| build | frozen fwd ms | frozen fwd+bwd ms | HRA fwd+bwd ms | LoRA fwd+bwd ms "
        "| HRA÷frozen | HRA÷LoRA | merge÷frozen fwd | PEFT-PyTorch÷HRA r=8 | WY vs one-at-a-time (min) |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|")
    order = ["blas_serial", "blas_omp", "eigen_native", "eigen_omp", "eigen_serial"]
    best = None
    for name in order + sorted(set(runs) - set(order)):
        if name not in runs:
            continue
        rt = headline_targets(runs[name], torch)
        m = rt["ms"]
        if m["hra_fb"] is None:
            continue
        if best is None or m["hra_fb"] < best[1]:
            best = (name, m["hra_fb"])
        wy = fx(rt["wy"][0]) if rt["wy"] else "–"
        w(
            f"| `{name}`: {BUILD_INFO.get(name, '')} | {fms(m['fz_f'])} | {fms(m['fz_fb'])} "
            f"| {fms(m['hra_fb'])} | {fms(m['lora_fb'])} | {fr(rt['hra_frozen'])} | {fr(rt['hra_lora'])} "
            f"| {fr(rt['merge'])} | {fx(rt['peft8'])} | {wy} |"
        )
    w("")
    if best:
        how = {
            "blas_serial": "`-DHRA_USE_BLAS=ON -DHRA_USE_OPENMP=OFF` (Debian's `libopenblas-dev`; "
            "threads from `OPENBLAS_NUM_THREADS`)",
            "blas_omp": "`-DHRA_USE_BLAS=ON -DHRA_USE_OPENMP=ON` with `OPENBLAS_NUM_THREADS=1` and "
            "`OMP_NUM_THREADS` = cores (Eigen splits each product, OpenBLAS computes the pieces)",
            "eigen_native": "`-DHRA_USE_OPENMP=ON` and `-march=native` (no BLAS; the binary then "
            "only runs on CPUs like the build machine)",
            "eigen_omp": "`-DHRA_USE_OPENMP=ON` (no BLAS)",
            "eigen_serial": "no BLAS, no OpenMP",
        }
        w(
            f"**Recommendation (from this run):** `{best[0]}`, i.e. {how.get(best[0], best[0])}: "
            f"the fastest HRA fwd+bwd at the headline layer ({fms(best[1])} ms). "
            "PyTorch on this machine uses the same OpenBLAS, so the OpenBLAS builds also make the "
            "C++/PyTorch comparison one of algorithms, not of GEMM kernels. Without a BLAS, "
            "Eigen's own kernels need `-march=native` (or at least `-mavx2 -mfma`): plain `-O3` on "
            "x86-64 compiles them for SSE2 only. Never nest the two thread pools (Eigen's OpenMP "
            "threads each calling a multi-threaded OpenBLAS oversubscribes the cores): use "
            "either OpenBLAS threads or Eigen threads, not both."
        )
    w("")

    # ---------------------------------------------------------------- chart
    if args.chart:
        made = make_chart(run, torch, args.chart)
        if made:
            rel = os.path.relpath(args.chart, os.path.dirname(os.path.abspath(args.output)) or ".")
            w("## Overhead against d")
            w("")
            w(f"![time ÷ frozen time against d, fwd+bwd, n = 512]({rel})")
            w("")
            w(
                "Square layers, n = 512, float, fwd+bwd, time divided by the frozen layer's "
                "fwd+bwd time of the same run (PEFT in PyTorch: divided by PyTorch's own frozen "
                "linear). Log scale."
            )
            w("")

    # ---------------------------------------------------------------- prototypes
    for name in sorted(os.listdir(results)):
        m = re.match(r"proto_(\w+)\.json$", name)
        if m:
            for line in proto_section(os.path.join(results, name), m.group(1), run):
                w(line)

    # ---------------------------------------------------------------- limits
    w("## What limits the numbers")
    w("")
    for line in limits_text(run, torch, T, runs):
        w(line)
    w("")

    # ---------------------------------------------------------------- method
    w("## Method")
    w("")
    w(
        "- `bench/bench_hra.cpp` (Google Benchmark, templated over the scalar; float is the "
        "headline, double is registered for d ∈ {256, 1024} and the headline layer at r = 8). "
        "Sweep: d ∈ {256, 1024, 4096} square plus 4096→1024, r ∈ {2, 8, 32, 128}, "
        "n ∈ {1, 64, 512}; merge and unmerge at every layer and rank."
    )
    w(
        "- Same operands for every method: one frozen W, one batch X and one upstream gradient "
        "dY per shape (deterministic random), reflectors U drawn at random (H ≠ I)."
    )
    w(
        "- *one reflection at a time*: `hra::reference::apply_one_at_a_time`, then W·(H X); its "
        "backward (written in the benchmark, checked against `HraLinear` at start-up) walks the "
        "reflections one by one with GEMVs and rank-1 updates, rebuilding each reflection's input."
    )
    w(
        "- *PEFT in C++*: H = I, then r rank-1 updates H ← H − 2 (H v) vᵀ, W·H, (W·H)·X; the "
        "backward is autograd's on that graph: dW_eff = dY·Xᵀ, dX = (WH)ᵀ·dY, dH = Wᵀ·dW_eff, "
        "then back through the rank-1 updates with the saved intermediate H's (also checked "
        "against `HraLinear` at start-up). PyTorch's PEFT additionally multiplies I·H (one more "
        "d³ product) in its forward. At d_in = 4096 it is run only at n = 512 and r ∈ {8, 32} (its "
        "cost does not depend on n; r = 32 keeps 33 dense 64 MiB matrices for the backward); "
        "in double not at all at d = 4096."
    )
    w(
        "- PyTorch: `bench/torch_reference.py` at n = 512, every layer and rank, same threads; a "
        "case predicted to exceed its time cap is skipped and marked."
    )
    w(
        "- `--benchmark_min_time=0.2`, wall-clock time (`UseRealTime`); the headline cases "
        "(4096², n = 512, r ∈ {8, 32}) are repeated and their median reported. The machine is "
        "shared: compare ratios, not absolute times, and check the load averages above."
    )
    w(
        "- CI smoke run: `scripts/run_benchmarks.sh --quick` (primary build only, headline + one "
        "small case, PyTorch at r = 8)."
    )
    w("")

    # ---------------------------------------------------------------- full table
    w("<details><summary>All C++ timings of this run (float, ms)</summary>")
    w("")
    meths = ["frozen", "lora", "hra", "hra_gs", "one_at_a_time", "peft_cpp"]
    w("| layer | r | n | " + " | ".join(f"{m} fwd | {m} fwd+bwd" for m in meths) + " | merge | unmerge |")
    w("|---|---|---|" + "---|" * (2 * len(meths) + 2))
    for d_in, d_out in SHAPES:
        for r in RANKS:
            for b in BATCHES:
                cells = []
                for m in meths:
                    for pas in ("fwd", "fwdbwd"):
                        cells.append(fms(run.ms(m, pas, d_in, d_out, r, b)))
                if all(c == "–" for c in cells[2:]):
                    continue
                cells.append(fms(run.ms("merge", "op", d_in, d_out, r, 0)))
                cells.append(fms(run.ms("unmerge", "op", d_in, d_out, r, 0)))
                w(f"| {shape_label(d_in, d_out)} | {r} | {b} | " + " | ".join(cells) + " |")
    w("")
    w("</details>")
    w("")
    if torch.records:
        w("<details><summary>PyTorch timings (ms)</summary>")
        w("")
        w("| method | pass | layer | r | n | ms | note |")
        w("|---|---|---|---|---|---|---|")
        for key in sorted(torch.records, key=lambda k: (k[2] * k[3], k[2], k[5], k[4], k[0], k[1])):
            rec = torch.records[key]
            w(
                f"| {rec['method']} | {rec['pass']} | {shape_label(rec['d_in'], rec['d_out'])} | {rec['r']} "
                f"| {rec['n']} | {fms(rec.get('ms_median'))} | {rec.get('skipped', '')} |"
            )
        w("")
        w("</details>")
        w("")

    with open(args.output, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")
    print(f"wrote {args.output}")


def proto_section(path, build, run):
    """Library vs the fused prototypes of bench/chain_prototype.hpp, from hra_bench_proto."""
    times, _ = load_proto(path)
    if not times:
        return []
    out = [
        f"## Proposed library changes, measured (`hra_bench_proto`, build `{build}`)",
        "",
        "`bench/chain_prototype.hpp` restates `ReflectorChain`'s forward, backward and "
        "`apply_right` with the memory traffic fused (column panels of w batch columns for the "
        "chain, row panels of w rows of W for merge; w = 0 is the library as it is). *layer* is "
        "the HRA layer's fwd+bwd (the library's `HraLinear`, or the same steps with the "
        "prototype chain), *chain* the chain alone, *merge_unmerge* one merge plus one unmerge. "
        "All from one run of one binary.",
        "",
        "| case | layer | r | n | frozen fwd+bwd ms | library ms | " + "prototype ms (w) | best change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({k[:5] for k in times if k[0] != "frozen"}, key=lambda k: (k[0], k[1] * k[2], k[3], -k[4]))
    for what, d_in, d_out, r, n in keys:
        lib = times.get((what, d_in, d_out, r, n, 0))
        protos = sorted((k[5], v) for k, v in times.items() if k[:5] == (what, d_in, d_out, r, n) and k[5] > 0)
        if lib is None or not protos:
            continue
        fz = times.get(("frozen", d_in, d_out, r, n if what != "merge_unmerge" else 512, 0))
        best_w, best = min(protos, key=lambda z: z[1])
        extra = ""
        if what == "layer" and fz:
            extra = f" (÷ frozen: {lib / fz:.3f} → {best / fz:.3f})"
        if what == "merge_unmerge":
            fzf = run.ms("frozen", "fwd", d_in, d_out, 0, 512)
            if fzf:
                extra = f" (merge ÷ frozen fwd ≈ {lib / 2 / fzf:.3f} → {best / 2 / fzf:.3f})"
        out.append(
            f"| {what} | {shape_label(d_in, d_out)} | {r} | {n if what != 'merge_unmerge' else '–'} "
            f"| {fms(fz) if what == 'layer' else '–'} | {fms(lib)} | "
            + ", ".join(f"{fms(v)} ({w_})" for w_, v in protos)
            + f" | {(best / lib - 1) * 100:+.1f} % at w = {best_w}{extra} |"
        )
    out.append("")
    return out


def limits_text(run, torch, T, runs):
    """Explains, with the run's numbers, what bounds each headline ratio."""
    h = HEAD
    d, n, r = h["d_in"], h["n"], h["r"]
    out = []
    ms = T["ms"]
    fz_f, fz_fb, hra_fb = ms["fz_f"], ms["fz_fb"], ms["hra_fb"]
    c = run.get("frozen", "fwdbwd", d, d, 0, n)
    if c and c.get("flops"):
        out.append(
            f"- **Frozen product.** 4·d²·n = {4 * d * d * n / 1e9:.1f} GFLOP per fwd+bwd at the "
            f"headline layer, run at {c['flops'] / 1e9:.0f} GFLOP/s: everything else is measured "
            "against this GEMM."
        )
    if hra_fb and fz_fb:
        extra = hra_fb - fz_fb
        flops = 14 * r * d * n
        bytes_ = 8 * d * n * 4  # ~8 passes over a d x n float matrix
        out.append(
            f"- **HRA's overhead** at the headline: {extra:+.1f} ms over the frozen layer "
            f"({(hra_fb / fz_fb - 1) * 100:+.1f} %). The chain adds 14·r·d·n = {flops / 1e6:.0f} "
            f"MFLOP ({flops / (4 * d * d * n) * 100:.1f} % of the frozen flops) but these are skinny "
            f"products (r = {r} columns) that stream the d×n activations ~8 times "
            f"(≈ {bytes_ / 2**20:.0f} MiB), so they run at memory bandwidth, not at GEMM speed; "
            "plus the copy of X into the layer's buffer. That is the floor of the ratio."
        )
    lora_fb = ms["lora_fb"]
    if hra_fb and lora_fb:
        out.append(
            f"- **HRA vs LoRA**: {hra_fb:.1f} ms vs {lora_fb:.1f} ms. Both add a few memory-bound "
            f"passes over d×n matrices to the same frozen GEMM; LoRA's are 12·r·n·d flops "
            f"(A·X, B·(AX), dB, dA, Aᵀ·dAX), HRA's 14·r·d·n. The difference between the two is "
            f"{abs(hra_fb - lora_fb) / fz_fb * 100:.1f} % of the frozen time, "
            "i.e. of the order of the run-to-run noise of the GEMM on a shared machine "
            "(compare the repeated medians across builds below)."
        )
    mg = run.ms("merge", "op", d, d, r, 0)
    if mg and fz_f:
        wbytes = d * d * 4
        mflop = 4 * d * d * r / 1e6
        gemm_rate = 4 * d * d * n / (fz_fb / 1e3) / 1e9 if fz_fb else 0  # frozen fwd+bwd GFLOP/s
        text = (
            f"- **merge** W ← W − (W·U)·S⁻¹·Uᵀ: {mflop:.0f} MFLOP, {mg:.1f} ms = "
            f"{mg / fz_f * 100:.1f} % of a frozen forward ({fz_f:.1f} ms). By flops alone it is "
            f"2r/n = {2 * r / n * 100:.1f} % of the forward; the rest is the efficiency of its two "
            f"skinny products (W·U with r = {r} columns, then a rank-{r} update of W): "
            f"{mflop / mg:.0f} GFLOP/s against the frozen GEMM's {gemm_rate:.0f}, and "
            f"{3 * wbytes / (mg / 1e3) / 1e9:.1f} GB/s for its 3 × {wbytes / 2**20:.0f} MiB of "
            "traffic (W read for W·U, then read and written by the update)."
        )
        cp = run.ms("copy", "op", d, d, 0, 0)
        if cp:
            text += (
                f" A plain 2-thread copy of W (one read, one write) takes {cp:.1f} ms here "
                f"({2 * wbytes / (cp / 1e3) / 1e9:.1f} GB/s), {cp / fz_f * 100:.1f} % of a frozen "
                "forward, so memory does not forbid the 5 % target: it needs the skinny products "
                "to run at about the GEMM's rate. The row-panel prototype below (W·U and the "
                "update on panels of W that stay in cache) helped only where Eigen's OpenMP splits "
                "the panels (`blas_omp`); with OpenBLAS threads or Eigen's own AVX-512 kernels the "
                "per-panel GEMM calls cost more than the traffic they save, so the library keeps "
                "the two plain products."
            )
        out.append(text)
    pt8 = torch.ms("peft_hra", "fwdbwd", d, d, 8, n)
    if pt8 and hra_fb:
        pc = run.ms("peft_cpp", "fwdbwd", d, d, 8, n)
        out.append(
            f"- **PEFT's algorithm** costs O(r·d² + d³) per step whatever n is: "
            f"{pt8:.0f} ms in PyTorch"
            + (f" and {pc:.0f} ms restated in C++" if pc else "")
            + f" at r = 8, against {hra_fb:.0f} ms for HRA. Its W·H product alone is "
            f"2·d³ = {2 * d**3 / 1e9:.0f} GFLOP forward and again backward (dH = Wᵀ·dW_eff), "
            f"{(2 * 2 * d**3) / (4 * d * d * n):.0f}× the frozen layer's flops at n = {n}; the "
            "speed-up therefore shrinks with n/d and grows with r."
        )
    wy = T.get("wy_all") or []
    if wy:
        out.append(
            "- **Compact WY vs one reflection at a time**: both do the same O(r·d·n) flops, but the "
            "one-at-a-time chain streams the whole d×n batch 2 (fwd) / 6 (bwd) times per "
            "reflection with GEMVs, while the WY form does it a constant number of times per "
            "block of 32 reflections with GEMMs; the gap therefore grows with r (measured "
            + ", ".join(f"r={r_} {p}: {fx(v)}" for v, r_, p in sorted(wy, key=lambda z: (z[1], z[2])))
            + ")."
        )
    return out


# --------------------------------------------------------------------------------------------
# Chart.
# --------------------------------------------------------------------------------------------


def make_chart(run, torch, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_report.py: matplotlib missing (apt-get install python3-matplotlib); no chart")
        return False
    ds = [256, 1024, 4096]
    n = 512
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    styles = {
        "lora": ("LoRA", "tab:blue", "o"),
        "hra": ("HRA, compact WY", "tab:red", "s"),
        "hra_gs": ("HRA, Gram-Schmidt", "tab:orange", "^"),
        "one_at_a_time": ("HRA, one reflection at a time", "tab:gray", "v"),
        "peft_cpp": ("PEFT's algorithm, C++", "tab:purple", "D"),
        "peft_torch": ("PEFT's HRA, PyTorch", "tab:green", "P"),
    }
    any_point = False
    for ax, r in zip(axes, (8, 32)):
        for meth, (label, color, marker) in styles.items():
            xs, ys = [], []
            for d in ds:
                if meth == "peft_torch":
                    v = ratio(torch.ms("peft_hra", "fwdbwd", d, d, r, n), torch.ms("frozen", "fwdbwd", d, d, 0, n))
                else:
                    v = ratio(run.ms(meth, "fwdbwd", d, d, r, n), run.ms("frozen", "fwdbwd", d, d, 0, n))
                if v is not None:
                    xs.append(d)
                    ys.append(v)
            if xs:
                any_point = True
                ax.plot(xs, ys, marker=marker, color=color, label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.05, color="black", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ds)
        ax.set_xticklabels([str(d) for d in ds])
        ax.set_xlabel("d (square layer d×d)")
        ax.set_title(f"r = {r}, n = {n}, float, fwd+bwd")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time ÷ frozen layer time")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    if not any_point:
        plt.close(fig)
        return False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="bench/results")
    p.add_argument("--primary", default="blas_serial", help="the build whose run is the report")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="BENCHMARKS.md")
    p.add_argument("--chart", default="bench/overhead_vs_d.png")
    p.add_argument("--quick", action="store_true")
    write_report(p.parse_args())


if __name__ == "__main__":
    main()
