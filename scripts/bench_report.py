#!/usr/bin/python3
"""Writes the tables of BENCHMARKS.md and its chart from the JSON of scripts/run_benchmarks.sh.

Reads, in --results:
  cpp_<build>.json  Google Benchmark output of build/bench-<build>/bench/hra_bench, one per build
  cells_<build>.json  the same program's HRA, LoRA and frozen fwd+bwd at issue #11's 24 cells,
                    medians of interleaved repetitions (optional)
  torch.json        bench/torch_reference.py --json output (optional)
  loadavg.txt       load averages around every run (optional)

The sweep is read from the data, not declared here: builds from the file names; scalars, layers,
ranks, batch sizes and methods from the case names <method>/<pass>/<scalar>/d_in:../d_out:../r:../
n:.. (bench/bench_hra.cpp; a case at r = 0 does not depend on r, one at n = 0 not on n). The
headline layer, batch size and ranks are those of the repeated cases (bench/bench_cases.hpp,
is_headline). The primary build, which fills the per-case tables, is the one with the most cases.

Each table goes between <!-- generated:NAME:begin --> and <!-- generated:NAME:end --> in --output;
the text outside the markers is written by hand and left alone. Every C++ ratio is between cases
of one JSON file (one run of one binary); a PyTorch ratio divides a PyTorch time by a C++ time
measured minutes apart.
"""

import argparse
import collections
import json
import math
import os
import pathlib
import re
import sys

# Goals at the headline layer: column, target, numerator, denominator, r, comparison, goal,
# issue. A case is "method pass" ("torch:" for torch.json; several passes pair up with the
# denominator's; "merge_bound op" is the time merge's 4 d_out d_in r flops take at the frozen
# forward's rate of the same run); r is a rank or "≥R" (every rank from R up: the least ratio is
# compared). Comparison "report" has no goal: the value is shown.
GOALS = [
    ("HRA÷frozen", "HRA fwd+bwd ÷ frozen fwd+bwd", "hra fwdbwd", "frozen fwdbwd", 8, "≤", 1.03,
     11),
    ("HRA÷LoRA", "HRA fwd+bwd ÷ LoRA fwd+bwd", "hra fwdbwd", "lora fwdbwd", 8, "≤", 1.0, 11),
    ("HRA÷PyTorch LoRA", "HRA fwd+bwd in C++ ÷ LoRA fwd+bwd in PyTorch", "hra fwdbwd",
     "torch:lora fwdbwd", 8, "report", None, 11),
    ("PEFT÷HRA r=8", "PEFT's HRA in PyTorch ÷ HRA, fwd+bwd", "torch:peft_hra fwdbwd",
     "hra fwdbwd", 8, "≥", 25, 4),
    ("PEFT÷HRA r=32", "PEFT's HRA in PyTorch ÷ HRA, fwd+bwd", "torch:peft_hra fwdbwd",
     "hra fwdbwd", 32, "≥", 60, 4),
    ("merge÷copy", "merge ÷ a copy of W", "merge op", "copy op", 8, "≤", 2.0, 11),
    ("unmerge÷copy", "unmerge ÷ a copy of W", "unmerge op", "copy op", 8, "≤", 2.0, 11),
    ("merge÷flops", "merge ÷ its flops at the frozen forward's rate", "merge op",
     "merge_bound op", 32, "≤", 1.3, 11),
    ("unmerge÷flops", "unmerge ÷ its flops at the frozen forward's rate", "unmerge op",
     "merge_bound op", 32, "≤", 1.3, 11),
    ("merge÷frozen fwd", "merge ÷ one frozen forward", "merge op", "frozen fwd", 8, "≤", 0.05, 4),
    ("one-at-a-time÷WY", "one reflection at a time ÷ compact WY, fwd and fwd+bwd",
     "one_at_a_time fwd fwdbwd", "hra fwd fwdbwd", "≥8", ">", 1.0, 4),
]

# Goals of issue #11's HRA-against-LoRA cells (cells_<build>.json: fwd+bwd, float, medians of
# interleaved repetitions; its layers, ranks and batch sizes are read from the file).
CELL_GOALS = (("geometric mean", 1.0), ("worst cell", 1.05))  # HRA ÷ LoRA

