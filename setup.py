import re
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="bagel",
    version=re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "bagel" / "__init__.py").read_text()).group(1),
    description="BAGEL-style unified multimodal models: packed Mixture-of-Transformers, flow matching, official-checkpoint parity",
    packages=find_packages(include=["bagel", "bagel.*", "data_pipelines", "data_pipelines.*", "eval", "eval.*"]),
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=[
        # 2.13.0 is the CPU wheel the CI installs first; the range keeps newer torch usable.
        "torch>=2.5,<3",
        "transformers>=4.49",
        "diffusers>=0.30",
        "safetensors>=0.4",
        "webdataset>=0.2.90",
        "fsspec>=2023.1",  # shards and manifests by URL (data_pipelines/remote.py)
        "aiohttp",  # fsspec's http(s):// backend
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tokenizers",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "data": ["pyarrow"],  # parquet converters
        # s3:// and gs:// shards. The floor keeps fsspec's calendar releases: unbounded, pip backtracked
        # to s3fs 0.4 (2020) beside moto's botocore, so the tests ran a client users never get.
        "s3": ["s3fs>=2024.6"],
        "gcs": ["gcsfs>=2024.6"],
        "dev": ["pytest>=7", "scikit-learn", "pyarrow", "selenium>=4.11", "s3fs>=2024.6", "moto[server]"],
        "app": ["gradio>=6,<7"],
        "train": ["tensorboard", "matplotlib", "peft>=0.17"],  # logging, loss plots, LoRA adapters
    },
    entry_points={
        "console_scripts": [
            "bagel-parity=bagel.cli.parity:main",
            "bagel-data=bagel.cli.data:main",
            "bagel-eval=bagel.cli.eval:main",
            "bagel-generate=bagel.cli.generate:main",
            "bagel-chat=bagel.cli.chat:main",
            "bagel-train=bagel.cli.train:main",
            "bagel-app=bagel.cli.app:main",
            "bagel-lora=bagel.cli.lora:main",
            "bagel-rl=bagel.cli.rl:main",
            "bagel-distill=bagel.cli.distill:main",
        ]
    },
)
