"""The CUDA paths, against the CPU float32 paths (run by `make gpu-check`; skipped without a GPU).

- flash-attn varlen: packed training attention and cached inference attention vs SDPA in bf16
  (skipped, saying so, where flash-attn is not installed: the SDPA path then runs everywhere);
- the inference engine: text-to-image, editing and understanding on the official fixture model,
  CUDA vs CPU: fp32 (TF32 off) within 1e-3, bf16 within a stated mean difference;
- a bf16 training step with FSDP2 on one GPU (torchrun, one rank) against fp32 on the CPU;
- bagel-parity on CUDA in fp32: every official fixture case passes its tolerance.

Measured figures are printed (pytest -s shows them) for the gpu-check summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run with make gpu-check)")]

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "assets" / "bagel_official_tiny"


def flash_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def report(name: str, value) -> None:
    print(f"GPU-CHECK {json.dumps({'name': name, 'value': value})}")


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# Attention ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not flash_installed(), reason="flash-attn is not installed (no prebuilt wheel): SDPA path only")
def test_flash_packed_attention_matches_sdpa_bf16():
    from bagel.model.attention import AttentionLayout, packed_attention, prepare_attention

    layout = AttentionLayout([150, 120, 57], [20, 64, 30, 12, 24, 40, 30, 50, 20, 20, 1, 16],
                             ["causal", "full", "noise", "causal", "causal", "noise", "causal", "full", "noise",
                              "full", "causal", "causal"])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.length, h, 64, generator=g).cuda().bfloat16() for h in (8, 2, 2))
    flash = packed_attention(q, k, v, prepare_attention(layout, "flash", "cuda"))
    sdpa = packed_attention(q, k, v, prepare_attention(layout, "sdpa_loop", "cuda"))
    diff = float((flash.float() - sdpa.float()).abs().max())
    report("flash packed attention vs SDPA, bf16, max |diff|", diff)
    assert diff < 2e-2


@pytest.mark.skipif(not flash_installed(), reason="flash-attn is not installed (no prebuilt wheel): SDPA path only")
def test_flash_cached_attention_matches_sdpa_bf16():
    from bagel.model.attention import CAUSAL, FULL, cached_attention

    g = torch.Generator().manual_seed(1)
    q_lens, kv_lens, masks = [5, 1, 12, 7], [40, 33, 12, 7], [CAUSAL, FULL, CAUSAL, FULL]
    qs = [torch.randn(n, 8, 64, generator=g).cuda().bfloat16() for n in q_lens]
    ks = [torch.randn(n, 2, 64, generator=g).cuda().bfloat16() for n in kv_lens]
    vs = [torch.randn(n, 2, 64, generator=g).cuda().bfloat16() for n in kv_lens]
    flash = cached_attention(qs, ks, vs, masks, backend="flash")
    sdpa = cached_attention(qs, ks, vs, masks, backend="sdpa")
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(flash, sdpa))
    report("flash cached attention vs SDPA, bf16, max |diff|", diff)
    assert diff < 2e-2


# The engine -------------------------------------------------------------------------------------
def _engine(device: str, dtype=torch.float32):
    from bagel.inference.engine import Engine

    return Engine.from_pretrained(TINY, dtype=dtype, device=device)


def _runs(engine):
    """Text-to-image and edit latents (fixed noise) and a greedy answer on the fixture model."""
    import numpy as np
    from PIL import Image

    from bagel.sampling import ImageGenConfig, SamplingConfig

    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(12, engine.model.cfg.patch_latent_dim, generator=g)]
    src = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    s = engine.new_sessions(1)
    engine.add_text(s, ["A red cube on a table."])
    cfg = ImageGenConfig.preset("text_to_image", num_timesteps=8)
    _, t2i, _ = engine.generate_image(s, (48, 64), cfg, noise=noise, return_latents=True)
    s = engine.new_sessions(1)
    engine.add_image(s, [src], generator=torch.Generator().manual_seed(1))
    engine.add_text(s, ["Make it blue."])
    _, edit, _ = engine.generate_image(s, None, ImageGenConfig.preset("edit", num_timesteps=8), noise=noise,
                                       return_latents=True)
    answer = engine.understand([src], "What is in the picture?", SamplingConfig(max_new_tokens=8))
    return t2i[0].float().cpu(), edit[0].float().cpu(), answer


def test_engine_cuda_matches_cpu():
    cpu = _runs(_engine("cpu"))
    fp32 = _runs(_engine("cuda"))
    bf16 = _runs(_engine("cuda", torch.bfloat16))
    for name, i in (("text-to-image", 0), ("edit", 1)):
        d32 = float((fp32[i] - cpu[i]).abs().max())
        d16 = float((bf16[i] - cpu[i]).abs().mean())
        report(f"engine {name} latents, CUDA fp32 vs CPU fp32, max |diff|", d32)
        report(f"engine {name} latents, CUDA bf16 vs CPU fp32, mean |diff|", d16)
        assert d32 < 1e-3, name
        assert d16 < 5e-2, name  # latents are ~N(0, 1); bf16 keeps ~3 significant digits per step
    report("engine understanding, CUDA fp32 answer equals CPU", fp32[2] == cpu[2])
    report("engine understanding, CUDA bf16 answer equals CPU", bf16[2] == cpu[2])
    assert fp32[2] == cpu[2]


# Training ---------------------------------------------------------------------------------------
def _train(tmp_path: Path, name: str, *extra: str, torchrun: bool = False) -> list[dict]:
    args = ["--config", str(REPO / "configs/train/tiny_cpu.yaml"), f"--run_dir={tmp_path / name}",
            "--train.steps=4", "--data.num_batches=2", "--log.progress=false", "--log.tensorboard=false",
            "--log.plot=false", "--checkpoint.export=false", "--checkpoint.resume=none", "--log.peak_tflops=1",
            *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if torchrun:
        launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [launcher, "--standalone", "--nproc_per_node", "1", "-m", "bagel.cli.train", *args]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the fp32 reference on the CPU
        cmd = [sys.executable, "-m", "bagel.cli.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_bf16_fsdp2_training_step_follows_fp32_cpu(tmp_path):
    cpu = _train(tmp_path, "cpu")
    gpu = _train(tmp_path, "fsdp_bf16", "--parallel.mode=fsdp", "--parallel.param_dtype=bf16", torchrun=True)
    for key in ("loss_ce", "loss_mse"):
        diff = max(abs(a[key] - b[key]) for a, b in zip(cpu, gpu))
        report(f"bf16 FSDP2 training on 1 GPU vs fp32 CPU, {key} max |diff| over 4 steps", diff)
        assert diff < 0.05, key
    assert gpu[-1]["loss_ce"] < gpu[0]["loss_ce"]


# Parity -----------------------------------------------------------------------------------------
def test_parity_on_cuda_fp32():
    from bagel.cli.parity_cases import run_all

    results = run_all(TINY, "cuda")
    failed = [r.line() for r in results if not r.ok]
    worst = max((r.max_abs for r in results if r.tol > 0), default=0.0)
    report("bagel-parity on CUDA fp32: comparisons passed", f"{len(results) - len(failed)}/{len(results)}")
    report("bagel-parity on CUDA fp32: worst max |diff|", worst)
    assert not failed, failed


@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_experts_on_cuda_match_cpu(dynamic):
    """Int8Linear on CUDA (bf16 activations) against the same layer on the CPU in float32."""
    from bagel.model.quant import Int8Linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 1024)
    x = torch.randn(40, 256, generator=g)
    cpu = Int8Linear(lin, dynamic)
    try:
        gpu = Int8Linear(lin, dynamic).cuda().to(torch.bfloat16)
        with torch.no_grad():
            got = gpu(x.cuda().to(torch.bfloat16)).float().cpu()
    except RuntimeError as e:  # torch._int_mm needs compute capability >= 7.5
        pytest.skip(f"int8 matmul not available on this GPU: {str(e).splitlines()[0][:100]}")
    with torch.no_grad():
        want = cpu(x)
    rel = float((got - want).norm() / want.norm())
    print(f"int8{'-dynamic' if dynamic else ''} CUDA bf16 vs CPU fp32: relative difference {rel:.2e}")
    assert rel < 0.02
