"""The training loop.

One optimiser step:

1. take `grad_accum` micro-batches from the source; encode their VAE images under no_grad (the
   VAE is frozen) and noise their latent tokens (`losses.flow_inputs`); every parameter stays in
   play on every rank through the model's `participation` term (zero-length passes through idle
   paths);
2. all-reduce the CE and MSE token counts of the whole step, so each micro-batch's loss is
   `sum(per-token loss) / global count` (times world size, since FSDP/DDP average gradients):
   every token weighs the same whatever rank or micro-batch it sits in (the official trainer
   normalises per micro-step; with one micro-step the two agree);
3. backward per micro-batch, with gradient reduction only on the last one (`no_sync`);
4. unscale (fp16), global gradient norm; a non-finite loss or norm skips the step (counted; after
   `train.max_bad_steps` in a row the run stops); else clip, AdamW, EMA;
5. log (progress bar, metrics.jsonl, TensorBoard, wandb) and checkpoint every
   `checkpoint.every` steps, on SIGTERM and at the end.

The batch source is handed in (the wiring layer, bagel/cli/train.py, builds the data pipeline);
without one, the synthetic source of `data.kind: synthetic` is used.

Determinism: the model's initial weights depend only on parameter names, the flow / VAE noise
comes from the batch (synthetic data) or from a generator whose state is checkpointed, and the
data source is resumable, so a resumed run reproduces the uninterrupted one bit for bit in one
process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bagel.checkpoint.files import write_text
from bagel.checkpoint.sources import pretrained_source, scratch_source, with_adapters, with_tensors_from
from bagel.config import ConfigError, parse_dtype
from bagel.model import lora
from bagel.model.bagel import Bagel
from bagel.sampling import GenerationDefaults
from bagel.train import checkpointing, losses
from bagel.train.batches import SyntheticSource, TrainItem
from bagel.train.config import TRAIN_RESUME_MAY_CHANGE, TrainConfig, resume_changes
from bagel.train.distributed import DistInfo, all_reduce, broadcast_object, init_distributed, on_main
from bagel.train.metrics import Throughput, batch_flops, peak_tflops
from bagel.train.optim import EMA, LossScaler, apply_freeze, build_optimizer, clip_, grad_norm, lr_at, no_decay_names, set_lr
from bagel.train.parallelize import autocast, no_sync, parallelize
from bagel.train.run_dir import RunLock, check_fresh_start
from bagel.train.run_log import RunLogger
from bagel.train.vision_encoder import VIT_PREFIX
from bagel.train.weights import export, materialize, model_config


class DataExhausted(ConfigError):
    """The batch source ended before `train.steps` (its last step is checkpointed)."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); checkpoints are intact."""


