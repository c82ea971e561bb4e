"""Rank 0's record of a run: RUN_DIR/metrics.jsonl (each step once, also across resumes), the
progress bar, TensorBoard, wandb, and the loss-curve PNG at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bagel.checkpoint.files import write_text
from bagel.progress import track


def trim_metrics(path: Path, start_step: int, key: str = "step") -> None:
    """Drop the records whose `key` is after `start_step`: a resumed run replays those steps (or
    RL iterations) and logs them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and _step(line, key) <= start_step]
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


def _step(line: str, key: str) -> float:
    try:
        return float(json.loads(line).get(key, 0))
    except (ValueError, AttributeError):
        return float("inf")  # an unreadable line (a write cut short by a kill) goes


def open_tensorboard(run_dir: Path, tool: str):
    """A SummaryWriter on RUN_DIR/tensorboard, or None (said once) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(f"[{tool}] tensorboard is not installed: pip install tensorboard (logging to metrics.jsonl only)",
              flush=True)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class RunLogger:
    """Rank 0 only: progress bar, RUN_DIR/metrics.jsonl, TensorBoard, wandb; the PNG at the end."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, start_step: int = 0):
        self.enabled, self.cfg, self.run_dir = enabled, cfg, run_dir
        self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        trim_metrics(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.log.progress:
            self.bar = track(total=cfg.train.steps, initial=start_step, desc="train", unit="step")
        if cfg.log.tensorboard:
            self.tb = open_tensorboard(run_dir, "bagel-train")
        if cfg.log.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.log.wandb_project, dir=str(run_dir), config=cfg.to_dict(),
                                        name=run_dir.name, resume="allow", id=run_dir.name)
            except ImportError:
                print("[bagel-train] log.wandb=true but wandb is not installed", flush=True)

    def log(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = int(record["step"])
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(ce=f"{record['loss_ce']:.4f}", mse=f"{record['loss_mse']:.4f}",
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}", mfu=f"{record.get('mfu', 0):.1%}",
                                 refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.cfg.log.plot:
            from bagel.train.plot import plot_run

            try:
                plot_run(self.run_dir)
            except ImportError:
                print("[bagel-train] matplotlib is not installed: no loss-curve PNG", flush=True)
