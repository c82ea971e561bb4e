"""int8 experts (bagel/model/quant.py) against float32, in one run: bytes, step time, output change.

    python scripts/bench/quantize.py [--repeats 3]

On the performance-target geometry (scripts/bench/official_geometry.py: random weights, LLM 256
wide with 4 MoT layers) and, for the matmul alone, on one BAGEL-7B-MoT MLP projection (3584 x
18944, 512 rows): the LLM experts' weight bytes, the text-to-image denoising step (256 px, 2
branches) and the editing step (224 px, 3 branches), with the PSNR of the decoded image against
float32. torchao's modes are measured beside ours when torchao is installed. Accuracy on a
trained model: `bagel-eval --task digits --model runs/digits/model --quantize int8` (README,
"int8 experts").
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from official_geometry import TOKENS, drawing_model, image_inputs, median_time

    from bagel.cli.common import tune_allocator
    from bagel.inference.generate_image import decode_latents, generate_latents
    from bagel.config import QUANT_MODES
    from bagel.model.quant import quantize_experts, quantize_linear

    try:  # torchao's modes when it is installed (optional)
        import torchao  # noqa: F401
        modes = QUANT_MODES
    except ImportError:
        modes = tuple(m for m in QUANT_MODES if not m.startswith("torchao-"))

    tune_allocator()
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # one 7B MLP projection
    x, lin = torch.randn(512, 3584), torch.nn.Linear(3584, 18944, bias=False)
    with torch.no_grad():
        ref = lin(x)
        base = median_time(lambda: lin(x), args.repeats, device)
        print(f"\n{'7B up_proj, 512 rows':<28} {'ms':>8} {'speed-up':>9} {'rel. error':>11}")
        print(f"{'fp32':<28} {1000 * base:>8.1f} {1.0:>8.2f}x {0.0:>11.2e}")
        for mode in modes:
            q = quantize_linear(copy.deepcopy(lin), mode)
            t = median_time(lambda: q(x), args.repeats, device)
            err = float((q(x) - ref).norm() / ref.norm())
            print(f"{mode:<28} {1000 * t:>8.1f} {base / t:>8.2f}x {err:>11.2e}")

    model, vae = drawing_model()
    cfg = model.cfg
    models = {"fp32": model}
    for mode in modes:
        models[mode] = copy.deepcopy(model)
        report = quantize_experts(models[mode], mode)
    print(f"\nLLM experts: {report['layers']} projections, {report['bytes_before'] / 2**20:.1f} MiB fp32 -> "
          f"{report['bytes_after'] / 2**20:.1f} MiB int8 ({report['bytes_before'] / report['bytes_after']:.2f}x smaller)")
    print(f"\n{'step (official geometry)':<28} {'mode':<20} {'s/step':>8} {'speed-up':>9} {'PSNR dB':>8}")
    for name, side, edit in (("text-to-image 256px", 256, False), ("editing 224px", 224, True)):
        ref_t = ref_img = None
        for mode, m in models.items():
            g = torch.Generator().manual_seed(2)
            branches, grid, sampler = image_inputs(m, vae, side, edit, g, device)
            noise = [torch.randn(grid[0] * grid[1], cfg.patch_latent_dim, generator=g)]
            t = median_time(lambda: generate_latents(m, TOKENS, branches, grid, sampler, noise=noise),
                            args.repeats, device) / 10
            img = decode_latents(m, vae, generate_latents(m, TOKENS, branches, grid, sampler, noise=noise), grid)[0]
            img = img.clamp(-1, 1)
            if ref_t is None:
                ref_t, ref_img = t, img
            mse = float(((img - ref_img) / 2).pow(2).mean())
            psnr = "inf" if mse == 0 else f"{10 * np.log10(1 / mse):.1f}"
            print(f"{name:<28} {mode:<20} {t:>8.4f} {ref_t / t:>8.2f}x {psnr:>8}")


if __name__ == "__main__":
    main()
