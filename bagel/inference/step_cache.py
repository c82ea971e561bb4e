"""Step caching for image generation: skip most of the decoder on steps where a branch's input
barely changed, decided for each guidance branch of each image on its own.

The rule (a first-block-residual cache): every step, every active branch runs the first decoder
layer. Its residual r = (layer-1 output) - (input embeddings) is compared with the residual the
same branch had at its last full step, as a relative L1 change |r - r_full|_1 / |r_full|_1.
While the change stays below the threshold, the branch reuses what the other layers added at
that step (h_final = h_1 + (h_final - h_1) of that step); when it reaches the threshold, the
branch runs in full and that step becomes the new reference. A branch always runs in full on its
first two steps, on the last step, and on a step after one where it was not active (guidance
interval). (Summing the step-to-step changes instead, TeaCache's accumulation, skipped less for
the same accuracy on the digits model: 1.8x fewer layers at -0.3 points against 2.05x at +0.8.)

Per branch matters: with classifier-free guidance the conditional and unconditional branches
change at different rates, and one decision for all of them would reuse a stale unconditional
velocity against a fresh conditional one (or the reverse), which silently drops or doubles the
guidance.

Setting (bagel.sampling: ImageGenConfig.cache, `--cache`, the app): "off" (default), "auto"
(AUTO_THRESHOLD) or a threshold >= 0; 0 never skips (outputs bitwise those of "off").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BranchState:
    anchor: torch.Tensor | None = None  # first-layer residual at its last full step
    tail: torch.Tensor | None = None  # what layers 2..L (and the final norm) added when it last ran in full
    last_step: int = -2  # the last step this branch was active
    full_steps: int = 0  # steps this branch ran in full so far


@dataclass
class StepCache:
    """The per-branch cache of one generation; `branches` is keyed by workspace row."""

    threshold: float
    num_layers: int
    branches: dict[int, BranchState] = field(default_factory=dict)
    layer_evaluations: int = 0  # decoder layers run, summed over branches and steps

    def decide(self, step: int, last_step: int, rows: list[int], residuals) -> list[bool]:
        """For each active branch (workspace row, its first-layer residual at this step; residuals:
        a list or a tensor with one row per branch): whether it must run the rest of the decoder.
        Updates the states and the counts."""
        states = [self.branches.setdefault(row, BranchState()) for row in rows]
        fresh = [s.anchor is None or s.last_step != step - 1 or s.tail is None or s.full_steps < 2 or step == last_step
                 for s in states]
        compared = [j for j, f in enumerate(fresh) if not f]
        changes = dict(zip(compared, relative_change([residuals[j] for j in compared],
                                                     [states[j].anchor for j in compared])))
        run_full = []
        for j, (s, r) in enumerate(zip(states, residuals)):
            full = fresh[j] or changes[j] >= self.threshold
            if full:
                s.full_steps += 1
                s.anchor = r.clone()  # not a view: it would keep the whole step's residuals alive
            s.last_step = step
            run_full.append(full)
            self.layer_evaluations += self.num_layers if full else 1
        return run_full

    def remember(self, row: int, tail: torch.Tensor) -> None:
        self.branches[row].tail = tail

    def reuse(self, rows: list[int], first: torch.Tensor) -> torch.Tensor:
        """first: the first layer's output of every branch (one row each) -> a copy where each of
        `rows` (branches that skip the rest of the decoder) gets back what the rest added at its
        last full step."""
        out = first.clone()
        if rows:
            out[rows] += torch.stack([self.branches[r].tail for r in rows])
        return out


def relative_change(now: list[torch.Tensor], before: list[torch.Tensor]) -> list[float]:
    """|now - before|_1 / |before|_1 of each pair (mean absolute values), in one computation."""
    if not now:
        return []
    a, b = torch.stack(now), torch.stack(before)
    dims = tuple(range(1, a.dim()))
    return ((a - b).abs().mean(dim=dims) / b.abs().mean(dim=dims).clamp_min(1e-12)).tolist()