# The ratio table (headline batch size, every layer and rank): header, numerator, denominator,
# and "×" for a factor (printed as 12.3×).
RATIOS = [
    ("HRA÷frozen fwd", "hra fwd", "frozen fwd", ""),
    ("HRA÷frozen", "hra fwdbwd", "frozen fwdbwd", ""),
    ("HRA÷LoRA", "hra fwdbwd", "lora fwdbwd", ""),
    ("PEFT-PyTorch÷HRA", "torch:peft_hra fwdbwd", "hra fwdbwd", "×"),
    ("PEFT-C++÷HRA", "peft_cpp fwdbwd", "hra fwdbwd", "×"),
    ("one-at-a-time÷WY", "one_at_a_time fwdbwd", "hra fwdbwd", "×"),
    ("merge÷frozen fwd", "merge op", "frozen fwd", ""),
    ("GS÷chain", "hra_gs fwdbwd", "hra fwdbwd", ""),
]
BASELINE = "frozen"  # the layer every overhead is divided by
BY_BATCH = ["hra", "lora"]  # the methods of the batch-size table
BUILD_MS = ["frozen fwd", "frozen fwdbwd", "hra fwdbwd", "lora fwdbwd", "copy op"]  # builds table

# Names in the chart and the memory table; a method missing here is shown by its own name.
LABELS = {
    "frozen": "frozen linear",
    "lora": "LoRA",
    "hra": "HRA, compact WY",
    "hra_gs": "HRA, Gram-Schmidt",
    "one_at_a_time": "HRA, one reflection at a time",
    "peft_cpp": "PEFT's algorithm, C++",
    "torch:peft_hra": "PEFT's HRA, PyTorch",
}

CASE_RE = re.compile(r"^([a-z_]+)/([a-z]+)/(\w+?)/d_in:(\d+)/d_out:(\d+)/r:(\d+)/n:(\d+)")
MARK_RE = re.compile(r"^<!-- generated:([\w-]+):begin -->\n(.*?)^<!-- generated:\1:end -->$",
                     re.S | re.M)
BEGIN_RE = re.compile(r"^<!-- generated:[\w-]+:begin -->$", re.M)
UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


class Cases:
    """Timed cases keyed by (method, pass, scalar, d_in, d_out, r, n); values hold "ms"."""

    def __init__(self):
        self.cases, self.repeated, self.context = {}, collections.Counter(), {}

    def get(self, method, pas, scalar, d_in, d_out, r, n):
        """The case, or the one at r = 0 / n = 0 when it does not depend on r / n; else {}."""
        for rr, nn in ((r, n), (0, n), (r, 0), (0, 0)):
            c = self.cases.get((method, pas, scalar, d_in, d_out, rr, nn))
            if c:
                return c
        return {}


def load_cpp(path):
    run = Cases()
    data = json.loads(path.read_text(encoding="utf-8"))
    run.context = data.get("context", {})
    for b in data.get("benchmarks", []):
        aggregate = b.get("run_type") == "aggregate"
        if b.get("error_occurred") or (aggregate and b.get("aggregate_name") != "median"):
            continue
        m = CASE_RE.match(b.get("run_name", b["name"]))
        if not m:
            continue
        key = m.groups()[:3] + tuple(int(v) for v in m.groups()[3:])
        if aggregate:
            run.repeated[key] = b.get("repetitions", 1)
        elif key in run.cases:
            continue  # the median aggregate, when there is one, replaces the repetitions
        run.cases[key] = dict(b, ms=b["real_time"] * UNIT_MS[b.get("time_unit", "ns")])
    return run


def load_torch(path):
    run = Cases()
    for rec in json.loads(path.read_text(encoding="utf-8")) if path.exists() else []:
        key = (rec["method"], rec["pass"], "float", rec["d_in"], rec["d_out"], rec["r"], rec["n"])
        run.cases[key] = dict(rec, ms=rec.get("ms_median"))
    return run


