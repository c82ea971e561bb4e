"""Raw webdataset sample -> sample plan (`bagel.packing` items) and its token count.

Decoding is a pure function of (raw bytes, seed, sample reference): the only random choice, a
caption among alternatives, is drawn from a generator seeded by (seed, key, visit). So a sample
re-read on resume decodes to exactly what it was, which is what lets the packer and the shuffle
buffer save references instead of tensors.

Every way a sample can be bad raises `SkipSample(reason, detail)`; the caller counts the reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bagel.packing import CfgDropout, Sample, Text, VaeImage, VitImage, apply_cfg_dropout, item_num_tokens
from bagel.tokenizer import SpecialTokens
from data_pipelines.schema import ImageSegment, SchemaError, TextSegment, loads_document
from data_pipelines.shards import SampleRef, stable_seed
from bagel.transforms import ResizeSpec, transform_image


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class DecodedSample:
    key: str
    ref: SampleRef
    plan: Sample
    num_tokens: int  # tokens in the packed sequence, markers included, after CFG dropout


class SampleDecoder:
    """Turns raw samples into plans with the given transforms and tokenizer.

    `tokenizer` is anything with `encode(text, add_special_tokens=False) -> list[int]` (the
    project tokenizer from `bagel.tokenizer.load_tokenizer`), or a `tokenizers.Tokenizer`.
    """

    def __init__(self, tokenizer, tokens: SpecialTokens, vae: ResizeSpec, vit: ResizeSpec,
                 seed: int = 0, dropout: CfgDropout | None = None):
        self.tokenizer, self.tokens, self.vae, self.vit, self.seed = tokenizer, tokens, vae, vit, seed
        self.dropout = dropout
        self._cache: dict[str, list[int]] = {}  # prompts repeat a lot (digits: 30 distinct texts)

    def label_id(self, name: str) -> int:
        """A schema label name (schema.SPECIAL_TOKEN_LABELS) -> its token id."""
        return {"start_of_image": self.tokens.start_of_image, "eos": self.tokens.eos}[name]

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            out = self.tokenizer.encode(text, add_special_tokens=False)
            ids = list(getattr(out, "ids", out))  # tokenizers.Encoding or list
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    def __call__(self, raw: dict[str, Any]) -> DecodedSample:
        key, ref = raw["__key__"], raw["__ref__"]
        if "json" not in raw:
            raise SkipSample("missing_json", f"{key} ({ref}): no {key}.json member")
        try:
            doc = loads_document(raw["json"], where=f"{key}.json")
        except SchemaError as e:
            reason = "bad_json" if "invalid JSON" in str(e) else "schema_error"
            raise SkipSample(reason, str(e)) from e
        rng = None
        num_images = len(doc.images)
        plan: Sample = []
        for seg in doc.segments:
            if isinstance(seg, TextSegment):
                text = seg.text
                if isinstance(text, list):
                    rng = rng or np.random.default_rng(stable_seed(self.seed, key, ref.visit))
                    text = text[int(rng.integers(len(text)))]
                label = self.label_id(seg.special_token_label or "eos") if seg.special_token_loss else None
                ids = self.encode(text)
                plan.append(Text(ids, loss=seg.loss, enable_cfg=seg.cfg,
                                 special_token_loss=seg.special_token_loss, special_token_label=label))
                continue
            assert isinstance(seg, ImageSegment)
            image = self._open_image(raw, key, seg.image)
            next_label = self.label_id(seg.next_label) if seg.next_label else None
            for role in seg.roles:
                spec = self.vit if role == "vit" else self.vae
                tensor = transform_image(image, spec, num_images)  # (3, H, W) in [-1, 1]
                label = next_label if role == seg.roles[-1] else None  # on the segment's last block
                if role == "vit":
                    plan.append(VitImage(tensor, enable_cfg=seg.cfg, next_label=label))
                elif role == "vae":
                    plan.append(VaeImage(tensor, loss=False, enable_cfg=seg.cfg, next_label=label))
                else:
                    plan.append(VaeImage(tensor, loss=True, enable_cfg=False))
        if not any(getattr(item, "loss", False) for item in plan):
            raise SkipSample("no_loss", f"{key}: no segment carries a loss")
        if self.dropout is not None:
            # CFG dropout is decided here, per sample and visit, so packing budgets the tokens that
            # really go into the pack (and a resumed stream decides the same).
            drop_rng = np.random.default_rng(stable_seed(self.seed, key, ref.visit, "cfg"))
            plan = apply_cfg_dropout(plan, self.dropout, lambda: float(drop_rng.random()))
        return DecodedSample(key, ref, plan, sum(item_num_tokens(i, self.vit.stride, self.vae.stride) for i in plan))


    @staticmethod
    def _open_image(raw: dict[str, Any], key: str, name: str) -> Image.Image:
        data = raw.get(name)
        if data is None:
            raise SkipSample("missing_image", f"{key}: {name} is referenced but not in the shard")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                image.load()  # decode now: a truncated file fails here, not later in a worker
            return image
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
            raise SkipSample("bad_image", f"{key}.{name}: {type(e).__name__}: {e}") from e
