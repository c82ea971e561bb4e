# CPU setup: the pinned CPU torch wheel goes in first, so nothing pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv test demo lora-demo rl-demo distill-demo spec-bench parity gpu-check clean

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
# (runs/digits/report.md). 537-562 s measured on 2 quiet CPU cores after the install (README, Digits demo).
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

# Guidance and step distillation of the demo model: a 4-step student that draws in one guidance
# branch (runs/digits_distill/), one in the teacher's 19 steps (runs/digits_distill_guidance/), each
# with a report.md of the demo's scores, then scripts/bench/generate.py --digits: the plain sampler,
# the step cache and both students in one run. Needs `make demo`. About 18 minutes on 2 cores.
distill-demo: venv
	$(VENV)/bin/bagel-distill --config configs/distill/digits_fewstep.yaml
	$(VENV)/bin/bagel-distill --config configs/distill/digits_guidance.yaml
	$(PY) scripts/bench/generate.py --digits runs/digits/model --guidance-student runs/digits_distill_guidance/model \
		--fewstep-student runs/digits_distill/model

# Speculative decoding, greedy and sampled, on held-out text and image-conditioned prompts
# (scripts/bench/speculative.py; README, Speculative decoding). Trains what is missing first: a
# text model with Medusa heads, then MTP and EAGLE drafters for it; from `make demo`'s model, the
# describe model and its three drafters; the same text model at BAGEL's 28 layers with its Medusa
# and EAGLE drafters. About 65 minutes on 2 cores from nothing.
BT := $(VENV)/bin/bagel-train
HEADS_DONE = test -f $(1)/export/draft_heads/draft_heads.json
spec-bench: venv
	test -f runs/heads_pydoc_medusa/export/config.json || $(BT) --config configs/train/heads_pydoc_medusa.yaml
	$(call HEADS_DONE,runs/heads_pydoc_mtp) || $(BT) --config configs/train/heads_pydoc_mtp.yaml
	$(call HEADS_DONE,runs/heads_pydoc_eagle) || $(BT) --config configs/train/heads_pydoc_eagle.yaml
	test -f runs/heads_pydoc28_medusa/export/config.json || $(BT) --config configs/train/heads_pydoc28_medusa.yaml
	$(call HEADS_DONE,runs/heads_pydoc28_eagle) || $(BT) --config configs/train/heads_pydoc28_eagle.yaml
	test -f runs/digits/model/config.json || (echo "spec-bench: run make demo first (the describe model starts from it)"; exit 1)
	test -f data/digits_describe/train/describe/manifest.json || \
		$(VENV)/bin/bagel-data digits --out data/digits_describe --size 32 --tasks describe,vqa
	test -f runs/digits_describe/export/config.json || $(BT) --config configs/train/describe_digits.yaml
	$(call HEADS_DONE,runs/describe_eagle) || $(BT) --config configs/train/heads_describe.yaml
	$(call HEADS_DONE,runs/describe_medusa) || $(BT) --config configs/train/heads_describe.yaml \
		--run_dir=runs/describe_medusa '--model.overrides={draft_heads: {kind: medusa, num_heads: 4, image_context: false}}'
	$(call HEADS_DONE,runs/describe_mtp) || $(BT) --config configs/train/heads_describe.yaml \
		--run_dir=runs/describe_mtp '--model.overrides={draft_heads: {kind: mtp, num_heads: 2, image_context: false}}'
	$(PY) scripts/bench/speculative.py \
		--text-model runs/heads_pydoc_medusa/export --text-heads runs/heads_pydoc_medusa/export/draft_heads \
		runs/heads_pydoc_mtp/export/draft_heads runs/heads_pydoc_eagle/export/draft_heads \
		--image-model runs/digits_describe/export --image-heads runs/describe_medusa/export/draft_heads \
		runs/describe_mtp/export/draft_heads runs/describe_eagle/export/draft_heads --eagle-depths 6 8
	$(PY) scripts/bench/speculative.py --text-model runs/heads_pydoc28_medusa/export \
		--text-heads runs/heads_pydoc28_medusa/export/draft_heads runs/heads_pydoc28_eagle/export/draft_heads \
		--eagle-depths 6 --budget 32

parity: venv
	$(VENV)/bin/bagel-parity tests/assets/bagel_official_tiny

# The prepared CUDA check (scripts/gpu_check.py): CUDA-marked tests and a short throughput
# benchmark, one summary table; under 8 minutes on one GPU. It runs with the machine's own python3
# (a GPU machine brings its CUDA torch); without CUDA it says so in one line and exits 0.
gpu-check:
	PYTHONPATH=$(CURDIR) python3 scripts/gpu_check.py --out gpu_check.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