class Report:
    def __init__(self, runs, primary, torch, loads, cells):
        self.runs, self.primary, self.torch, self.loads = runs, primary, torch, loads
        self.cells = cells  # build -> Cases of cells_<build>.json
        self.run = runs[primary]
        keys = self.run.cases
        self.head = headline(self.run)
        self.scalars = sorted({k[2] for k in keys}, key=lambda s: (s != self.head["scalar"], s))
        self.layers = sorted({k[3:5] for k in keys if k[6]}, key=lambda l: (l[0] != l[1], l))
        self.ranks = sorted({k[5] for k in keys if k[5]})
        self.batches = sorted({k[6] for k in keys if k[6]})
        order = {m: i for i, m in enumerate(LABELS)}
        self.methods = sorted({k[0] for k in keys}, key=lambda m: (order.get(m, len(order)), m))

    def case(self, spec, pas, layer, r, n, run=None):
        """The case of "method" or "torch:method" in `run` (default: the primary one)."""
        if spec.startswith("torch:"):
            return self.torch.get(spec[6:], pas, "float", *layer, r, n)  # PyTorch runs float32
        return (run or self.run).get(spec, pas, self.head["scalar"], *layer, r, n)

    def value(self, spec, pas, layer, r, n, run=None):
        if spec == "merge_bound":  # 4 d_out d_in r flops at the frozen forward's 2 d_out d_in n
            fwd = self.value("frozen", "fwd", layer, r, self.head["n"], run)
            return None if fwd is None else fwd * 2 * r / self.head["n"]
        return self.case(spec, pas, layer, r, n, run).get("ms")

    def ratio(self, num, den, layer, r, n, run=None):
        """(ratio, numerator ms, denominator ms) of two "method pass" specs."""
        (nm, np_), (dm, dp) = num.split(), den.split()
        a, b = self.value(nm, np_, layer, r, n, run), self.value(dm, dp, layer, r, n, run)
        return (a / b if a is not None and b else None), a, b

    def goal(self, goal, run=None):
        """Measured ratios of a GOALS entry: [(ratio, r, pass, numerator ms, denominator ms)]."""
        _, _, num, den, r, _, _, _ = goal
        ranks = [r] if isinstance(r, int) else [x for x in self.ranks if x >= int(r[1:])]
        (nm, *nps), (dm, *dps) = num.split(), den.split()
        found = [(self.ratio(f"{nm} {p}", f"{dm} {q}", self.head["layer"], rr, self.head["n"], run),
                  rr, p) for rr in ranks for p, q in zip(nps, dps)]
        return [(v, rr, p, a, b) for (v, a, b), rr, p in found if v is not None]

    # ---------------------------------------------------------------------- the tables

    def section_run(self):
        rows = []
        for name, run in self.runs.items():
            c = run.context.get
            rows.append([f"`{name}`" + " (primary)" * (name == self.primary), c("date", "?")[:19],
                         str(len(run.cases)), c("compiler", "?"), f"`{c('cxx_flags', '?')}`",
                         c("eigen_version", "?"), c("eigen_simd", "?"), c("blas", "?"),
                         c("openmp", "?"), f"{c('eigen_threads', '?')} / "
                         f"{c('blas_threads', '–')}", " → ".join(self.loads[name])])
        out = table(["build", "date", "cases", "compiler", "flags", "Eigen", "Eigen SIMD", "BLAS",
                     "OpenMP", "threads (Eigen / BLAS)", "load average before → after"], rows)
        if self.torch.cases:
            t = next(iter(self.torch.cases.values()))
            out += ["", f"PyTorch (`torch.json`): torch {t.get('torch_version')}, "
                    f"{t.get('threads')} threads, "
                    f"{len(self.torch.cases)} cases; load average before → after: "
                    + (" → ".join(self.loads["torch"]) or "–") + "."]
        out += ["", f"Cases of the primary build `{self.primary}`:", ""]
        rows = []
        for s in self.scalars:
            keys = [k for k in self.run.cases if k[2] == s]
            rows.append([s, ", ".join(shape(l) for l in self.layers
                                      if any(k[3:5] == l for k in keys)),
                         ", ".join(str(r) for r in sorted({k[5] for k in keys if k[5]})),
                         ", ".join(str(n) for n in sorted({k[6] for k in keys if k[6]})),
                         ", ".join(m for m in self.methods if any(k[0] == m for k in keys))])
        out += table(["scalar", "layers", "r", "n", "methods"], rows)
        h = self.head
        out += ["", f"Headline: layer {shape(h['layer'])}, n = {h['n']}, r ∈ {{"
                + ", ".join(map(str, h["ranks"])) + f"}}, {h['scalar']}; "
                + (f"each repeated case is the median of {h['reps']} runs" if self.run.repeated else
                   "no case was repeated, so the largest layer and n")
                + f". Machine: {self.run.context.get('num_cpus', '?')} CPUs at "
                f"{self.run.context.get('mhz_per_cpu', '?')} MHz."]
        return out

    def section_headline(self):
        rows = []
        for g in GOALS:
            _, target, _, _, r, op, goal, issue = g
            found = sorted(self.goal(g), key=lambda z: z[1:3])
            v, bound = (min(found)[0] if found else None), fmt_goal(op, goal, True)
            if len(found) == 1:
                detail = f"{fmt_goal(op, v)} ({fms(found[0][3])} ms ÷ {fms(found[0][4])} ms)"
            else:
                detail = ", ".join(f"r={rr} {p.replace('fwdbwd', 'fwd+bwd')}: {fmt_goal(op, x)}"
                                   for x, rr, p, _, _ in found)
            rows.append([target, f"r = {r}" if isinstance(r, int) else f"r {r[0]} {r[1:]}",
                         "–" if goal is None else f"{op} {bound}", detail or "–",
                         compare(op, v, goal), f"#{issue}"])
        cells = self.cell_ratios(self.primary)
        if cells:
            ratios = [c[-2] for c in cells]
            worst = max(cells, key=lambda c: c[-2])
            for (what, goal), v, detail in zip(CELL_GOALS, (geomean(ratios), worst[-2]), (
                    f"{len(ratios)} cells", f"{shape(worst[0])}, r = {worst[1]}, n = {worst[2]}")):
                ranks = ", ".join(str(r) for r in sorted({c[1] for c in cells}))
                rows.append([f"HRA fwd+bwd ÷ LoRA fwd+bwd, {what}", f"r ∈ {{{ranks}}}",
                             f"≤ {goal:g}", f"{fr(v)} ({detail})", compare("≤", v, goal), "#11"])
        # Against the fastest build; when that is the primary build itself, against the fastest
        # of the others (a ratio below 1 then says by how much the default is ahead).
        best = self.fastest_build()
        other = best != self.primary
        if not other:
            best = self.fastest_build(exclude=self.primary)
        if best:
            a, b = (self.value("hra", "fwdbwd", self.head["layer"], self.head["ranks"][0],
                               self.head["n"], self.runs[x]) for x in (self.primary, best))
            v = a / b if a and b else None
            which = "the fastest build" if other else "the fastest other build"
            rows.append([f"HRA fwd+bwd, build `{self.primary}` ÷ {which} `{best}`",
                         f"r = {self.head['ranks'][0]}", "≤ 1.1",
                         f"{fr(v)} ({fms(a)} ms ÷ {fms(b)} ms)",
                         compare("≤", v, 1.1), "#11"])
        return table(["target", "rank", "goal", "measured", "measured vs goal", "issue"], rows)

    def fastest_build(self, exclude=None):
        """The build with the least HRA fwd+bwd time at the headline layer and first rank."""
        times = {b: self.value("hra", "fwdbwd", self.head["layer"], self.head["ranks"][0],
                               self.head["n"], run) for b, run in self.runs.items() if b != exclude}
        times = {b: t for b, t in times.items() if t}
        return min(times, key=times.get) if times else None

    def cell_ratios(self, build):
        """[(layer, r, n, frozen ms, LoRA ms, HRA ms, HRA÷LoRA, HRA÷frozen)] of cells_<build>."""
        run = self.cells.get(build)
        if not run:
            return []
        out = []
        hra = [k for k in run.cases if k[0] == "hra"]
        for layer in self.layers:
            for r in sorted({k[5] for k in hra}):
                for n in sorted({k[6] for k in hra}):
                    f, lo, h = (run.get(m, "fwdbwd", "float", *layer, r if m != "frozen" else 0,
                                        n).get("ms") for m in ("frozen", "lora", "hra"))
                    if f and lo and h:
                        out.append((layer, r, n, f, lo, h, h / lo, h / f))
        return out

    def section_cells(self):
        cells = self.cell_ratios(self.primary)
        if not cells:
            return [f"(no cells_{self.primary}.json in the results)"]
        reps = max(self.cells[self.primary].repeated.values() or [1])
        rows = [[shape(l), str(r), str(n), fms(f), fms(lo), fms(h), fr(q), fr(hf)]
                for l, r, n, f, lo, h, q, hf in cells]
        return table(["layer", "r", "n", "frozen ms", "LoRA ms", "HRA ms", "HRA÷LoRA",
                      "HRA÷frozen"], rows) + ["", f"Build `{self.primary}`, medians of {reps} "
                                              "interleaved repetitions per cell; geometric mean "
                                              f"of HRA÷LoRA {fr(geomean([c[6] for c in cells]))}"
                                              f", of HRA÷frozen {fr(geomean([c[7] for c in cells]))}."]

    def section_ratios(self):
        rows = []
        n = self.head["n"]
        for layer in self.layers:
            for r in self.ranks:
                if self.value("hra", "fwdbwd", layer, r, n) is None:
                    continue
                cells = []
                for _, num, den, kind in RATIOS:
                    v = self.ratio(num, den, layer, r, n)[0]
                    skipped = self.case(*num.split(), layer, r, n).get("skipped")  # torch.json
                    cells.append("skipped" if v is None and skipped else fx(v) if kind else fr(v))
                rows.append([shape(layer), str(r)] + cells)
        return table(["layer", "r"] + [c[0] for c in RATIOS], rows)

    def section_batch(self):
        rows = []
        for layer in self.layers:
            for r in self.head["ranks"]:
                cells = [fr(self.ratio(f"{m} fwdbwd", f"{BASELINE} fwdbwd", layer, r, b)[0])
                         for m in BY_BATCH for b in self.batches]
                if any(c != "–" for c in cells):
                    fz = "/".join(fms(self.value(BASELINE, "fwdbwd", layer, 0, b))
                                  for b in self.batches)
                    rows.append([shape(layer), str(r)] + cells + [fz])
        batches = "/".join(map(str, self.batches))
        return table(["layer", "r"] + [f"{m} n={b}" for m in BY_BATCH for b in self.batches]
                     + [f"{BASELINE} fwd+bwd ms (n={batches})"], rows)

    def section_memory(self):
        h = self.head
        base = self.case(BASELINE, "fwdbwd", h["layer"], 0, h["n"]).get("saved_bytes")
        rows = []
        for m in self.methods:
            cells = []
            for r in h["ranks"]:
                b = self.case(m, "fwdbwd", h["layer"], r, h["n"]).get("saved_bytes")
                rel = f" ({b / base:.2f}× {BASELINE})" if b and base and m != BASELINE else ""
                cells.append("–" if b is None else f"{b / 2**20:.1f} MiB{rel}")
            if any(c != "–" for c in cells):
                rows.append([LABELS.get(m, m)] + cells)
        return table(["method"] + [f"r = {r}" for r in h["ranks"]], rows)

    def section_builds(self):
        h, rows = self.head, []
        for name, run in self.runs.items():
            cells = [fms(self.value(*c.split(), h["layer"], h["ranks"][0], h["n"], run))
                     for c in BUILD_MS]
            for g in GOALS:
                found = self.goal(g, run)
                cells.append(fmt_goal(g[5], min(found)[0]) if found else "–")
            rows.append([f"`{name}`"] + cells)
        names = [c.replace("fwdbwd", "fwd+bwd").replace(" op", "") for c in BUILD_MS]
        return table(["build"] + [f"{c} ms" for c in names] + [g[0] for g in GOALS], rows)

    def section_cpp(self):
        out = []
        for s in self.scalars:
            keys = {k for k in self.run.cases if k[2] == s}
            passes = {m: sorted({k[1] for k in keys if k[0] == m}, key=len) for m in self.methods}
            cols = [(m, p) for m, ps in passes.items() for p in ps if p != "op"]
            cols += [(m, "op") for m, ps in passes.items() if "op" in ps
                     and any(k[0] == m and k[5] for k in keys)]
            rows = [[shape(layer), str(r), str(n)]
                    + [fms(self.run.get(m, p, s, *layer, r, n).get("ms")) for m, p in cols]
                    for layer in self.layers for r in self.ranks for n in self.batches
                    if any((m, p, s, *layer, r, n) in keys for m, p in cols if p != "op")]
            out += [f"<details><summary>Every C++ timing of the primary build, {s} (ms)</summary>",
                    ""]
            out += table(["layer", "r", "n"] + [f"{m} {p.replace('fwdbwd', 'fwd+bwd')}"
                                                for m, p in cols], rows)
            out += ["", "</details>", ""]
        return out[:-1]

    def section_torch(self):
        recs = sorted(self.torch.cases.values(), key=lambda c: (
            c["d_in"] * c["d_out"], c["d_in"], c["n"], c["r"], c["method"], c["pass"]))
        out = ["<details><summary>PyTorch timings (ms)</summary>", ""]
        out += table(["method", "pass", "layer", "r", "n", "ms", "note"], [
            [c["method"], c["pass"], shape((c["d_in"], c["d_out"])), str(c["r"]), str(c["n"]),
             fms(c["ms"]), c.get("skipped", "")] for c in recs])
        return out + ["", "</details>"]


