"""The inference engine: understanding, text-to-image, editing, think mode and interleaved output.

A `Session` is one conversation with the three CFG contexts the release keeps:
  full         everything so far;
  text_uncond  `full` as it was before the last text input (a free fork, taken before each text
               and after each image, as the official inferencer does);
  img_uncond   the text inputs only (images skipped), so its RoPE ids carry no image slots.
Methods take lists of sessions and batch them: prompts of different lengths prefill in one
forward, and all CFG branches of all images are denoised in one forward per step.

Interleaved output protocol (our convention, used by the digits demo): after a block is added,
the LM head's prediction at its closing marker says what comes next: `<|vision_start|>` -> an
image, `<|im_start|>` -> a text segment, anything else -> the turn is over.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from bagel.inference import context as ctxlib
from bagel.inference.generate_image import Branches, decode_latents, generate_latents
from bagel.inference.generate_text import generate_text
from bagel.inference.kv_cache import Context, KVCache
from bagel.sampling import GenerationDefaults, ImageGenConfig, SamplingConfig
from bagel.packing import latent_grid
from bagel.tokenizer import SpecialTokens, load_tokenizer, unknown_words
from bagel.transforms import VAE_INFERENCE, VIT_INFERENCE, ResizeSpec, load_model_transforms, resize_size, to_pil, to_tensor

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here")
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here")


@dataclass
class Session:
    full: Context
    text_uncond: Context
    img_uncond: Context
    image_size: tuple[int, int] | None = None  # (H, W) of the last input image (editing output size)
    next_hint: int | None = None  # LM prediction at the last block's closing marker
    # the LLM's mean hidden state over the last ViT image's tokens (an image-aware drafter reads it)
    image_feature: torch.Tensor | None = None

    def branches(self) -> Branches:
        return Branches(self.full, self.text_uncond, self.img_uncond)

    def fork(self) -> "Session":
        """A copy that continues on its own (copy-on-write contexts: nothing is copied now)."""
        return dataclasses.replace(self, full=self.full.fork(), text_uncond=self.text_uncond.fork(),
                                   img_uncond=self.img_uncond.fork())


class Engine:
    def __init__(self, model, vae, tokenizer, tokens: SpecialTokens | None = None,
                 vae_transform: ResizeSpec = VAE_INFERENCE, vit_transform: ResizeSpec = VIT_INFERENCE,
                 max_context: int | None = None, defaults: GenerationDefaults | None = None):
        self.model, self.vae, self.tokenizer = model.eval(), vae, tokenizer
        self.tokens = tokens or SpecialTokens.from_tokenizer(tokenizer)
        self.vae_transform, self.vit_transform = vae_transform, vit_transform
        # the sampler settings of each task when a call gives none (the model's generation.json)
        self.defaults = defaults or GenerationDefaults()
        self.max_context = max_context or model.cfg.llm.max_position_embeddings
        self.cache = KVCache.for_model(model)
        self.speculative = None  # (heads, SpecConfig): decode text with draft heads, same output
        self.model_dir: Path | None = None  # set by from_pretrained (adapters check it for merged copies)
        self.cache_stats: dict = {}  # decoder layers run / a plain run's, of the last image generation with cfg.cache on
        self.loras: dict[str, tuple[str, float]] = {}  # adapter name -> (directory, scale)
        self.quantized: str | None = None  # the mode once Engine.quantize ran (bagel.config.QUANT_MODES)

    # LoRA adapters ----------------------------------------------------------------------------
    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Put the LoRA adapter in `path` (peft's format) on the model in memory, at `scale`;
        returns its name. Several adapters add up; the base weights are never touched."""
        from bagel.checkpoint.adapters import load_adapter

        if self.quantized:
            raise ValueError(f"the model is quantized ({self.quantized}): put adapters on before quantizing, "
                             "or merge them into the weights (bagel-lora merge)")
        name = name or f"lora{len(self.loras)}"
        if name in self.loras:
            raise ValueError(f"an adapter named {name!r} is already loaded ({self.loras[name][0]})")
        load_adapter(self.model, path, name, scale, model_dir=self.model_dir)
        self.loras[name] = (str(path), float(scale))
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Scale adapter `name` (0 switches it off: outputs exactly the base model's)."""
        from bagel.model.lora import set_scales

        set_scales(self.model, {name: scale})
        self.loras[name] = (self.loras[name][0], float(scale))

    def unload_lora(self, name: str) -> None:
        from bagel.model.lora import remove_adapter

        remove_adapter(self.model, name)
        del self.loras[name]

    def use_loras(self, adapters: list[tuple[str | Path, float]]) -> list[str]:
        """Swap adapters without reloading the base: remove the loaded ones, load these
        (path, scale) pairs; [] leaves the plain base model. Returns their names."""
        for name in list(self.loras):
            self.unload_lora(name)
        return [self.load_lora(path, scale) for path, scale in adapters]

    def quantize(self, mode: str) -> dict[str, int]:
        """int8 weights for the LLM experts, in place (bagel/model/quant.py: "int8", "int8-dynamic",
        or the same through torchao: "torchao-int8", "torchao-int8-dynamic"); returns the layer
        count and their bytes before and after. Adapters must be merged first (bagel-lora merge)."""
        from bagel.model.quant import quantize_experts

        report = quantize_experts(self.model, mode)
        self.quantized = mode
        return report

    def use_speculative(self, heads=None, spec=None) -> None:
        """Decode text speculatively with draft heads (the model's own, or `heads`). Greedy output
        is token-identical to plain decoding; sampling keeps the target distribution. `spec`: a
        `bagel.inference.speculative.SpecConfig` (default: a chain as deep as the heads)."""
        from bagel.inference.speculative import SpecConfig

        heads = heads if heads is not None else getattr(self.model, "draft_heads", None)
        if heads is None:
            raise ValueError("this model has no draft heads: train some (bagel-train with "
                             "model.overrides.draft_heads, see configs/train/heads_*.yaml) or pass a heads directory")
        self.speculative = (heads, spec or SpecConfig())

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        vae_device: str | None = None, vit_device: str | None = None,
                        loras: list[tuple[str | Path, float]] = (), quantize: str | None = None,
                        **kwargs) -> "Engine":
        """Load model, VAE and tokenizer from our layout or the released one: a directory, or a
        Hugging Face Hub id such as "ByteDance-Seed/BAGEL-7B-MoT" (fetched into the Hub cache once;
        HF_HUB_OFFLINE=1 reads the cache only).

        `vae_device` / `vit_device` let the VAE and the ViT live elsewhere (e.g. on CPU next to a
        GPU LLM) to save accelerator memory. `loras`: (adapter directory, scale) pairs put on the
        model (Engine.use_loras); `quantize`: int8 experts (Engine.quantize, bagel.config.QUANT_MODES)."""
        from bagel.checkpoint.hub import resolve_model_dir
        from bagel.checkpoint.pretrained import VAE_NAME, from_pretrained
        from bagel.checkpoint.vae import load_vae

        path = resolve_model_dir(path)
        model = from_pretrained(path, dtype=dtype, device=device)
        if vit_device and model.cfg.visual_und:
            model.vit.to(vit_device)
        if not (path / VAE_NAME).is_file():
            raise FileNotFoundError(f"{path}: missing {VAE_NAME} (the VAE weights)")
        vae = load_vae(path / VAE_NAME, model.cfg.vae, device=vae_device or device)
        vae_t, vit_t = load_model_transforms(path)
        kwargs.setdefault("vae_transform", vae_t)
        kwargs.setdefault("vit_transform", vit_t)
        kwargs.setdefault("defaults", GenerationDefaults.from_model_dir(path))
        engine = cls(model, vae, load_tokenizer(path), **kwargs)
        engine.model_dir = path
        engine.use_loras(list(loras))
        if quantize not in (None, "none"):
            engine.quantize(quantize)
        return engine

    @property
    def native_size(self) -> tuple[int, int]:
        """(H, W) of the images the model was trained to generate (its VAE transform's largest side)."""
        side = self.vae_transform.max_size
        return side, side

    def prompt_warnings(self, text: str) -> list[str]:
        """Why `text` is likely to be outside what the model knows: words outside its stated
        vocabulary (generation.json `vocabulary`, for closed-domain models such as the digits
        demo), or, without one, words its tokenizer can only spell letter by letter."""
        words = unknown_words(self.tokenizer, text, self.defaults.vocabulary)
        if not words:
            return []
        listed = ", ".join(repr(w) for w in words[:8]) + (" ..." if len(words) > 8 else "")
        if self.defaults.vocabulary:
            known = " ".join(self.defaults.vocabulary)
            return [f"this model was trained on a closed vocabulary; unknown word(s) {listed} will not "
                    f"steer it (known words: {known})"]
        return [f"the tokenizer spells {listed} letter by letter: words this model has likely never seen"]

    # Sessions and inputs ------------------------------------------------------------------------
    def new_sessions(self, n: int = 1) -> list[Session]:
        sessions = []
        for _ in range(n):
            full = self.cache.new_context()
            sessions.append(Session(full, full.fork(), self.cache.new_context()))
        return sessions

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (BAGEL frames each segment itself)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def add_text(self, sessions: list[Session], texts: list[str]) -> None:
        ids = [self.encode(t) for t in texts]
        for s, i in zip(sessions, ids):
            if s.full.rope + len(i) + 2 > self.max_context:
                raise ValueError(f"the context would reach {s.full.rope + len(i) + 2} positions, over the model's "
                                 f"limit of {self.max_context} (max_position_embeddings)")
            s.text_uncond = s.full.fork()
        hidden = ctxlib.add_text(self.model, self.tokens, [s.full for s in sessions], ids)
        ctxlib.add_text(self.model, self.tokens, [s.img_uncond for s in sessions], ids)
        for s, hint in zip(sessions, next_hints(self.model, hidden)):
            s.next_hint = hint

    def add_image(self, sessions: list[Session], images: list[Image.Image], vae: bool = True, vit: bool = True,
                  generator: torch.Generator | None = None, eps: list[torch.Tensor] | None = None) -> None:
        """Add an input image: VAE block then ViT block (editing), or ViT only (understanding). The
        VAE transform sets the size editing outputs keep."""
        if not (vae or vit):
            raise ValueError("add_image needs vae=True, vit=True or both")
        images = [resized(im, self.vae_transform) for im in images]
        for s, im in zip(sessions, images):
            s.image_size = (im.height, im.width)
        fulls = [s.full for s in sessions]
        if vae:
            hidden = ctxlib.add_vae_image(self.model, self.vae, self.tokens, fulls, [to_tensor(im) for im in images],
                                          generator=generator, eps=eps)
        if vit:
            hidden = ctxlib.add_vit_image(self.model, self.tokens, fulls,
                                          [to_tensor(resized(im, self.vit_transform)) for im in images])
            for s, h in zip(sessions, hidden):
                s.image_feature = h[1:-1].mean(0)  # without the two vision markers
        for s, hint in zip(sessions, next_hints(self.model, hidden)):
            s.text_uncond = s.full.fork()
            s.next_hint = hint

    # Outputs ----------------------------------------------------------------------------------------
    def generate_text(self, sessions: list[Session], sampling: SamplingConfig = SamplingConfig(),
                      generator: torch.Generator | None = None, keep_logits: bool = False):
        """Decode an answer per session on a fork of its full context (the context is unchanged)."""
        forks = [s.full.fork() for s in sessions]
        if self.speculative is not None and not keep_logits:
            from bagel.inference.speculative import generate_speculative

            heads, spec = self.speculative
            out = generate_speculative(self.model, self.tokens, forks, sampling, heads=heads, spec=spec,
                                       generator=generator, images=[s.image_feature for s in sessions])
        else:
            out = generate_text(self.model, self.tokens, forks, sampling, generator, keep_logits)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in out.ids]
        return texts, out

    def generate_image(self, sessions: list[Session], size: tuple[int, int] | None = None,
                       cfg: ImageGenConfig | None = None, generator: torch.Generator | None = None,
                       noise: list[torch.Tensor] | None = None, on_step=None, progress: bool = False,
                       return_latents: bool = False):
        """One image per session; size (H, W) defaults to the last input image's size, `cfg` to
        the model's settings for the context (its edit settings when the context holds an image,
        else its text-to-image ones: GenerationDefaults.for_context)."""
        cfg = cfg or self.defaults.for_context(sessions[0].image_size is not None)
        size = size or sessions[0].image_size
        if size is None:
            raise ValueError("no output size given and no input image to take it from")
        grid = latent_grid(self.model.cfg, size)
        latents = generate_latents(self.model, self.tokens, [s.branches() for s in sessions], grid, cfg,
                                   noise=noise, generator=generator, on_step=on_step, progress=progress,
                                   stats=self.cache_stats)
        decoded = decode_latents(self.model, self.vae, latents, grid)
        images = [to_pil(d) for d in decoded]
        return (images, latents, decoded) if return_latents else images

    # High-level tasks ------------------------------------------------------------------------------
    def understand(self, images: list, question: str, sampling: SamplingConfig = SamplingConfig(max_new_tokens=512),
                   think: bool = False) -> str:
        s = self.new_sessions(1)
        if think:
            self.add_text(s, [VLM_THINK_SYSTEM_PROMPT])
        for im in images:
            self.add_image(s, [im], vae=False, vit=True)
        self.add_text(s, [question])
        return self.generate_text(s, sampling)[0][0]

    def text_to_image(self, prompts: list[str], size: tuple[int, int] | None = None, cfg: ImageGenConfig | None = None,
                      seed: int = 0, think: bool = False, think_sampling: SamplingConfig = SamplingConfig(),
                      progress: bool = False, on_step=None) -> tuple[list[Image.Image], list[str]]:
        """Returns the images and, in think mode, the planning texts. `size` (H, W) defaults to
        the model's native size, `cfg` to its text-to-image settings (generation.json, else the
        `text_to_image` preset)."""
        cfg = cfg or self.defaults.text_to_image
        sessions = self.new_sessions(len(prompts))
        if think:
            self.add_text(sessions, [GEN_THINK_SYSTEM_PROMPT] * len(sessions))
        self.add_text(sessions, prompts)
        thoughts = self._think(sessions, think_sampling) if think else []
        g = torch.Generator().manual_seed(seed)
        return (self.generate_image(sessions, size or self.native_size, cfg, generator=g, progress=progress,
                                    on_step=on_step), thoughts)

    def edit(self, images: list, instructions: list[str], cfg: ImageGenConfig | None = None, seed: int = 0,
             think: bool = False, think_sampling: SamplingConfig = SamplingConfig(), progress: bool = False,
             on_step=None):
        """Edit each image by its instruction; `cfg` defaults to the model's edit settings
        (generation.json, else the `edit` preset)."""
        cfg = cfg or self.defaults.edit
        sessions = self.new_sessions(len(images))
        g = torch.Generator().manual_seed(seed)
        if think:
            self.add_text(sessions, [GEN_THINK_SYSTEM_PROMPT] * len(sessions))
        self.add_image(sessions, images, generator=g)
        self.add_text(sessions, instructions)
        thoughts = self._think(sessions, think_sampling) if think else []
        sizes = {s.image_size for s in sessions}
        if len(sizes) > 1:
            raise ValueError(f"batched edits need input images of one size after resizing, got {sorted(sizes)}")
        return self.generate_image(sessions, None, cfg, generator=g, progress=progress, on_step=on_step), thoughts

    def _think(self, sessions, sampling) -> list[str]:
        """Decode the planning text, then add it to the full contexts only (as the release does)."""
        texts, _ = self.generate_text(sessions, sampling)
        ids = [self.encode(t) for t in texts]
        ctxlib.add_text(self.model, self.tokens, [s.full for s in sessions], ids)
        return texts

    def interleave(self, inputs: list, max_blocks: int = 8, size: tuple[int, int] | None = None,
                   cfg: ImageGenConfig | None = None, sampling: SamplingConfig = SamplingConfig(),
                   seed: int = 0, vit_for_outputs: bool = True, progress: bool = False, on_step=None,
                   cfg_after_image: ImageGenConfig | None = None) -> list:
        """Feed text/images, then let the model continue with text and images until it stops
        (at most `max_blocks` outputs). Returns the outputs in order: strings and PIL images.

        Each generated image is added back as a clean VAE block (plus a ViT block when
        `vit_for_outputs`), at the RoPE id its generation used, like interleaved training data.
        Images take `size` (H, W), else the last input image's size, else the model's native size.
        An image drawn while the context holds no image uses `cfg` (default: the model's
        text-to-image settings), one drawn after an image `cfg_after_image` (default: its edit
        settings, whose image guidance keeps a chain going: GenerationDefaults.for_context)."""
        if not inputs:
            raise ValueError("interleave needs at least one input (a prompt or an image)")
        s = self.new_sessions(1)
        g = torch.Generator().manual_seed(seed)
        for item in inputs:
            if isinstance(item, str):
                self.add_text(s, [item])
            else:
                self.add_image(s, [item], generator=g)
        outputs = []
        for _ in range(max_blocks):
            hint = s[0].next_hint
            if hint == self.tokens.start_of_image:
                has_image = s[0].image_size is not None
                sampler = (cfg_after_image if has_image else cfg) or self.defaults.for_context(has_image)
                image = self.generate_image(s, size or s[0].image_size or self.native_size, sampler, generator=g,
                                            progress=progress, on_step=on_step)[0]
                outputs.append(image)
                self.add_image(s, [image], vae=True, vit=vit_for_outputs, generator=g)
            elif hint == self.tokens.bos:
                text = self.generate_text(s, sampling, generator=g)[0][0]
                outputs.append(text)
                self.add_text(s, [text])
            else:
                break
        return outputs


def next_hints(model, hidden: list[torch.Tensor]) -> list[int]:
    """The LM head's prediction at the last position of each block just added: what the model
    wants next (the interleaved-output protocol in the module docstring)."""
    with torch.no_grad():
        return model.llm.lm_head(torch.stack([h[-1] for h in hidden])).argmax(-1).tolist()


def resized(image: Image.Image, spec: ResizeSpec) -> Image.Image:
    """An RGB copy of a PIL image resized by `spec`'s rule (bicubic). Files are opened by the
    caller (bagel.cli.inputs.open_image checks them)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__} (open files with "
                        "bagel.cli.inputs.open_image or PIL.Image.open)")
    image = image.convert("RGB")
    size = resize_size(image.width, image.height, spec)
    return image if size == image.size else image.resize(size, Image.BICUBIC)
