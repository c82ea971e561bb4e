"""What the generation fine-tuning runs share (`bagel-rl`, `bagel-distill`): the digits prompts, the
trainable parameters (a LoRA adapter on the generation expert, or that expert whole), the
iteration loop with a progress bar, and checkpoints with exact resume.

Checkpoints (`RUN_DIR/checkpoints/iter_XXXXXX/`: trainable weights, optimizer, iteration, history)
are written to a temporary folder and renamed; `resume: auto` continues from the newest. A
subclass supplies `step()` (one iteration -> a metrics record) and `postfix(record)`.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from bagel.checkpoint.strict import CheckpointError
from bagel.inference.engine import Engine
from bagel.model import lora
from bagel.progress import track
from bagel.train.config import resume_changes

ADAPTER = "default"
GEN_PATH = ("vae2llm", "llm2vae", "time_embedder", "guidance_embedder")  # the generation path outside the LLM


def stable_seed(*parts) -> int:
    from data_pipelines.shards import stable_seed as seed

    return seed(*parts)


# Prompts ------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    task: str
    text: str
    targets: list[int]  # the digit each generated image should show (count: three)
    image: Image.Image | None = None  # the edit input


class DigitsPrompts:
    """The digits tasks on the training split (never the held-out digits the reports evaluate)."""

    def __init__(self, size: int):
        from data_pipelines.digits import EDIT_INSTRUCTION, caption, count_prompt, digit_image
        from eval.digits import load_split

        self.images, self.labels = load_split("train")
        self.size, self.edit_text = size, EDIT_INSTRUCTION
        self.caption, self.count_prompt, self.digit_image = caption, count_prompt, digit_image

    def draw(self, task: str, rng: np.random.Generator, odds: np.ndarray | None = None) -> Prompt:
        """One prompt of `task`. `odds`: the probability of each first target digit (a prompt's
        key: the digit drawn, the edit's answer, the chain's start); None: uniform, as drawn
        before odds existed."""
        if task == "edit":
            if odds is None:
                j = int(rng.integers(len(self.labels)))
            else:  # the answer's digit first, then a training image that leads to it
                answer = int(rng.choice(10, p=odds))
                j = int(rng.choice(np.flatnonzero(self.labels == (answer - 1) % 10)))
            return Prompt(task, self.edit_text, [(int(self.labels[j]) + 1) % 10],
                          self.digit_image(self.images[j], self.size))
        d = int(rng.integers(10)) if odds is None else int(rng.choice(10, p=odds))
        if task == "t2i":
            return Prompt(task, self.caption(d), [d])
        return Prompt(task, self.count_prompt(d), [(d + k) % 10 for k in range(3)])


def draw_prompts(tasks: dict[str, float], total: int, rng: np.random.Generator, source: DigitsPrompts,
                 odds: dict[str, np.ndarray] | None = None) -> list[Prompt]:
    """`total` prompts, each task its share by weight (the remainder drawn by weight), each task's
    prompts listed together; `odds`: per task, the probability of each prompt key (DigitsPrompts.draw)."""
    names = sorted(tasks)
    share = np.array([tasks[n] for n in names], dtype=np.float64)
    share = share / share.sum() * total
    counts = np.floor(share).astype(int)
    rest = total - counts.sum()
    if rest:
        extra = rng.choice(len(names), size=rest, replace=False, p=(share - counts) / (share - counts).sum())
        counts[extra] += 1
    odds = odds or {}
    return [source.draw(n, rng, odds.get(n)) for n, c in zip(names, counts) for _ in range(c)]


# The run ------------------------------------------------------------------------------------------

class TuningRun:
    """One fine-tuning run of the generation path of `engine.model` (trained in place)."""

    name = "tuning"

    def __init__(self, cfg, engine: Engine, spec: lora.LoraSpec | None, prompts: DigitsPrompts | None = None,
                 log: Callable[[str], None] = print):
        self.cfg, self.log, self.spec = cfg, log, spec
        self.run_dir = Path(cfg.run_dir)
        self.engine = engine
        self.model = engine.model
        self.prompts = prompts or DigitsPrompts(engine.vae_transform.max_size)
        self._make_trainable()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.iteration = 0
        self.skipped: Counter = Counter()
        self.history: list[dict] = []

    def _make_trainable(self) -> None:
        if self.spec is not None:
            lora.attach(self.model, self.spec, ADAPTER)
            with torch.no_grad():  # a start that depends on the seed only (peft draws from the global RNG)
                for name, p in self.model.named_parameters():
                    if lora.is_adapter_param(name):
                        base = name.split(".lora_")[0] + ".base_layer.weight"
                        p.copy_(lora.initial_adapter_tensor(name, tuple(p.shape), self.cfg.seed,
                                                            lambda b=base: self.model.get_parameter(b)))
            return
        for name, p in self.model.named_parameters():  # the generation expert, whole
            p.requires_grad_(".gen." in name or name.startswith(GEN_PATH))

    def draw(self) -> list:
        rng = np.random.default_rng(stable_seed(self.cfg.seed, "prompts", self.iteration))
        return draw_prompts(self.cfg.tasks, self.cfg.prompts_per_step, rng, self.prompts, self.prompt_odds())

    def prompt_odds(self) -> dict[str, np.ndarray] | None:
        """Per task, how likely each prompt key is drawn (None: uniform)."""
        return None

    def extra_state(self) -> dict:
        """What a subclass adds to a checkpoint's state.json (JSON-able), for an exact resume."""
        return {}

    def restore_extra_state(self, state: dict) -> None:
        pass

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def postfix(self, record: dict) -> dict[str, str]:
        return {}

    # checkpoints --------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self) -> Path:
        from bagel.checkpoint.files import save_safetensors

        root = self.run_dir / "checkpoints"
        final = root / f"iter_{self.iteration:06d}"
        tmp = root / f".tmp_iter_{self.iteration:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(self.trainable_state(), tmp / "trainable.safetensors")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"iteration": self.iteration, "skipped": dict(self.skipped),
                                                    "history": self.history, **self.extra_state()}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in sorted(root.glob("iter_*"))[:-self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> None:
        from bagel.checkpoint.files import load_safetensors

        values = load_safetensors(path / "trainable.safetensors")
        params = dict(self.model.named_parameters())
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in values)
        if missing or set(values) - set(params):
            raise CheckpointError(f"{path}: its trainable weights do not match this run's (missing {missing[:3]}); "
                                  "a checkpoint resumes only with the same model and adapter settings")
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        state = json.loads((path / "state.json").read_text())
        self.iteration, self.history = int(state["iteration"]), list(state["history"])
        self.skipped = Counter(state["skipped"])
        self.restore_extra_state(state)

    def latest(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("iter_*"))
        return found[-1] if found else None

    # the loop -----------------------------------------------------------------------------------
    def run(self, on_record: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
        cfg = self.cfg
        if cfg.resume == "auto" and self.latest() is not None:
            path = self.latest()
            self.load(path)
            self.log(f"[bagel-{self.name}] resumed from {path} (iteration {self.iteration})")
        bar = track(total=cfg.iterations, desc=self.name, unit="it", enabled=progress)
        bar.update(self.iteration)
        while self.iteration < cfg.iterations:
            record = self.step()
            self.history.append(record)
            if on_record is not None:
                on_record(record)
            bar.set_postfix(**self.postfix(record))
            bar.update()
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations:
                self.save()
        bar.close()
        return self.history


# What the command-line tools share ----------------------------------------------------------------

# What a resumed run may set differently from the run it continues: how long it runs, how often it
# saves, what it reports. Anything else would continue one run under another's settings.
RESUME_MAY_CHANGE = ("run_dir", "iterations", "checkpoint_every", "keep", "resume", "evaluate", "eval_limit",
                     "eval_unseen_chains", "tensorboard")


def start_run_dir(cfg, what: str) -> Path:
    """Check that a run may start or continue in cfg.run_dir (a new run, `resume: none`, is refused
    where one was made; a continued one must keep the settings in its config.yaml, where a key an
    older config lacks counts as its default) and that cfg.model exists; create the folder and
    write config.yaml."""
    run_dir = Path(cfg.run_dir)
    root = run_dir / "checkpoints"
    if root.is_dir() and any(root.glob("iter_*")):
        if cfg.resume == "none":
            raise ValueError(f"run_dir {run_dir} already holds {what}: --resume=auto continues it, or choose "
                             "another run_dir (nothing is deleted)")
        changed = resume_changes(run_dir / "config.yaml", cfg, RESUME_MAY_CHANGE)
        if changed:
            raise ValueError(f"run_dir {run_dir} holds {what} with other settings ({', '.join(changed)}): it "
                             "continues only with its own (its config.yaml); choose another run_dir (nothing is deleted)")
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"model {cfg.model} does not exist (make demo writes runs/digits/model)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


SCORES = ("understanding_accuracy", "generation_accuracy", "edit_accuracy", "interleaved_accuracy")
UNSEEN = "interleaved_unseen_chains"  # per chain, 1 if right: noise the demo's evaluation never draws
UNSEEN_SEED = 1000  # the demo's evaluation draws from seed 0


def digits_scores(engine, limit: int, unseen_chains: int = 0) -> dict:
    """The demo's four held-out scores (eval.digits.evaluate), and with `unseen_chains` > 0 the
    interleaved task on 10 x unseen_chains more chains (eval.digits.interleaved_results): the
    demo's 100 chains put a standard error of about 2.5 points on one score."""
    from eval.digits import DigitsEvalConfig, evaluate, interleaved_results

    m = evaluate(engine, DigitsEvalConfig(limit=limit), progress=False)
    scores = {k: m[k] for k in SCORES}
    if unseen_chains:
        ok = interleaved_results(engine, DigitsEvalConfig(seeds=unseen_chains, seed=UNSEEN_SEED))
        scores[UNSEEN] = ok.astype(int).tolist()
    return scores


def scores_before(run_dir: Path, engine, limit: int, unseen_chains: int = 0) -> dict:
    """The scores before the run: measured once, kept in before.json (a resumed run reads them)."""
    path = run_dir / "before.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if len(before.get(UNSEEN, [])) == 10 * unseen_chains:
            return before
    before = digits_scores(engine, limit, unseen_chains)
    path.write_text(json.dumps(before) + "\n")
    return before


def score_change(before: dict, after: dict) -> str:
    return ", ".join(f"{k.replace('_accuracy', '')} {before[k]:.1%} -> {after[k]:.1%}" for k in SCORES)


def score_table(before: dict, after: dict) -> str:
    rows = [f"| {k.replace('_accuracy', '')} | {before[k]:.1%} | {after[k]:.1%} | {100 * (after[k] - before[k]):+.1f} |"
            for k in SCORES]
    if UNSEEN in before and UNSEEN in after:
        from eval.digits import paired_change

        b, a = before[UNSEEN], after[UNSEEN]
        change, se = paired_change(b, a)
        rows.append(f"| interleaved, {len(b)} chains of unseen noise | {np.mean(b):.1%} | {np.mean(a):.1%} | "
                    f"{100 * change:+.1f} +- {100 * se:.1f} (paired) |")
    return "| task | before | after | change (points) |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


class RecordLog:
    """A run's records to `metrics.jsonl` and TensorBoard (`tag/key`). A resumed run replays the
    iterations after its checkpoint: the first record trims the file back, so each is logged once."""

    def __init__(self, run_dir: Path, tool: str, tag: str, tensorboard: bool):
        from bagel.train.run_log import open_tensorboard

        self.path, self.tag = Path(run_dir) / "metrics.jsonl", tag
        self.tb = open_tensorboard(run_dir, tool) if tensorboard else None
        self.trimmed = False

    def __call__(self, record: dict) -> None:
        from bagel.train.run_log import trim_metrics

        if not self.trimmed:
            trim_metrics(self.path, record["iteration"] - 1, key="iteration")
            self.trimmed = True
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(f"{self.tag}/{k}", v, record["iteration"])

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.tb is not None:
            self.tb.close()
