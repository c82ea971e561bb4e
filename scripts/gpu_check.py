"""The prepared CUDA check (`make gpu-check`): one script, one summary table, under 8 minutes.

    make gpu-check                      # or: python3 scripts/gpu_check.py [--out gpu_check.md]

1. Reports the machine (torch, CUDA device) and installs what is missing where it can: our
   dependencies from wheels in `.whl/` (a machine without a registry; see README) or from the
   registry, and flash-attn only if a prebuilt wheel installs without compiling; otherwise it
   says so and the SDPA path runs.
2. Runs the CUDA-marked tests (tests/gpu, and flash attention in tests/model): flash-attn varlen
   training and cached attention vs SDPA in bf16, the engine's text-to-image / edit /
   understanding on CUDA vs CPU fp32, a bf16 training step with FSDP2 on one GPU, bagel-parity on
   CUDA in fp32.
3. Times the performance-target geometry scaled up (scripts/bench/official_geometry.py --scale 4,
   bf16): training tokens/s and MFU against the device's bf16 peak, image step times, decoding.
4. Prints one table (and writes it to --out) for the docs.

Without CUDA it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "diffusers", "transformers", "safetensors", "tokenizers", "webdataset", "yaml", "PIL", "tqdm",
          "numpy", "pytest")


def sh(cmd: list[str], timeout: float, env=None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}"


def missing() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def install_dependencies(rows: list) -> None:
    absent = missing()
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if absent and wheels:
        sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, wheels)], 300)
    elif absent:
        names = [{"PIL": "pillow", "yaml": "pyyaml"}.get(m, m) for m in absent]
        sh([sys.executable, "-m", "pip", "install", "-q", *names], 300)
    importlib.invalidate_caches()
    rows.append(("dependencies", "ok" if not missing() else f"missing {missing()} (carry wheels in .whl/)"))
    if importlib.util.find_spec("flash_attn") is None:
        rc, _ = sh([sys.executable, "-m", "pip", "install", "-q", "--only-binary=:all:", "flash-attn"], 180)
        importlib.invalidate_caches()
    have = importlib.util.find_spec("flash_attn") is not None
    rows.append(("flash-attn", "installed" if have else "no prebuilt wheel installs here: the SDPA path runs"))


def run_tests(rows: list, timeout: float) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rc, out = sh([sys.executable, "-m", "pytest", "-m", "cuda", "-s", "-q", "-p", "no:cacheprovider",
                  "tests/gpu", "tests/model/test_attention.py"], timeout, env)
    for line in out.splitlines():
        if line.startswith("GPU-CHECK "):
            r = json.loads(line[len("GPU-CHECK "):])
            value = r["value"]
            rows.append((r["name"], f"{value:.3g}" if isinstance(value, float) else str(value)))
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
    rows.append(("CUDA-marked tests", summary[-1].strip("= ") if summary else f"exit {rc}"))
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    rows.extend(("  " + f.split(" - ")[0], f.split(" - ", 1)[1][:120] if " - " in f else "") for f in failures)


def run_bench(rows: list, timeout: float) -> None:
    import torch

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rc, out = sh([sys.executable, "scripts/bench/official_geometry.py", "--device", "cuda", "--dtype", "bf16",
                  "--scale", "4", "--repeats", "5"], timeout, env)
    if rc:
        rows.append(("throughput benchmark", f"failed (exit {rc}): {out.strip().splitlines()[-1][:160]}"))
        return
    values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+([0-9.eE+-]+)", out, re.M)}
    header = out.splitlines()[0]
    rows.append(("benchmark setup", header))
    peak = 989.0 if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name() else None
    tokens = 2048
    if "train_fwd_bwd_s" in values:
        rows.append(("training fwd+bwd, 2048-token pack, bf16, scale 4",
                     f"{values['train_fwd_bwd_s'] * 1e3:.1f} ms ({tokens / values['train_fwd_bwd_s']:.0f} tok/s)"))
        if peak:
            rows.append(("training MFU (vs 989 TFLOP/s dense bf16)", f"{values['train_tflops'] / peak:.1%}"))
    for key, label in (("t2i_step_s", "text-to-image 256 px, 2 branches, per step"),
                       ("edit_step_s", "edit 224 px, 3 branches, per step"), ("vae_decode_s", "VAE decode 256 px")):
        if key in values:
            rows.append((label, f"{values[key] * 1e3:.2f} ms"))
    if "greedy_tok_per_s" in values:
        rows.append(("greedy decoding after image + question", f"{values['greedy_tok_per_s']:.0f} tok/s"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu-check: skipped: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print(f"gpu-check: skipped: no CUDA device here (torch {torch.__version__})")
        return 0
    t0 = time.time()
    rows = [("device", f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch "
                       f"{torch.__version__}, CUDA {torch.version.cuda}")]
    install_dependencies(rows)
    run_tests(rows, timeout=300)
    if not args.skip_bench:
        run_bench(rows, timeout=150)
    rows.append(("gpu-check wall time", f"{time.time() - t0:.0f} s"))
    width = max(len(k) for k, _ in rows)
    table = ["| check | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
