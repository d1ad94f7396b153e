"""How hard the HEXA hard examples are, per epoch: each run's adversarial and cut-mixed losses minus its clean loss
(train/hexa/*_loss of its log.jsonl), and its clean loss beside the control's (the base's loss at the same recipe).

    python -m benchmarks.hardness LOG.jsonl [LOG.jsonl ...] --control BASE_LOG.jsonl -o hardness.png [--table]
    python -m benchmarks.hardness LOG.jsonl [LOG.jsonl ...] --keys train/loss train/assign_nmi   # any logged keys

A log's label is its file name (benchmarks/learning.py --trunks names them DATA-sSEED-METHOD-CONFIG.jsonl).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.learning import read_rows  # noqa: E402


def series(log: list[dict], key: str, minus: str | None = None) -> tuple[list[int], list[float]]:
    rows = [r for r in log if key in r and (minus is None or minus in r)]
    return [r["epoch"] for r in rows], [r[key] - (r[minus] if minus else 0.0) for r in rows]


def label(path: str) -> str:
    return os.path.basename(path).removesuffix(".jsonl")


def table(logs: dict[str, list[dict]], control: list[dict] | None, epochs=(1, 5, 10, 20, 30)) -> str:
    """Markdown: per run and epoch, adversarial - clean, cut-mixed - clean, and the clean loss (the control's in
    brackets)."""
    base = {r["epoch"]: r["train/loss"] for r in control or []}
    out = [
        "| run | epoch | adversarial - clean | cut-mixed - clean | clean loss (control) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, log in logs.items():
        for r in log:
            if r["epoch"] not in epochs or "train/hexa/clean_loss" not in r:
                continue
            c = r["train/hexa/clean_loss"]
            adv = f"{r['train/hexa/adv_loss'] - c:+.3f}" if "train/hexa/adv_loss" in r else ""
            mix = f"{r['train/hexa/mix_loss'] - c:+.3f}" if "train/hexa/mix_loss" in r else ""
            ref = f" ({base[r['epoch']]:.3f})" if r["epoch"] in base else ""
            out.append(f"| {name} | {r['epoch']} | {adv} | {mix} | {c:.3f}{ref} |")
    return "\n".join(out)


def keys_table(logs: dict[str, list[dict]], keys: list[str], epochs=(1, 2, 5, 10, 20, 30)) -> str:
    """Markdown: per run and epoch, the logged values of `keys` (DeepCluster-v2's cluster diagnostics, say)."""
    out = [
        "| run | epoch | " + " | ".join(k.removeprefix("train/") for k in keys) + " |",
        "|---|" + "---:|" * (1 + len(keys)),
    ]
    for name, log in logs.items():
        for r in log:
            if r["epoch"] in epochs:
                out.append(
                    f"| {name} | {r['epoch']} | " + " | ".join(f"{r[k]:.3g}" if k in r else "" for k in keys) + " |"
                )
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--control", default=None, help="the base's log.jsonl at the same recipe")
    p.add_argument("-o", "--output", default=None, help="write the figure here (needs matplotlib)")
    p.add_argument("--table", action="store_true", help="print a markdown table")
    p.add_argument("--keys", nargs="+", default=None, help="print a markdown table of these logged keys instead")
    a = p.parse_args()
    logs = {label(path): read_rows([path]) for path in a.logs}
    control = read_rows([a.control]) if a.control else None
    if a.keys:
        print(keys_table(logs, a.keys))
    elif a.table:
        print(table(logs, control))
    if a.output:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for (name, log), color in zip(logs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for key, style in (("train/hexa/adv_loss", "-"), ("train/hexa/mix_loss", ":")):
                x, y = series(log, key, "train/hexa/clean_loss")
                if x:
                    ax1.plot(x, y, style, color=color, label=f"{name}: {key.split('/')[-1][:3]} - clean")
            ax2.plot(*series(log, "train/hexa/clean_loss"), color=color, label=name)
        if control:
            ax2.plot(*series(control, "train/loss"), "k--", label=f"control: {label(a.control)}")
        ax1.axhline(0, color="grey", lw=0.5)
        ax1.set(title="hard loss - clean loss", xlabel="epoch")
        ax2.set(title="clean loss", xlabel="epoch")
        ax1.legend(fontsize=6)
        ax2.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(a.output, dpi=120)
        print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
