# CPU setup: the pinned CPU torch wheel goes in first, so nothing pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv test demo lora-demo rl-demo parity gpu-check clean

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev,app,train]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The embedded default: data, tokenizer, first-stage VAE and ViT, unified pretraining, evaluation, report
# (runs/digits/report.md). 9-11 minutes on 2 CPU cores after the install (README, Digits demo).
demo: venv
	$(PY) scripts/digits_demo.py

# LoRA on the demo model: a new edit (gen expert) and a new question (und expert), with the
# forgetting, trainable share, time and memory of each (runs/digits_lora/report.md). Needs `make demo`.
lora-demo: venv
	$(PY) scripts/lora_demo.py

# RL fine-tuning (GRPO) of the demo model's editing and counting with the digits judge as the reward:
# runs/digits_rl/{model/, report.md, reward.png}. Needs `make demo`.
rl-demo: venv
	$(VENV)/bin/bagel-rl --config configs/rl/digits.yaml

parity: venv
	$(VENV)/bin/bagel-parity tests/assets/bagel_official_tiny

# The prepared CUDA check (scripts/gpu_check.py): CUDA-marked tests and a short throughput
# benchmark, one summary table; under 8 minutes on one GPU. It runs with the machine's own python3
# (a GPU machine brings its CUDA torch); without CUDA it says so in one line and exits 0.
gpu-check:
	PYTHONPATH=$(CURDIR) python3 scripts/gpu_check.py --out gpu_check.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
