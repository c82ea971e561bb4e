"""The training loop.

One optimiser step:

1. take `grad_accum` micro-batches from the source; encode their VAE images under no_grad (the
   VAE is frozen); every parameter stays in play on every rank through the model's
   `participation` term (zero-length passes through idle paths);
2. all-reduce the CE and MSE token counts of the whole step, so each micro-batch's loss is
   `sum(per-token loss) / global count` (times world size, since FSDP/DDP average gradients):
   every token weighs the same whatever rank or micro-batch it sits in (the official trainer
   normalises per micro-step; with one micro-step the two agree);
3. backward per micro-batch, with gradient reduction only on the last one (`no_sync`);
4. unscale (fp16), global gradient norm; a non-finite loss or norm skips the step (counted; after
   `train.max_bad_steps` in a row the run stops); else clip, AdamW, EMA;
5. log (progress bar, metrics.jsonl, TensorBoard, wandb) and checkpoint every
   `checkpoint.every` steps, on SIGTERM and at the end.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bagel.config import ConfigError
from bagel.model.bagel import Bagel
from bagel.train import checkpointing
from bagel.train.batches import SyntheticSource, TrainItem
from bagel.train.config import TrainConfig
from bagel.train.distributed import DistInfo, all_reduce, init_distributed
from bagel.train.metrics import Throughput, batch_flops, peak_tflops
from bagel.train.optim import EMA, LossScaler, apply_freeze, build_optimizer, clip_, grad_norm, lr_at, no_decay_names, set_lr
from bagel.train.parallelize import DTYPES, autocast, no_sync, parallelize
from bagel.train.vision_encoder import VIT_PREFIX
from bagel.train.weights import export, materialize, model_config, pretrained_source, scratch_source, with_tensors_from


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); checkpoints are intact."""