def headline(run):
    """Layer, batch size, ranks and scalar of the repeated cases (else: the largest layer)."""
    rep = [k for k in run.repeated if k[6]] or [k for k in run.cases if k[6]]
    scalar = collections.Counter(k[2] for k in rep).most_common(1)[0][0]
    layer = max({k[3:5] for k in rep if k[2] == scalar}, key=lambda l: (l[0] * l[1], l[0] == l[1]))
    keys = [k for k in rep if k[2] == scalar and k[3:5] == layer]
    return dict(scalar=scalar, layer=layer, n=max(k[6] for k in keys),
                ranks=sorted({k[5] for k in keys if k[5]}), reps=max(run.repeated.values() or [1]))


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows]


def shape(layer):
    return str(layer[0]) if layer[0] == layer[1] else f"{layer[0]}→{layer[1]}"


def fr(x):
    return "–" if x is None else f"{x:.3f}"


def fx(x):
    """A factor: 2.35×, 12.3×, 188×."""
    if x is None:
        return "–"
    return f"{x:.{0 if x >= 100 else 1 if x >= 10 else 2}f}×"


def fmt_goal(op, x, goal=False):
    """A value compared by `op`: ≤ bounds a ratio (1.063), ≥ and > a factor (47.5×); "report"
    shows a ratio without a goal."""
    if goal:
        return "–" if x is None else f"{x:g}" + ("" if op == "≤" else "×")
    return fr(x) if op in ("≤", "report") else fx(x)


