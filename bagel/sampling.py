"""Generation settings as plain data: the image sampler's (`ImageGenConfig`, with the release's
named presets), text decoding's (`SamplingConfig`), and the defaults a model directory recommends
(`GenerationDefaults`, `generation.json`, written by training and read by the engine).

The Python API, the CLIs, the app and the evaluations all start from these objects, so the same
inputs give the same outputs whichever front end asks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bagel.config import ConfigError, read_json_object

RENORM_TYPES = ("global", "channel", "text_channel")

# The release's sampler settings per entry point (its inference notebook, app.py and
# eval/gen/gen_images_mp.py), the one place they are written: the Python API, the CLIs, the app and the evaluations take them
# from here. All use 50 grid points and shift 3 (ImageGenConfig's defaults).
PRESETS: dict[str, dict] = {
    # notebook T2I (the app's T2I tab passes no image scale and so pays a third branch at 1.5;
    # with no image in the context that branch only rescales the text guidance)
    "text_to_image": dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global"),
    "edit": dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"),
    "geneval": dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="global"),
}


# The largest of 0.1 / 0.15 / 0.2 / 0.3 whose images stay above 35 dB PSNR of the uncached ones on the
# digits demo model (32 text-to-image prompts, 32 edits): README, Step cache.
AUTO_THRESHOLD = 0.15


def cache_threshold(value) -> float | None:
    """"off" / None -> None; "auto" -> AUTO_THRESHOLD; a number (or its text) >= 0 -> float."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO_THRESHOLD
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"cache={value!r}: expected off, auto or a threshold >= 0 (e.g. 0.1)") from None
    if not threshold >= 0 or threshold == float("inf"):
        raise ConfigError(f"cache={value!r}: the threshold must be a finite number >= 0")
    return threshold


@dataclass
class ImageGenConfig:
    """Sampler settings; the defaults are the `text_to_image` preset."""

    num_timesteps: int = 50  # grid points; the model runs num_timesteps - 1 times
    timestep_shift: float = 3.0  # the sampler's shift (training's is BagelConfig.train_timestep_shift)
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    # step cache (bagel/inference/step_cache.py): "off", "auto" or a threshold >= 0 (0: never skips)
    cache: str | float = "off"

    def __post_init__(self):
        self.cfg_interval = tuple(float(x) for x in self.cfg_interval)
        cache_threshold(self.cache)
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ConfigError(f"cfg_renorm_type={self.cfg_renorm_type!r}; expected one of {RENORM_TYPES}")
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ConfigError(f"num_timesteps={self.num_timesteps!r}: at least 2 grid points are needed "
                              "(the model runs num_timesteps - 1 times)")
        for name in ("timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)}: must be a finite number")
        if self.timestep_shift <= 0:
            raise ConfigError(f"timestep_shift={self.timestep_shift}: must be > 0 (1 = no shift)")
        if self.cfg_text_scale < 0 or self.cfg_img_scale < 0:
            raise ConfigError(f"guidance scales must be >= 0, got text {self.cfg_text_scale}, image "
                              f"{self.cfg_img_scale} (1 = no guidance)")
        lo, hi = self.cfg_interval if len(self.cfg_interval) == 2 else (math.nan, math.nan)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"cfg_interval={list(self.cfg_interval)}: need 0 <= start <= end <= 1 "
                              "(guidance applies where start < t <= end)")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise ConfigError(f"cfg_renorm_min={self.cfg_renorm_min}: must be in [0, 1]")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ImageGenConfig":
        """A named preset (`PRESETS`) with some fields replaced."""
        if name not in PRESETS:
            raise ConfigError(f"unknown sampler preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "ImageGenConfig":
        return dataclasses.replace(self, **changes)

    def scales_at(self, t: float) -> tuple[float, float]:
        lo, hi = self.cfg_interval
        if lo < t <= hi:
            return self.cfg_text_scale, self.cfg_img_scale
        return 1.0, 1.0


@dataclass
class SamplingConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: must be a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")


GENERATION_FILE = "generation.json"


@dataclass
class GenerationDefaults:
    """The sampler settings a model recommends per task (a model trained with few steps or no
    shift says so here); missing tasks fall back to the presets. A closed-domain model (the
    digits demo) also lists its `vocabulary`: prompts with other words get a warning."""

    text_to_image: ImageGenConfig = field(default_factory=lambda: ImageGenConfig.preset("text_to_image"))
    edit: ImageGenConfig = field(default_factory=lambda: ImageGenConfig.preset("edit"))
    vocabulary: tuple[str, ...] | None = None

    @classmethod
    def from_overrides(cls, overrides: dict, source: str = "generation") -> "GenerationDefaults":
        """Presets with `{task: {field: value}}` on top (+ an optional `vocabulary` word list);
        unknown keys or bad values are ConfigErrors."""
        unknown = sorted(set(overrides) - {"text_to_image", "edit", "vocabulary"})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected text_to_image, edit, vocabulary")
        vocabulary = overrides.get("vocabulary")
        if vocabulary is not None:
            if not isinstance(vocabulary, list) or not all(isinstance(w, str) and w for w in vocabulary):
                raise ConfigError(f"{source}.vocabulary: expected a list of words, got {vocabulary!r}")
            vocabulary = tuple(vocabulary)
        tasks = {}
        for task in ("text_to_image", "edit"):
            given = dict(overrides.get(task) or {})
            names = {f.name for f in dataclasses.fields(ImageGenConfig)}
            bad = sorted(set(given) - names)
            if bad:
                raise ConfigError(f"{source}.{task}: unknown key(s) {bad}; valid keys: {sorted(names)}")
            if "cfg_interval" in given:
                given["cfg_interval"] = tuple(given["cfg_interval"])
            tasks[task] = ImageGenConfig.preset(task, **given)
        return cls(**tasks, vocabulary=vocabulary)

    def for_context(self, has_image: bool) -> ImageGenConfig:
        """The settings for an image drawn after a context: with an image in the context, drawing
        is an edit of it (the image guidance applies, as for the next image of an interleaved
        chain, where text guidance has nothing to remove); without one, text-to-image."""
        return self.edit if has_image else self.text_to_image

    def to_dict(self) -> dict:
        out: dict = {task: {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
                     for task, cfg in (("text_to_image", self.text_to_image), ("edit", self.edit))}
        if self.vocabulary is not None:
            out["vocabulary"] = list(self.vocabulary)
        return out

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "GenerationDefaults":
        """`model_dir/generation.json`, or the presets when the directory has none."""
        path = Path(model_dir) / GENERATION_FILE
        if not path.is_file():
            return cls()
        return cls.from_overrides(read_json_object(path), str(path))
