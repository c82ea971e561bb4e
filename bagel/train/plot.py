"""Loss curves of a run: RUN_DIR/metrics.jsonl -> RUN_DIR/loss_curves.png; and one panel of curves
(the RL reward, the distillation error). Matplotlib is imported lazily."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a bagel-train run directory?)")
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[int(r["step"])] = r  # a resumed run re-logs steps: the last one wins
    return [records[k] for k in sorted(records)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss_curves.png"
    panels = [("loss_ce", "CE loss"), ("loss_mse", "MSE loss"), ("grad_norm", "grad norm"),
              ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_lines(series: dict[str, list[tuple[float, float]]], out: str | Path, xlabel: str, ylabel: str,
               log_y: bool = False) -> Path:
    """One panel, one line per entry of `series` (label -> (x, y) points; the first drawn bolder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, (label, pts) in enumerate(series.items()):
        if pts:
            ax.plot(*zip(*pts), lw=1.6 if i == 0 else 0.9, alpha=1.0 if i == 0 else 0.7, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
