"""Rewards for RL fine-tuning of generation: plug-ins `(images, prompts, meta) -> scores`.

A reward is any callable taking the generated PIL images, their prompts and one metadata dict per
image, returning one float per image. A recipe names it:

* `digits` (built in): the digits judge (`eval.digits.Judge`, an RBF SVC fitted on the real
  training digits only, never on model outputs) scores how surely an image shows `meta["digit"]`:
  the softmax of the SVC's one-vs-rest decision values at that digit (`mode="prob"`, dense: it
  separates samples of a group that are all right or all wrong), or 1/0 for right/wrong
  (`mode="correct"`).
* `package.module:function`: any importable callable.
* `subprocess:COMMAND`: an external scorer (an object detector, a VLM judge) in another process,
  spoken to in JSON lines on its stdin/stdout: one request per batch
  `{"prompts": [...], "meta": [...], "images": ["<base64 PNG>", ...]}`, one answer
  `{"scores": [...]}`. The process is started once and kept.

`validate_scores` turns what a reward returned into a float tensor and a mask of the usable
entries: a wrong count or shape is an error naming the reward; NaN or inf entries are masked
(the caller skips and counts their groups).
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import shlex
import subprocess
from typing import Any, Callable, Protocol

import numpy as np
import torch
from PIL import Image


class RewardError(ValueError):
    """A reward that cannot be used (unknown name, wrong output, a dead external scorer)."""


class Reward(Protocol):
    def __call__(self, images: list[Image.Image], prompts: list[str], meta: list[dict[str, Any]]) -> Any: ...


class DigitsReward:
    """How surely the digits judge sees `meta["digit"]` in each image."""

    def __init__(self, mode: str = "prob", temperature: float = 1.0):
        if mode not in ("prob", "correct"):
            raise RewardError(f"digits reward mode must be 'prob' or 'correct', got {mode!r}")
        from eval.digits import Judge

        self.judge, self.mode, self.temperature = Judge(), mode, temperature

    def __call__(self, images, prompts, meta) -> np.ndarray:
        from eval.digits import to_features

        missing = [i for i, m in enumerate(meta) if "digit" not in m]
        if missing:
            raise RewardError(f"digits reward: meta of image(s) {missing} has no 'digit'")
        target = np.array([int(m["digit"]) for m in meta])
        features = np.stack([to_features(im) for im in images])
        if self.mode == "correct":
            return (self.judge.svc.predict(features) == target).astype(np.float64)
        scores = self.judge.svc.decision_function(features) / self.temperature  # (n, 10) one-vs-rest
        scores = np.exp(scores - scores.max(1, keepdims=True))
        return (scores / scores.sum(1, keepdims=True))[np.arange(len(target)), target]


class SubprocessReward:
    """An external scorer process speaking JSON lines (see the module docstring)."""

    def __init__(self, command: str, timeout: float = 300.0):
        self.command, self.timeout = command, timeout
        try:
            self.proc = subprocess.Popen(shlex.split(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)
        except OSError as e:
            raise RewardError(f"reward subprocess:{command}: cannot start ({e})") from None

    def __call__(self, images, prompts, meta) -> list[float]:
        pngs = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        request = json.dumps({"prompts": list(prompts), "meta": list(meta), "images": pngs})
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = self.proc.poll()
            raise RewardError(f"reward subprocess:{self.command} gave no answer (exit status {code})")
        try:
            return json.loads(line)["scores"]
        except (ValueError, KeyError, TypeError) as e:
            raise RewardError(f"reward subprocess:{self.command}: expected a JSON line with 'scores', got "
                              f"{line.strip()[:100]!r} ({type(e).__name__})") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def load_reward(name: str, **options) -> Callable:
    """The reward a recipe names: `digits`, `subprocess:COMMAND` or `package.module:function`."""
    if name == "digits":
        return DigitsReward(**options)
    if name.startswith("subprocess:"):
        return SubprocessReward(name[len("subprocess:"):], **options)
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise RewardError(f"unknown reward {name!r}: expected 'digits', 'subprocess:COMMAND' or "
                          "'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {name!r} cannot be loaded ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise RewardError(f"reward {name!r} is not callable")
    return fn(**options) if isinstance(fn, type) else fn


def validate_scores(scores: Any, n: int, name: str = "reward") -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 scores, usable mask) of what a reward returned for n images. A wrong count or
    shape raises RewardError; NaN/inf entries are masked out (usable False)."""
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RewardError(f"{name} returned {type(scores).__name__} that is not numbers ({e})") from None
    if arr.shape != (n,):
        raise RewardError(f"{name} returned scores of shape {arr.shape}, expected ({n},): one number per image")
    t = torch.from_numpy(arr)
    return t, torch.isfinite(t)
