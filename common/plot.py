"""Training curves of one or more runs, read from their log.jsonl: loss, lr, images/s and kNN top-1 per epoch, one
line per run, the random trunk's kNN dashed (docs/monitoring.md). Needs matplotlib (pip install matplotlib).

    python -m common.plot RUN_DIR [RUN_DIR ...] -o curves.png
"""

import argparse
import json
import math
import os

from common.cli import UserError, run

# (log key, panel title); the keys the scripts write (common.meters.Progress.summary, common.monitor.KNNMonitor).
PANELS = (
    ("train/loss", "loss"),
    ("train/lr", "learning rate"),
    ("train/img_per_s", "images / s"),
    ("knn/acc1", "kNN top-1 (%)"),
)
REFERENCE = {"knn/acc1": "knn/acc1_random"}  # drawn dashed in the panel of its key: the random trunk's kNN


def read_log(run_dir: str) -> dict[int, dict]:
    """RUN_DIR/log.jsonl as {epoch: record}, in epoch order; clear errors for a missing folder or log, an empty log,
    and a line that is not a JSON object with an epoch."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such folder")
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (is {run_dir} a run's --output-dir?)")
    records = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[int(record["epoch"])] = record
            except (ValueError, TypeError, KeyError):
                raise UserError(f"{path} line {n} is not a JSON object with an epoch") from None
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    return dict(sorted(records.items()))


def main(args) -> None:
    logs = [read_log(d) for d in args.run_dirs]  # errors before matplotlib is needed
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(f"-o {args.output}: the folder {out_dir} does not exist")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("common.plot needs matplotlib: pip install matplotlib") from None
    names = [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]  # the paths where two runs share a name
    labels = names if len(set(names)) == len(names) else [os.path.normpath(d) for d in args.run_dirs]
    panels = [(key, title) for key, title in PANELS if any(key in r for log in logs for r in log.values())]
    if not panels:
        raise UserError(f"no run logs any of {', '.join(key for key, _ in PANELS)}")
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (log, label) in enumerate(zip(logs, labels)):
            points = [(e, r[key]) for e, r in log.items() if isinstance(r.get(key), (int, float))]
            if points:  # a run keeps its colour in every panel, also where another run has no curve
                x, y = zip(*points)
                ax.plot(x, y, color=f"C{i % 10}", marker="." if len(points) < 50 else None, label=label)
            random = [r[REFERENCE[key]] for r in log.values() if REFERENCE.get(key) in r]
            if random:  # the random trunk's kNN, the reference to beat: dashed, in the run's colour
                ax.axhline(random[-1], color=f"C{i % 10}", linestyle="--", linewidth=1, label=f"{label}, random trunk")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(f"wrote {args.output} ({len(logs)} run(s): {', '.join(title for _, title in panels)})")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m common.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="a run's --output-dir, holding log.jsonl")
    p.add_argument("-o", "--output", default="curves.png", help="the image to write (default curves.png)")
    return p


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