def compare(op, v, goal):
    """"1.063 > 1.05": the measured value against its goal ("–" without either)."""
    if v is None or goal is None:
        return "–"
    return f"{fmt_goal(op, v)} {'<' if v < goal else '>' if v > goal else '='} " \
        f"{fmt_goal(op, goal, True)}"


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def fms(x):
    if x is None:
        return "–"
    return f"{x:.{0 if x >= 100 else 1 if x >= 10 else 2 if x >= 1 else 3}f}"


def make_chart(rep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = rep.head
    square = [l for l in rep.layers if l[0] == l[1]]
    timed = {k[:2] for k in rep.run.cases}
    methods = [m for m in rep.methods if m != BASELINE and (m, "fwdbwd") in timed]
    # PyTorch's methods are drawn when LABELS names them (its LoRA would hide under the C++ one).
    methods += [m for m in sorted({"torch:" + k[0] for k in rep.torch.cases}) if m in LABELS]
    goal = next((g[6] for g in GOALS if g[2:4] == ("hra fwdbwd", f"{BASELINE} fwdbwd")), None)
    fig, axes = plt.subplots(1, len(h["ranks"]), figsize=(5.5 * len(h["ranks"]), 4.4),
                             sharey=True, squeeze=False)
    for ax, r in zip(axes[0], h["ranks"]):
        for i, m in enumerate(methods):
            base = "torch:" + BASELINE if m.startswith("torch:") else BASELINE
            pts = [(l[0], v) for l in square if (v := rep.ratio(
                f"{m} fwdbwd", f"{base} fwdbwd", l, r, h["n"])[0]) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="osv^DPX*"[i % 8], label=LABELS.get(m, m))
        ax.axhline(1.0, color="black", lw=0.8)
        if goal:
            ax.axhline(goal, color="black", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([l[0] for l in square], [str(l[0]) for l in square])
        ax.set_xlabel("d (square layer d×d)")
        ax.set_title(f"r = {r}, n = {h['n']}, {h['scalar']}, fwd+bwd")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"time ÷ {LABELS[BASELINE]} time")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path}")