@dataclass
class RunResult:
    history: list[dict[str, float]]  # one record per optimiser step
    step: int  # steps completed
    stopped_by_signal: bool = False
    checkpoint: Path | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, source_factory=None, dist: DistInfo | None = None):
        """`source_factory(model_cfg, dist)` returns the batch source (an iterable of TrainItem
        with state_dict / load_state_dict); None: the synthetic source (data.kind=synthetic)."""
        self.cfg = cfg
        self.dist = dist or init_distributed()
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        t, p = cfg.train, cfg.parallel
        self.model_cfg = model_config(cfg.model)

        with torch.device("meta"):
            model = Bagel(self.model_cfg)
        self.frozen = apply_freeze(model, t)
        no_decay = no_decay_names(model)
        scratch = scratch_source(self.model_cfg, cfg.model.init_std, t.seed)
        tensors = pretrained_source(cfg.model.path, fallback=scratch) if cfg.model.preset == "pretrained" else scratch
        if cfg.model.vit_path:
            if not self.model_cfg.visual_und:
                raise ConfigError(f"model.vit_path={cfg.model.vit_path} but this model has no ViT (visual_und=False)")
            names = {n for n, _ in model.named_parameters()}
            tensors = with_tensors_from(tensors, cfg.model.vit_path, VIT_PREFIX, names)
        self.model = parallelize(model, p, self.dist, lambda m: materialize(m, tensors, self.device))
        self.model.train()
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim, no_decay)
        self.ema = EMA(self.model, t.ema) if t.ema > 0 else None
        self.scaler = LossScaler(p.loss_scale, p.loss_scale_growth_interval, enabled=p.param_dtype == "fp16")
        self.vae = self._build_vae() if self.model_cfg.visual_gen else None
        self.heads = self._unwrapped().draft_heads if (t.heads_weight > 0 or t.heads_only) else None
        if (t.heads_weight > 0 or t.heads_only) and self.heads is None:
            raise ConfigError("train.heads_weight / heads_only need draft heads: set model.overrides.draft_heads "
                              "(e.g. {kind: medusa, num_heads: 4})")

        self.source = self._build_source(source_factory)
        self.tokens = self.source.tokens
        self.gen = torch.Generator().manual_seed(t.seed * 1000 + self.dist.rank)  # flow / VAE noise
        self.step = 0
        self.counters = {"skipped_steps": 0, "overflow_steps": 0}
        self.consecutive_bad = 0
        self._signal = False

    # Setup ------------------------------------------------------------------------------------
    def _build_vae(self):
        from bagel.model.vae import VAE, load_vae

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

    def _heads_loss(self, out, batch) -> torch.Tensor:
        """Draft-head loss on the LLM's hidden states (detached when only the heads train)."""
        from bagel.train.heads.losses import draft_heads_loss

        hidden = out.hidden.detach() if self.cfg.train.heads_only else out.hidden
        loss, _ = draft_heads_loss(self._unwrapped(), self.heads, batch, hidden, self.cfg.train.heads_decay)
        return loss

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

    def _build_source(self, factory):
        if factory is not None:
            return factory(self.model_cfg, self.dist)
        if self.cfg.data.kind != "synthetic":
            raise ValueError(f"data.kind={self.cfg.data.kind!r} needs a source factory: run through "
                             "bagel-train (bagel.train.cli), which builds the data_pipelines loader")
        return SyntheticSource(self.model_cfg, self.cfg.data, self.dist.rank, self.dist.world_size)

    # Checkpoints ------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        return {"data": self.source.state_dict(), "torch_rng": torch.get_rng_state(),
                "noise_rng": self.gen.get_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def save_checkpoint(self, crash: bool = False) -> Path:
        return checkpointing.save(
            self.run_dir, self.step, self.model, self.optimizer, self.ema.state if self.ema else None,
            {"scaler": self.scaler.state_dict(), "counters": self.counters}, self._rank_state(),
            self.cfg.to_yaml(), self.cfg.checkpoint.keep, self.dist, crash=crash)

    def maybe_resume(self) -> Path | None:
        how = self.cfg.checkpoint.resume
        checkpointing.remove_stale(self.run_dir, self.dist)
        if how == "none":
            return None
        path = checkpointing.latest_checkpoint(self.run_dir) if how == "auto" else Path(how)
        if path is None:
            return None
        state, rank_state = checkpointing.load(path, self.model, self.optimizer,
                                               self.ema.state if self.ema else None, self.dist)
        self.step = int(state["step"])
        self.scaler.load_state_dict(state["scaler"])
        self.counters.update(state["counters"])
        self.source.load_state_dict(rank_state["data"])
        torch.set_rng_state(rank_state["torch_rng"])
        self.gen.set_state(rank_state["noise_rng"])
        if rank_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"], self.device)
        return path

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

    def _loss_terms(self, out, item: TrainItem) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE sum, MSE sum) of one micro-batch (normalised by global counts in train_step)."""
        zero = torch.zeros((), device=self.device)
        ce_sum = mse_sum = zero
        if out.ce is not None:
            ce = out.ce * item.batch.ce_loss_weights.to(out.ce) if self.cfg.train.ce_reweighting else out.ce
            ce_sum = ce.sum()
        if out.mse is not None:
            mse_sum = out.mse.mean(-1).sum()
        return ce_sum, mse_sum

    def train_step(self, items: list[TrainItem]) -> dict[str, float]:
        t, p = self.cfg.train, self.cfg.parallel
        items = [self._prepare(i) for i in items]
        # Global normalisers: one all-reduce of [sum CE weights, MSE tokens] over the whole step.
        counts = torch.zeros(2, dtype=torch.float64)
        for item in items:
            b = item.batch
            if b.num_ce_tokens:
                counts[0] += b.ce_loss_weights.double().sum() if t.ce_reweighting else b.num_ce_tokens
            counts[1] += b.num_mse_tokens
        all_reduce(counts)
        n_ce, n_mse = max(float(counts[0]), 1e-12), max(float(counts[1]), 1.0)
        world = self.dist.world_size
        inject = self.step in t.debug_overflow_steps

        sums = torch.zeros(2, dtype=torch.float64)
        heads_sum = 0.0
        for i, item in enumerate(items):
            with no_sync(self.model, p, i == len(items) - 1):
                with autocast(p, self.device):
                    noise = item.noise.to(self.device) if item.noise is not None else None
                    out = self.model(item.batch, noise=noise, generator=self.gen)
                ce_sum, mse_sum = self._loss_terms(out, item)
                # + out.participation (an exact 0): every parameter in the graph on every rank
                loss = (t.ce_weight * ce_sum / n_ce + t.mse_weight * mse_sum / n_mse) * world + out.participation
                if self.heads is not None:
                    heads_loss = self._heads_loss(out, item.batch)
                    loss = heads_loss if t.heads_only else loss + t.heads_weight * heads_loss
                    heads_sum += float(heads_loss.detach())
                scale = self.scaler.scale * (1e30 if inject else 1.0)  # injected overflow (tests)
                if loss.requires_grad:  # a micro-batch without any loss token adds nothing
                    (loss * scale).backward()
            sums += torch.stack([ce_sum.detach().double().cpu(), mse_sum.detach().double().cpu()])
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
        extra_heads = {"loss_heads": heads_sum / len(items)} if self.heads is not None else {}
        record = {"step": self.step + 1, "loss_ce": loss_ce, "loss_mse": loss_mse, "grad_norm": norm, **extra_heads,
                  "lr": lr, "tokens": float(local[0]), "flops": float(local[1]),
                  "skipped_steps": self.counters["skipped_steps"], "loss_scale": self.scaler.scale,
                  "ce_tokens": n_ce, "mse_tokens": n_mse, "step_ok": float(ok)}
        for reason, count in (items[-1].skipped or {}).items():
            record[f"skipped_samples/{reason}"] = count
        self.step += 1
        if self.consecutive_bad >= t.max_bad_steps:
            raise TrainingError(
                f"{self.consecutive_bad} consecutive steps with a non-finite loss or gradient (last: step "
                f"{self.step}, loss_ce={loss_ce}, loss_mse={loss_mse}, grad_norm={norm}); stopping. The last "
                f"good checkpoint is {checkpointing.latest_checkpoint(self.run_dir)}")
        return record

    # The loop ---------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        self._signal = True

    def run(self) -> RunResult:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            print(f"[bagel-train] resolved config:\n{cfg.to_yaml()}", flush=True)
        resumed = self.maybe_resume()
        if resumed and dist.is_main:
            print(f"[bagel-train] resumed from {resumed} at step {self.step}", flush=True)
        peak, peak_src = peak_tflops(cfg.log.peak_tflops, DTYPES[cfg.parallel.param_dtype], self.device)
        if dist.is_main:
            n_params = sum(q.numel() for q in self.model.parameters())
            print(f"[bagel-train] {n_params / 1e6:.2f}M parameters ({len(self.frozen)} frozen tensors), "
                  f"world size {dist.world_size}, mode {cfg.parallel.mode}, {cfg.parallel.param_dtype}; "
                  f"peak {peak:.3f} TFLOP/s per device ({peak_src})", flush=True)
        logger = RunLogger(self.run_dir, cfg, dist.is_main, start_step=self.step)
        throughput = Throughput(peak, dist.world_size)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        history: list[dict[str, float]] = []
        last_saved = self.step if resumed else -1
        stopped = False
        data = iter(self.source)
        try:
            while self.step < cfg.train.steps:
                items = [next(data) for _ in range(cfg.optim.grad_accum)]
                record = self.train_step(items)
                throughput.add(int(record["tokens"]), record["flops"])
                if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                    record.update(throughput.read())
                    logger.log(record)
                history.append(record)
                crash = self.step == cfg.checkpoint.debug_crash_during_save
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or crash:
                    self.save_checkpoint(crash=crash)
                    last_saved = self.step
                flag = all_reduce(torch.tensor([float(self._signal)]), "max")
                if flag.item() > 0:
                    stopped = True
                    break
            path = None
            if last_saved != self.step:
                path = self.save_checkpoint()
            if stopped:
                if dist.is_main:
                    print(f"[bagel-train] SIGTERM: saved {path or 'step ' + str(self.step)} and stopping", flush=True)
            elif cfg.checkpoint.export:
                overrides = self.ema.state if self.ema else None
                export(self.model, self.model_cfg, self.run_dir / "export", self.run_dir / "export_official",
                       overrides, dist.is_main, vae=self.vae)
        finally:
            logger.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return RunResult(history=history, step=self.step, stopped_by_signal=stopped,
                         checkpoint=checkpointing.latest_checkpoint(self.run_dir))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class RunLogger:
    """Rank 0 only: progress bar, RUN_DIR/metrics.jsonl, TensorBoard, wandb; the PNG at the end."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool, start_step: int = 0):
        self.enabled, self.cfg, self.run_dir = enabled, cfg, run_dir
        self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, dynamic_ncols=True, desc="train")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("[bagel-train] tensorboard is not installed: pip install tensorboard (logging to "
                      "metrics.jsonl only)", flush=True)
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


def train(cfg: TrainConfig, source_factory=None) -> RunResult:
    return Trainer(cfg, source_factory=source_factory).run()
