#!/usr/bin/env python3
"""Charts of the Fashion-MNIST data-size sweep, drawn from the example's CSV files.

    python3 scripts/plot_sweep.py [RESULTS_DIR [CHART_DIR]]     (default: results, RESULTS_DIR)

Reads sweep_summary.csv and sweep_runs.csv from RESULTS_DIR (written by
`experiments/finetune_fashion_mnist --sweep`) and writes to CHART_DIR:
  sweep_accuracy_vs_size.png  target test accuracy against target training images (log x), one
                              line per method, mean and standard deviation over the seeds;
  sweep_forgetting.png        source test accuracy kept against target test accuracy, one point
                              per method and size (mean, with the seeds' sd as error bars), the
                              pretrained network's source accuracy as the reference line; left
                              the adapted network as it is, right its body with the pretrained
                              classifier head put back.
Needs matplotlib (Debian: python3-matplotlib). Exits non-zero with a message on failure.
"""
import csv
import os
import sys


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv):
    folder = argv[1] if len(argv) > 1 else "results"
    charts = argv[2] if len(argv) > 2 else folder
    summary_path = os.path.join(folder, "sweep_summary.csv")
    if not os.path.exists(summary_path):
        print(f"plot_sweep: {summary_path} not found (run experiments/finetune_fashion_mnist --sweep "
              "first)", file=sys.stderr)
        return 1
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_sweep: matplotlib is missing (apt-get install python3-matplotlib)",
              file=sys.stderr)
        return 1

    rows = read_csv(summary_path)
    if not rows:
        print(f"plot_sweep: {summary_path} has no rows", file=sys.stderr)
        return 1
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    by_method = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: int(r["size"]))
                 for m in methods}
    label = {m: by_method[m][0]["label"] + (" (= LoRA params)"
                                            if by_method[m][0]["budget"] == "equal parameters"
                                            else "")
             for m in methods}
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    trained = [m for m in methods if int(by_method[m][0]["steps"]) > 0]
    colour = {m: cycle[i % len(cycle)] for i, m in enumerate(trained)}
    style = {m: "--" if by_method[m][0]["budget"] == "equal parameters" else "-" for m in methods}
    steps = by_method[trained[0]][0]["steps"] if trained else "?"
    batch = rows[0]["batch"]
    runs = max(int(r["runs"]) for r in rows)
    sizes = sorted({int(r["size"]) for r in rows})
    os.makedirs(charts, exist_ok=True)

    def pct(r, key):
        return 100 * float(r[key])

    # Accuracy against target images.
    fig, ax = plt.subplots(figsize=(9, 6))
    for m in methods:
        pts = by_method[m]
        if m not in colour:  # no adaptation: far below the rest, named in the legend only
            ax.plot([], [], " ", label=f"{label[m]}: {pct(pts[0], 'target_acc_mean'):.2f}%")
            continue
        ax.errorbar([int(r["size"]) for r in pts], [pct(r, "target_acc_mean") for r in pts],
                    yerr=[pct(r, "target_acc_std") for r in pts], color=colour[m],
                    linestyle=style[m], marker="o", markersize=4, capsize=3, label=label[m])
    lows = [pct(r, "target_acc_mean") - pct(r, "target_acc_std")
            for m in colour for r in by_method[m]]
    ax.set_ylim(bottom=max(0.0, min(lows) - 2))
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{n:,}" for n in sizes])
    ax.set_xlabel("target training images (rot90)")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title(f"Accuracy against data at a fixed budget: {steps} steps of {batch} images, "
                 f"rate tuned per size,\nmean ± sd over {runs} seeds", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(charts, "sweep_accuracy_vs_size.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")

    # Source accuracy kept against target accuracy: the adapted network as it is (its head
    # retrained for the target), and its body with the pretrained head put back.
    fig, axes = plt.subplots(1, 2, figsize=(16, 6.2))
    panels = [("source_acc", "source test accuracy of the adapted network (%)",
               "The adapted network on the source task"),
              ("source_acc_pretrained_head",
               "source test accuracy, adapted body + pretrained head (%)",
               "Its body with the pretrained head put back")]
    for ax, (key, ylabel, title) in zip(axes, panels):
        for m in methods:
            pts = [r for r in by_method[m] if r.get(key + "_mean", "nan") != "nan"]
            if not pts:
                continue
            if m not in colour:
                ax.axhline(pct(pts[0], key + "_mean"), color="grey", linestyle=":",
                           label=label[m] + " (the pretrained network)")
                continue
            ax.errorbar([pct(r, "target_acc_mean") for r in pts],
                        [pct(r, key + "_mean") for r in pts],
                        xerr=[pct(r, "target_acc_std") for r in pts],
                        yerr=[pct(r, key + "_std") for r in pts], color=colour[m],
                        linestyle=style[m], marker="o", markersize=4, capsize=2, linewidth=1,
                        label=label[m])
            # The largest size at the line's end, so the direction of growth can be read.
            last = pts[-1]
            ax.annotate(f"{int(last['size']):,}", (pct(last, "target_acc_mean"),
                                                   pct(last, key + "_mean")),
                        textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colour[m])
        ax.set_xlabel("target test accuracy (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=5)
    fig.suptitle(f"Forgetting after adaptation and merge: one point per target training size "
                 f"({sizes[0]:,} to {sizes[-1]:,}, the largest labelled), mean ± sd over {runs} "
                 "seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = os.path.join(charts, "sweep_forgetting.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