def fill(text, sections, path):
    """Replaces every marked block of `text` by its section; a new file gets all of them."""
    text = text or "".join(f"<!-- generated:{s}:begin -->\n<!-- generated:{s}:end -->\n\n"
                           for s in sections)
    names = [m[0] for m in MARK_RE.findall(text)]
    if len(BEGIN_RE.findall(text)) != len(names) or set(names) - set(sections):
        sys.exit(f"bench_report.py: {path}: every line <!-- generated:NAME:begin --> needs a line "
                 f"<!-- generated:NAME:end --> after it, NAME one of {', '.join(sections)}")
    for s in [s for s in sections if s not in names]:
        print(f"bench_report.py: {path} has no markers for {s}; not written", file=sys.stderr)
    return MARK_RE.sub(lambda m: f"<!-- generated:{m[1]}:begin -->\n"
                       + "\n".join(sections[m[1]]) + f"\n<!-- generated:{m[1]}:end -->", text)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", default=os.path.join(root, "bench", "results"))
    p.add_argument("--primary", help="the build of the per-case tables (default: most cases)")
    p.add_argument("--output", default=os.path.join(root, "BENCHMARKS.md"))
    p.add_argument("--chart", default=os.path.join(root, "bench", "overhead_vs_d.png"),
                   help="where the chart goes; empty: no chart")
    args = p.parse_args()
    if args.chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            here, debian = os.path.realpath(sys.executable), os.path.realpath("/usr/bin/python3")
            if here != debian and os.path.exists(debian):  # Debian's python3-matplotlib
                os.execv(debian, [debian, os.path.abspath(__file__)] + sys.argv[1:])
            sys.exit("bench_report.py: no matplotlib (apt-get install python3-matplotlib); "
                     "--chart '' skips the chart")

    results = pathlib.Path(args.results)
    runs = {f.stem[4:]: load_cpp(f) for f in sorted(results.glob("cpp_*.json"))}
    if not runs:
        sys.exit(f"bench_report.py: no cpp_<build>.json in {results}")
    primary = args.primary or max(runs, key=lambda b: len(runs[b].cases))
    if not runs.get(primary, Cases()).cases:
        sys.exit(f"bench_report.py: no hra_bench case in {results}/cpp_{primary}.json")
    loads = collections.defaultdict(list)
    for line in (results / "loadavg.txt").read_text().splitlines() \
            if (results / "loadavg.txt").exists() else []:
        if line.split():  # <build or torch> before|after <1, 5, 15 min load averages>
            loads[line.split()[0]].append(" ".join(line.split()[2:]))
    cells = {f.stem[6:]: load_cpp(f) for f in sorted(results.glob("cells_*.json"))}
    rep = Report(runs, primary, load_torch(results / "torch.json"), loads, cells)

    names = ["run", "headline", "cells", "ratios", "batch", "memory", "builds", "cpp", "torch"]
    sections = {s: getattr(rep, "section_" + s)() for s in names}
    out = pathlib.Path(args.output)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    out.write_text(fill(text, sections, out), encoding="utf-8")
    print(f"wrote {out}")
    if args.chart:
        make_chart(rep, args.chart)


if __name__ == "__main__":
    main()