@dataclass
class RunResult:
    history: list[dict[str, float]]  # one record per optimiser step
    step: int  # steps completed
    stopped_by_signal: bool = False
    checkpoint: Path | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, source=None, dist: DistInfo | None = None):
        """`source`: the batch source, an iterable of TrainItem with state_dict / load_state_dict,
        built for this rank (bagel/cli/train.py builds the data pipeline's); None: the synthetic
        source (data.kind=synthetic)."""
        self.cfg = cfg
        self.dist = dist or init_distributed()
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        t, p = cfg.train, cfg.parallel
        self.model_cfg = model_config(cfg.model)

        with torch.device("meta"):
            model = Bagel(self.model_cfg)
        self.frozen = apply_freeze(model, t)
        std = cfg.model.init_std
        if cfg.model.preset == "pretrained":
            tensors = pretrained_source(cfg.model.path, self.model_cfg, std, t.seed)
        else:
            shapes = {name: tuple(v.shape) for name, v in model.state_dict().items()}
            tensors = scratch_source(self.model_cfg, std, t.seed, shapes)
        self.lora = cfg.lora.spec()  # adapters instead of full training: the base is frozen
        if self.lora is not None:
            lora.attach(model, self.lora)
            self.frozen = [n for n, q in model.named_parameters() if not q.requires_grad]
            tensors = with_adapters(tensors, t.seed, {n: tuple(v.shape) for n, v in model.state_dict().items()})
        no_decay = no_decay_names(model)
        if cfg.model.vit_path:
            if not self.model_cfg.visual_und:
                raise ConfigError(f"model.vit_path={cfg.model.vit_path} but this model has no ViT (visual_und=False)")
            names = {n for n, _ in model.named_parameters()}
            tensors = with_tensors_from(tensors, cfg.model.vit_path, VIT_PREFIX, names)
        self.model = parallelize(model, p, self.dist, lambda m: materialize(m, tensors, self.device))
        self.model.train()
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim, no_decay, t.heads_lr_mult)
        self.ema = EMA(self.model, t.ema) if t.ema > 0 else None
        self.scaler = LossScaler(p.loss_scale, p.loss_scale_growth_interval, enabled=p.param_dtype == "fp16")
        self.vae = self._build_vae() if self.model_cfg.visual_gen else None
        self.heads = self._unwrapped().draft_heads if (t.heads_weight > 0 or t.heads_only) else None
        if (t.heads_weight > 0 or t.heads_only) and self.heads is None:
            raise ConfigError("train.heads_weight / heads_only need draft heads: set model.overrides.draft_heads "
                              "(e.g. {kind: medusa, num_heads: 4})")

        self.source = source if source is not None else self._synthetic_source()
        self.gen = torch.Generator().manual_seed(t.seed * 1000 + self.dist.rank)  # flow / VAE noise
        self.step = 0
        self.counters = {"skipped_steps": 0, "overflow_steps": 0}
        self.consecutive_bad = 0
        self.last_checkpoint: Path | None = None  # the newest one this run resumed from or wrote
        self._signal = False

    # Setup ------------------------------------------------------------------------------------
    def _build_vae(self):
        from bagel.checkpoint.vae import load_vae
        from bagel.model.vae import VAE

        m = self.cfg.model
        path = m.vae_path
        if path is None and m.path and (Path(m.path) / "ae.safetensors").is_file():
            path = str(Path(m.path) / "ae.safetensors")
        if path is not None:
            self._adopt_vae_scaling(Path(path).with_name("ae_config.json"))
            vae = load_vae(path, self.model_cfg.vae)
        else:  # random frozen VAE (tiny runs); seeded so that every rank builds the same one
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.train.seed)
                vae = VAE(self.model_cfg.vae)
        vae.requires_grad_(False)
        return vae.to(self.device).eval()

    def _unwrapped(self):
        return getattr(self.model, "module", self.model)  # DDP wraps; FSDP2 shards in place

    def _heads_loss(self, out, batch) -> tuple[torch.Tensor, list[float]]:
        """Draft-head loss and per-head accuracy on the LLM's hidden states (detached when only
        the heads train)."""
        hidden = out.hidden.detach() if self.cfg.train.heads_only else out.hidden
        return losses.draft_heads_loss(self._unwrapped(), self.heads, batch, hidden, self.cfg.train.heads_decay)

    def _adopt_vae_scaling(self, config_file: Path) -> None:
        """A first-stage VAE ships its fitted latent scale/shift in ae_config.json: take them (the
        architecture must match the model's), so the run and its exports use the right values."""
        if not config_file.is_file():
            return
        from bagel.config import VAEConfig

        found, ours = VAEConfig.from_json(config_file), self.model_cfg.vae
        arch = lambda c: dataclasses.replace(c, scale_factor=0.0, shift_factor=0.0)  # noqa: E731
        if arch(found) != arch(ours):
            raise ConfigError(f"{config_file}: VAE architecture {found} does not match the model's {ours}")
        self.model_cfg.vae = found

    def _synthetic_source(self) -> SyntheticSource:
        if self.cfg.data.kind != "synthetic":
            raise ConfigError(f"data.kind={self.cfg.data.kind!r} needs its batch source passed in: run it through "
                              "bagel-train (bagel/cli/train.py builds the data pipeline)")
        return SyntheticSource(self.model_cfg, self.cfg.data, self.dist.rank, self.dist.world_size)

    def _record_lora(self) -> None:
        """Print and save (RUN_DIR/lora.json) the resolved adapter selection and its size."""
        total = sum(q.numel() for q in self.model.parameters())
        trainable = sum(q.numel() for q in self.params)
        spec = self.lora
        record = {**dataclasses.asdict(spec), "trainable_parameters": trainable, "total_parameters": total}
        write_text(self.run_dir / "lora.json", json.dumps(record, indent=1) + "\n")
        _say(f"[bagel-train] LoRA rank {spec.rank} on {len(spec.modules)} layers (experts {','.join(spec.experts)}, "
             f"kinds {','.join(spec.kinds)}): {trainable:,} trainable parameters, {trainable / total:.2%} of "
             f"{total:,}; the layers: {self.run_dir / 'lora.json'}")

    # Checkpoints ------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        return {"data": self.source.state_dict(), "torch_rng": torch.get_rng_state(),
                "noise_rng": self.gen.get_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def save_checkpoint(self) -> Path:
        self.last_checkpoint = checkpointing.save(
            self.run_dir, self.step, self.model, self.optimizer, self.ema.state if self.ema else None,
            {"scaler": self.scaler.state_dict(), "counters": self.counters}, self._rank_state(),
            self.cfg.to_yaml(), self.cfg.checkpoint.keep, self.dist, trainable_only=self.lora is not None)
        return self.last_checkpoint

    def start(self) -> Path | None:
        """Before the first step, holding the run directory: clean up a killed save, pick the
        checkpoint to resume from (or check that a fresh start eats no earlier run), restore it;
        returns its path or None. (A checkpoint named by path was restored before the lock.)"""
        cfg, dist = self.cfg, self.dist
        checkpointing.remove_stale(self.run_dir, dist)
        if cfg.checkpoint.resume not in ("auto", "none"):
            return Path(cfg.checkpoint.resume)
        path = None
        if cfg.checkpoint.resume == "auto":
            path = broadcast_object(checkpointing.latest_checkpoint(self.run_dir, log=_say) if dist.is_main else None)
        if path is None:
            on_main(dist, lambda: check_fresh_start(self.run_dir, cfg.checkpoint.overwrite, log=_say))
            return None
        self.restore(path)
        return path

    def restore(self, path: Path) -> None:
        """Model, optimizer, EMA, counters, data position and RNG states from checkpoint `path`,
        after checking that this run keeps the settings it was saved with."""
        changed = resume_changes(Path(path) / "config.yaml", self.cfg, TRAIN_RESUME_MAY_CHANGE)
        if changed and not self.cfg.checkpoint.allow_changes:
            raise ConfigError(f"checkpoint {path} was trained with other settings ({', '.join(changed)}): a "
                              "resumed run keeps its own; --checkpoint.allow_changes=true continues under the new "
                              "ones, or start another --run_dir (nothing is deleted)")
        if changed and self.dist.is_main:
            _say(f"[bagel-train] continuing {path} under changed settings: {', '.join(changed)}")
        state, rank_state = checkpointing.load(path, self.model, self.optimizer,
                                               self.ema.state if self.ema else None, self.dist,
                                               trainable_only=self.lora is not None)
        self.step = int(state["step"])
        self.scaler.load_state_dict(state["scaler"])
        self.counters.update(state["counters"])
        self.source.load_state_dict(rank_state["data"])
        torch.set_rng_state(rank_state["torch_rng"])
        self.gen.set_state(rank_state["noise_rng"])
        if rank_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"], self.device)

    # One step ---------------------------------------------------------------------------------
    def _prepare(self, item: TrainItem) -> TrainItem:
        batch = item.batch.to(self.device)
        if batch.vae_images is not None:
            sample = self.cfg.train.vae_sample
            eps = None
            if sample:  # drawn on the CPU generator (checkpointed), whatever the device
                if item.vae_eps is None:
                    n, _, h, w = batch.vae_images.shape
                    down = self.model_cfg.vae.downsample
                    item.vae_eps = torch.randn(n, self.model_cfg.vae.z_channels, h // down, w // down,
                                               generator=self.gen)
                eps = item.vae_eps.to(self.device)
            with torch.no_grad(), autocast(self.cfg.parallel, self.device):
                batch.vae_latents = self.vae.encode(batch.vae_images, eps=eps, sample=sample).float()
        item.batch = batch
        return item

    def train_step(self, items: list[TrainItem]) -> dict[str, float]:
        t, p = self.cfg.train, self.cfg.parallel
        items = [self._prepare(i) for i in items]
        # Global normalisers: one all-reduce of [CE count, MSE count] over the whole step.
        counts = torch.tensor([losses.token_counts(i.batch, t.ce_reweighting) for i in items],
                              dtype=torch.float64).sum(0)
        all_reduce(counts)
        n_ce, n_mse = max(float(counts[0]), 1e-12), max(float(counts[1]), 1.0)
        sums = torch.zeros(2, dtype=torch.float64)
        heads_sum, heads_acc = 0.0, []
        for i, item in enumerate(items):
            with no_sync(self.model, p, i == len(items) - 1):
                model_cfg = self.model_cfg
                noise = item.noise.to(self.device) if item.noise is not None else None
                noised = losses.flow_inputs(model_cfg, item.batch, noise, generator=self.gen)
                with autocast(p, self.device):
                    out = self.model(item.batch, *((noised.x_t, noised.t) if noised is not None else ()))
                terms = losses.loss_terms(out, item.batch, noised, t.ce_reweighting)
                # * world: FSDP/DDP average gradients over ranks; + participation (an exact 0):
                # every parameter in the graph on every rank
                loss = losses.weighted_loss(terms, t.ce_weight, t.mse_weight, n_ce, n_mse) * self.dist.world_size
                loss = loss + out.participation
                if self.heads is not None:
                    heads_loss, heads_acc = self._heads_loss(out, item.batch)
                    loss = heads_loss if t.heads_only else loss + t.heads_weight * heads_loss
                    heads_sum += float(heads_loss.detach())
                if loss.requires_grad:  # a micro-batch without any loss token adds nothing
                    (loss * self.scaler.scale).backward()
            sums += torch.stack([terms.ce_sum.detach().double().cpu(), terms.mse_sum.detach().double().cpu()])
        all_reduce(sums)
        loss_ce, loss_mse = float(sums[0]) / n_ce, float(sums[1]) / n_mse

        self.scaler.unscale_(self.params)
        norm = float(grad_norm(self.params))
        ok = math.isfinite(norm) and math.isfinite(loss_ce) and math.isfinite(loss_mse)
        lr = lr_at(self.step, self.cfg.optim, t.steps)
        if ok:
            set_lr(self.optimizer, lr)
            clip_(self.params, self.cfg.optim.max_grad_norm, torch.tensor(norm))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            self.consecutive_bad = 0
        else:
            self.counters["skipped_steps"] += 1
            if self.scaler.enabled:
                self.counters["overflow_steps"] += 1
            self.consecutive_bad += 1
        self.scaler.update(overflow=not ok)
        self.optimizer.zero_grad(set_to_none=True)

        local = torch.tensor([sum(i.batch.sequence_length for i in items),
                              sum(batch_flops(self.model_cfg, i.batch) for i in items)], dtype=torch.float64)
        all_reduce(local)
        extra_heads = {}
        if self.heads is not None:
            extra_heads = {"loss_heads": heads_sum / len(items),
                           **{f"heads_acc/{k}": a for k, a in enumerate(heads_acc) if math.isfinite(a)}}
        record = {"step": self.step + 1, "loss_ce": loss_ce, "loss_mse": loss_mse, "grad_norm": norm, **extra_heads,
                  "lr": lr, "tokens": float(local[0]), "flops": float(local[1]),
                  "skipped_steps": self.counters["skipped_steps"], "loss_scale": self.scaler.scale,
                  "ce_tokens": n_ce, "mse_tokens": n_mse, "step_ok": float(ok)}
        for reason, count in (items[-1].skipped or {}).items():
            record[f"skipped_samples/{reason}"] = count
        self.step += 1
        if self.consecutive_bad and self.consecutive_bad >= t.max_bad_steps:
            good = self.last_checkpoint or "none (no checkpoint was written before the first bad step)"
            raise TrainingError(
                f"{self.consecutive_bad} consecutive steps with a non-finite loss or gradient (last: step "
                f"{self.step}, loss_ce={loss_ce}, loss_mse={loss_mse}, grad_norm={norm}); stopping. The last "
                f"checkpoint written before the first bad step is {good}")
        return record

    # The loop ---------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        self._signal = True

    def run(self) -> RunResult:
        """Train to `train.steps` holding the run directory's lock (rank 0) throughout."""
        if self.cfg.checkpoint.resume not in ("auto", "none"):
            # a checkpoint named by path is read (and checked) before anything is written
            self.restore(Path(self.cfg.checkpoint.resume))
        lock = RunLock(self.run_dir, log=_say) if self.dist.is_main else None
        on_main(self.dist, lambda: lock.acquire())
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> RunResult:
        cfg, dist = self.cfg, self.dist
        resumed = self.start()
        self.last_checkpoint = resumed
        if dist.is_main:
            write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            _say(f"[bagel-train] resolved config: {self.run_dir / 'config.yaml'}")
            if self.lora is not None:
                self._record_lora()
            if resumed:
                _say(f"[bagel-train] resumed from {resumed} at step {self.step}")
        peak, peak_src = peak_tflops(cfg.log.peak_tflops, parse_dtype(cfg.parallel.param_dtype), self.device)
        if dist.is_main:
            n_params = sum(q.numel() for q in self.model.parameters())
            _say(f"[bagel-train] {n_params / 1e6:.2f}M parameters ({len(self.frozen)} frozen tensors), "
                 f"world size {dist.world_size}, mode {cfg.parallel.mode}, {cfg.parallel.param_dtype}; "
                 f"peak {peak:.3f} TFLOP/s per device ({peak_src})")
        logger = RunLogger(self.run_dir, cfg, dist.is_main, start_step=self.step)
        throughput = Throughput(peak, dist.world_size)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        history: list[dict[str, float]] = []
        last_saved = self.step if resumed else -1
        stopped = exhausted = False
        first_step = self.step
        data = iter(self.source)
        try:
            while self.step < cfg.train.steps:
                try:
                    items = [next(data) for _ in range(cfg.optim.grad_accum)]
                except StopIteration:
                    exhausted = True
                    break
                record = self.train_step(items)
                throughput.add(int(record["tokens"]), record["flops"])
                if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                    record.update(throughput.read())
                    logger.log(record)
                history.append(record)
                # no checkpoint while steps are failing: it would carry the bad run on
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not self.consecutive_bad:
                    self.save_checkpoint()
                    last_saved = self.step
                flag = all_reduce(torch.tensor([float(self._signal)]), "max")
                if flag.item() > 0:
                    stopped = True
                    break
            path = None
            if last_saved != self.step and self.step > first_step and not self.consecutive_bad:
                path = self.save_checkpoint()
            if exhausted:
                raise DataExhausted(f"the data ran out at step {self.step} of train.steps={cfg.train.steps} (checkpoint "
                                    f"{path or self.last_checkpoint}): give the data more epochs (or resampled "
                                    "sources) or train fewer steps, then --resume auto")
            if stopped:
                if dist.is_main:
                    _say(f"[bagel-train] SIGTERM: saved {path or self.last_checkpoint} and stopping")
            elif cfg.checkpoint.export:
                overrides = self.ema.state if self.ema else None
                export(self.model, self.model_cfg, self.run_dir / "export", self.run_dir / "export_official",
                       overrides, dist.is_main, vae=self.vae,
                       generation=GenerationDefaults.from_overrides(cfg.generation, "generation"),
                       lora_spec=self.lora, adapter_dir=self.run_dir / "export_adapter", base=cfg.model.path)
        finally:
            logger.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return RunResult(history=history, step=self.step, stopped_by_signal=stopped, checkpoint=self.last_checkpoint)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _say(message: str) -> None:
    print(message, flush=True)


def train(cfg: TrainConfig, source=None) -> RunResult:
    return Trainer(cfg, source=source).run()
