#!/usr/bin/env python3
"""Charts of the Fashion-MNIST fine-tuning comparison, drawn from the example's CSV files.

    python3 scripts/plot_finetune.py [RESULTS_DIR]        (default: results)

Reads finetune_summary.csv, finetune_results.csv and finetune_curves.csv from RESULTS_DIR
(written by experiments/finetune_fashion_mnist) and writes RESULTS_DIR/finetune_accuracy_vs_params.png
with three panels: target accuracy against trainable parameters (mean and standard deviation over
the seeds, every run as a dot), accuracy after each epoch and training loss (means over the seeds).
When the CNN's files finetune_cnn_*.csv are there too (the example's --arch cnn), it draws the
same for the CNN into RESULTS_DIR/finetune_cnn_accuracy_vs_params.png.
Needs matplotlib (Debian: python3-matplotlib). Exits non-zero with a message on failure.
"""
import csv
import os
import sys
from collections import defaultdict


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mean(values):
    return sum(values) / len(values)


def main(argv):
    folder = argv[1] if len(argv) > 1 else "results"
    drawn = 0
    for prefix, network in (("finetune_", "MLP"), ("finetune_cnn_", "CNN")):
        if not os.path.exists(os.path.join(folder, f"{prefix}summary.csv")):
            continue
        status = draw(folder, prefix, network)
        if status != 0:
            return status
        drawn += 1
    if drawn == 0:
        print(f"plot_finetune: no finetune_summary.csv or finetune_cnn_summary.csv in {folder} "
              "(run experiments/finetune_fashion_mnist first)", file=sys.stderr)
        return 1
    return 0


def draw(folder, prefix, network):
    paths = {name: os.path.join(folder, f"{prefix}{name}.csv")
             for name in ("summary", "results", "curves")}
    for path in paths.values():
        if not os.path.exists(path):
            print(f"plot_finetune: {path} not found (run experiments/finetune_fashion_mnist first)",
                  file=sys.stderr)
            return 1
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("plot_finetune: matplotlib is missing (apt-get install python3-matplotlib)",
              file=sys.stderr)
        return 1

    summary = read_csv(paths["summary"])
    runs = read_csv(paths["results"])
    curves = read_csv(paths["curves"])
    if not summary:
        print(f"plot_finetune: {paths['summary']} has no rows", file=sys.stderr)
        return 1
    eval_set = summary[0]["eval_set"]
    labels = {s["method"]: s["label"] for s in summary}
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {s["method"]: cycle[i % len(cycle)] for i, s in enumerate(summary)}

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5.6))

    # Accuracy against trainable parameters, one legend entry per method (the HRA variants share
    # a parameter count, so text beside the points would overlap). "No adaptation" has no
    # parameters and sits far below the rest: it is a dotted line, not a point.
    markers = {"head": "s", "full": "D", "lora": "o"}
    trained = [s for s in summary if int(s["trainable_params"]) > 0]
    for s in summary:
        method, params = s["method"], int(s["trainable_params"])
        acc, std = 100 * float(s["acc_mean"]), 100 * float(s["acc_std"])
        label = f"{s['label']}: {acc:.2f} ± {std:.2f}%"
        if params == 0:
            left.axhline(acc, color=colours[method], linestyle=":", label=label)
            continue
        marker = markers.get(method, "*")
        left.errorbar(params, acc, yerr=std, fmt=marker, markersize=13 if marker == "*" else 8,
                      color=colours[method], capsize=4, zorder=3, label=label)
        each = [100 * float(r["eval_acc"]) for r in runs if r["method"] == method]
        left.scatter([params] * len(each), each, s=10, color=colours[method], alpha=0.5,
                     zorder=2)
    if trained:
        low = min(100 * min(float(s["acc_min"]), float(s["acc_mean"]) - float(s["acc_std"]))
                  for s in trained)
        high = max(100 * max(float(s["acc_max"]), float(s["acc_mean"]) + float(s["acc_std"]))
                   for s in trained)
        left.set_ylim(low - 2, high + 1.5)
    left.set_xscale("log")
    left.margins(x=0.15)
    left.set_xlabel("trainable parameters (log scale, head included)")
    left.set_ylabel(f"target {eval_set} accuracy (%)")
    left.set_title("Accuracy vs trainable parameters")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="lower right")

    # Accuracy after each epoch and training loss, averaged over the seeds. Epoch 0 (the
    # pretrained network on the shifted task) is left out: it would flatten the rest.
    for method in labels:
        acc = defaultdict(list)
        loss = defaultdict(list)
        for c in curves:
            if c["method"] != method:
                continue
            if c["eval_acc"] != "" and int(c["epoch"]) > 0:
                acc[int(c["epoch"])].append(100 * float(c["eval_acc"]))
            if c["train_loss"] != "":
                loss[int(c["step"])].append(float(c["train_loss"]))
        if acc:
            epochs = sorted(acc)
            middle.plot(epochs, [mean(acc[e]) for e in epochs], marker="o",
                        color=colours[method], label=labels[method])
        if loss:
            steps = sorted(loss)
            right.plot(steps, [mean(loss[k]) for k in steps], color=colours[method],
                       label=labels[method])
    middle.set_xlabel("epoch")
    middle.set_ylabel(f"target {eval_set} accuracy (%)")
    middle.set_title("Accuracy after each epoch")
    middle.xaxis.get_major_locator().set_params(integer=True)
    middle.grid(True, alpha=0.3)
    middle.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("training loss (mean over a quarter epoch)")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    right.set_title("Training loss")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)

    seeds = max(int(s["runs"]) for s in summary)
    fig.suptitle(f"Fine-tuning a pretrained {network} on shifted Fashion-MNIST ({seeds} seed(s) "
                 "per method)")
    fig.tight_layout()
    out = os.path.join(folder, f"{prefix}accuracy_vs_params.png")
    fig.savefig(out, dpi=120)
    print(f"plot_finetune: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
