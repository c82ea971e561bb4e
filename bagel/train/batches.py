"""What the trainer consumes: an iterable of `TrainItem`s with `state_dict()` / `load_state_dict()`.

`SyntheticSource` (here) makes random-but-learnable samples with `pack_samples`, deterministic per
sample index, for tests and benchmarks. Global batch b holds samples b*S .. b*S+S-1; rank r packs
those with index % world == r, and every sample carries its own flow noise and VAE posterior
noise, so one process and N ranks see the same global batch with the same noise. The data
pipeline's sources (webdataset shards, text corpora) live in `data_pipelines` and are adapted and
handed to the trainer by the wiring layer (bagel/cli/train.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from bagel.batch import PackedBatch
from bagel.config import BagelConfig
from bagel.packing import Text, VaeImage, VitImage, pack_samples
from bagel.tokenizer import SpecialTokens


@dataclass
class TrainItem:
    batch: PackedBatch
    noise: torch.Tensor | None = None  # (N_lat, p*p*C) flow noise; None: the trainer draws it
    vae_eps: torch.Tensor | None = None  # (I_vae, z, H/8, W/8) posterior noise; None: drawn
    num_samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # cumulative skipped samples by reason


def synthetic_tokens(cfg: BagelConfig) -> SpecialTokens:
    v = cfg.llm.vocab_size
    return SpecialTokens(bos=v - 4, eos=v - 3, start_of_image=v - 2, end_of_image=v - 1)

class SyntheticSource:
    """Three sample kinds, cycling: text-to-image, image QA, and an interleaved edit sample.

    A sample's "class" c (0..9) sets its image colour and the token range of its text, so both
    losses have something to learn. Images are all `image_size` square (VAE) or the nearest
    multiple of the ViT patch below it, so padding never differs between packings.
    """

    def __init__(self, cfg: BagelConfig, data, rank: int = 0, world_size: int = 1):
        self.cfg, self.data, self.rank, self.world = cfg, data, rank, world_size
        self.tokens = synthetic_tokens(cfg)
        self.next_batch = 0
        if data.samples_per_batch < world_size:
            raise ValueError(f"data.samples_per_batch={data.samples_per_batch} < world size {world_size}: "
                             "some rank would get no sample")
        if data.image_size % cfg.latent_downsample:
            raise ValueError(f"data.image_size={data.image_size} must be a multiple of {cfg.latent_downsample}")

    def state_dict(self) -> dict[str, Any]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # {"ranks": [...]}: saved on another world size; the batch index is global, so it carries over
        self.next_batch = max(int(s["next_batch"]) for s in state.get("ranks", [state]))

    def sample(self, index: int):
        """(plan, per-sample flow noise, per-image VAE eps) of sample `index`."""
        cfg, d = self.cfg, self.data
        g = torch.Generator().manual_seed(d.seed * 7919 + index)
        c = int(torch.randint(10, (), generator=g))
        span = max(1, (cfg.llm.vocab_size - 8 - d.vocab_low) // 10)

        def text(loss: bool) -> Text:
            n = int(torch.randint(d.text_len[0], d.text_len[1] + 1, (), generator=g))
            ids = (d.vocab_low + c * span + torch.randint(span, (n,), generator=g)).tolist()
            return Text(ids, loss=loss)

        def image(size: int) -> torch.Tensor:
            colour = torch.tensor([(c % 3) - 1.0, ((c // 3) % 3) - 1.0, (c / 4.5) - 1.0]) * 0.8
            return (colour[:, None, None] + 0.1 * torch.randn(3, size, size, generator=g)).clamp(-1, 1)

        vae_size = d.image_size
        vit_size = max(cfg.vit.patch_size, d.image_size // cfg.vit.patch_size * cfg.vit.patch_size)
        logit = float(torch.randn((), generator=g))
        kind = index % 3
        if kind == 0:
            plan = [text(False), VaeImage(image(vae_size), loss=True, timestep_logit=logit)]
        elif kind == 1:
            plan = [VitImage(image(vit_size)), text(False), text(True)]
        else:
            plan = [text(True), VaeImage(image(vae_size)), VitImage(image(vit_size)),
                    VaeImage(image(vae_size), loss=True, timestep_logit=logit)]
        n_vae = sum(isinstance(item, VaeImage) for item in plan)
        side = vae_size // cfg.latent_downsample
        noise = torch.randn(n_vae * side * side, cfg.patch_latent_dim, generator=g)
        z = cfg.vae.z_channels
        eps = torch.randn(n_vae, z, vae_size // cfg.vae.downsample, vae_size // cfg.vae.downsample, generator=g)
        return plan, noise, eps

    def make(self, batch_index: int) -> TrainItem:
        if self.data.num_batches > 0:
            batch_index %= self.data.num_batches
        first = batch_index * self.data.samples_per_batch
        mine = [first + j for j in range(self.data.samples_per_batch) if j % self.world == self.rank]
        plans, noises, eps = zip(*(self.sample(i) for i in mine))
        batch = pack_samples(list(plans), self.cfg, self.tokens)
        return TrainItem(batch=batch, noise=torch.cat(noises), vae_eps=torch.cat(eps), num_samples=len(mine))

    def __iter__(self) -> Iterator[TrainItem]:
        while True:
            item = self.make(self.next_batch)
            self.next_batch += 1
            yield item
