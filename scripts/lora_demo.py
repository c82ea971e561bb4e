"""LoRA on the digits demo model: one new skill per expert, with what it costs.

    make lora-demo                  # after `make demo`
    python scripts/lora_demo.py [--base runs/digits] [--data data/digits] [--out runs/digits_lora]

1. data: the held-out split and the training split of two skills the demo model never saw
   (data_pipelines.digits.EXTRA_TASKS): "Mirror it." (the image flipped left-right) and "Is it
   even or odd?".
2. train: configs/train/lora_mirror.yaml (a generation-expert adapter) and
   configs/train/lora_parity.yaml (an understanding-expert adapter), each a bagel-train run on
   the frozen demo model with a replay of its old tasks; wall time and peak RSS of each run.
3. a full fine-tune of the same run (lora.rank=0), a few steps only, for its step time and peak RSS.
4. evaluate on the held-out digits: the new skill before and after, and the demo's four scores
   with each adapter on (forgetting), against the demo's own metrics.json.
5. report: OUT/report.md and OUT/metrics.json; the adapters in OUT/{mirror,parity}/export_adapter
   (bagel-generate / bagel-chat --lora DIR).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"mirror": ROOT / "configs/train/lora_mirror.yaml", "parity": ROOT / "configs/train/lora_parity.yaml"}
# each skill's training mix: the new task, and a replay of the old ones its expert serves
MIXES = {
    "mirror": {"mirror": 3.0, "edit": 1.0, "t2i": 0.5, "count": 1.0},  # count 2.0: mirror 73%, interleaved no better
    # the und adapter sits where generation cannot see it (configs/train/lora_parity.yaml): only
    # the old question is replayed
    "parity": {"parity": 2.0, "vqa": 1.0},
}
FULL_FT_STEPS = 30


def write_data_config(base: Path, data: Path, out: Path, skill: str) -> Path:
    """The skill's data config: configs/data/digits.yaml's settings with its own mix."""
    cfg = yaml.safe_load((ROOT / "configs/data/digits.yaml").read_text())
    cfg["tokenizer"] = str((base / "tokenizer").resolve())
    cfg["sources"] = [{"name": task, "manifest": str((data / "train" / task).resolve()), "weight": weight,
                       "resampled": True} for task, weight in MIXES[skill].items()]
    path = out / f"{skill}.data.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(skill: str, base: Path, data_config: Path, run_dir: Path, *extra: str) -> dict:
    """One bagel-train run; returns its wall time and peak resident memory."""
    cmd = [str(Path(sys.executable).with_name("bagel-train")), "--config", str(RECIPES[skill]),
           f"--run_dir={run_dir}", f"--model.path={base / 'model'}", f"--data.config={data_config}",
           "--checkpoint.resume=none", "--checkpoint.overwrite=true", *extra]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak_kb = 0
    while proc.poll() is None:
        peak_kb = max(peak_kb, high_water_kb(proc.pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"lora_demo: {skill} training failed (exit {proc.returncode})")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}


def high_water_kb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM). Not the rusage of wait4: Linux carries
    the parent's peak into a child through exec, and this parent holds a model."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:  # it has just exited
        pass
    return 0


def evaluate(base: Path, adapter: Path | None, skills: tuple[str, ...], old: bool) -> dict:
    from bagel.inference.engine import Engine
    from eval.digits import DigitsEvalConfig, evaluate, evaluate_skills

    engine = Engine.from_pretrained(base / "model", loras=[(adapter, 1.0)] if adapter is not None else [])
    out = evaluate_skills(engine, skills)
    if old:
        four = evaluate(engine, DigitsEvalConfig(), progress=True)
        out.update({k: four[k] for k in SCORES})
    return out


SCORES = ("understanding_accuracy", "generation_accuracy", "edit_accuracy", "interleaved_accuracy")


def main() -> None:
    from bagel.cli.common import Parser

    p = Parser(prog="lora_demo.py", description=__doc__, progress=True)
    p.add_argument("--base", default=str(ROOT / "runs" / "digits"), help="the make demo run folder")
    p.add_argument("--data", default=str(ROOT / "data" / "digits"), help="the demo's shards")
    p.add_argument("--out", default=str(ROOT / "runs" / "digits_lora"), help="where runs and report go")
    p.add_argument("--steps", type=int, default=None, help="LoRA steps (default: the recipes')")
    args = p.parse_args()
    if args.progress != "auto":
        os.environ["BAGEL_PROGRESS"] = args.progress
    base, data, out = Path(args.base), Path(args.data), Path(args.out)
    if not (base / "model" / "config.json").is_file() or not (base / "metrics.json").is_file():
        raise SystemExit(f"lora_demo: no demo model in {base} (run `make demo` first)")
    out.mkdir(parents=True, exist_ok=True)
    from data_pipelines.digits import EXTRA_TASKS, write_digits

    if not all((data / "train" / t / "manifest.json").is_file() for t in EXTRA_TASKS):
        write_digits(data, size=32, tasks=EXTRA_TASKS)
    demo = json.loads((base / "metrics.json").read_text())
    results = {"before": {k: demo[k] for k in SCORES}}
    results["before"].update(evaluate(base, None, tuple(EXTRA_TASKS), old=False))
    steps = [f"--train.steps={args.steps}"] if args.steps else []
    for skill in EXTRA_TASKS:
        data_config = write_data_config(base, data, out, skill)
        run = train(skill, base, data_config, out / skill, *steps)
        full = train(skill, base, data_config, out / f"{skill}_full_ft", "--lora.rank=0",
                     f"--train.steps={FULL_FT_STEPS}", "--checkpoint.export=false", "--log.plot=false")
        record = json.loads((out / skill / "lora.json").read_text())
        history = [json.loads(line) for line in (out / skill / "metrics.jsonl").read_text().splitlines()]
        results[skill] = {**run, "full_fine_tune": full, "steps": history[-1]["step"],
                          "trainable_share": record["trainable_parameters"] / record["total_parameters"],
                          "trainable_parameters": record["trainable_parameters"], "layers": len(record["modules"]),
                          **evaluate(base, out / skill / "export_adapter", (skill,), old=True)}
        print(json.dumps({skill: results[skill]}, indent=1), flush=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results)
    print(f"report: {out / 'report.md'}")


def write_report(out: Path, r: dict) -> None:
    b = r["before"]
    rows = []
    for skill, expert in (("mirror", "gen"), ("parity", "und")):
        s = r[skill]
        drops = ", ".join(f"{k.split('_')[0]} {100 * (s[k] - b[k]):+.1f}" for k in SCORES)
        rows.append(f"| {skill} ({expert} expert, {s['layers']} layers) | {b[skill + '_accuracy']:.1%} -> "
                    f"**{s[skill + '_accuracy']:.1%}** | {drops} | {s['trainable_share']:.2%} "
                    f"({s['trainable_parameters']:,}) | {s['seconds']:.0f} s, {s['steps']} steps | "
                    f"{s['peak_rss_mb']:.0f} MB vs {s['full_fine_tune']['peak_rss_mb']:.0f} MB |")
    lines = [
        "# LoRA on the digits demo model", "",
        "Each skill: a LoRA on one expert of the frozen `make demo` model (configs/train/lora_*.yaml), "
        "held-out digits, the demo's judge. Old skills: the demo's four scores with the adapter on, in "
        "points against the demo's own figures.", "",
        "| new skill | before -> after | old skills (points) | trainable | LoRA run | peak RSS: LoRA vs full fine-tune |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Full fine-tune runs: {FULL_FT_STEPS} steps of the same recipe with lora.rank=0, for memory only "
        f"(mirror {r['mirror']['full_fine_tune']['seconds']:.0f} s, parity {r['parity']['full_fine_tune']['seconds']:.0f} s "
        "including start-up).", "",
        "Use an adapter: `bagel-generate --model runs/digits/model --lora runs/digits_lora/mirror/export_adapter "
        "--image in.png --prompt \"Mirror it.\" --out mirrored.png`; merged models: runs/digits_lora/*/export.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
