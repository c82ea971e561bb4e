"""Train BAGEL: a thin wrapper over `bagel-train` (bagel.train.cli).

    python scripts/train.py --config configs/train/tiny_cpu.yaml [--section.key=value ...]
    torchrun --standalone --nproc_per_node 2 scripts/train.py --config configs/train/tiny_cpu.yaml --parallel.mode=fsdp
    torchrun --nnodes M --nproc_per_node N --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --rdzv_id RUN scripts/train.py --config ... --parallel.mode=fsdp
"""

import sys

from bagel.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
