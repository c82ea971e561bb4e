"""The memory plan (bagel/inference/memory_plan.py) and bagel-generate --dry-run."""

from pathlib import Path

import pytest

from bagel.checkpoint.pretrained import from_pretrained, read_model_config
from bagel.cli import generate
from bagel.config import BagelConfig
from bagel.inference.memory_plan import PUBLISHED_BAGEL_7B_MOT_TOTAL, memory_plan

TINY = Path(__file__).resolve().parents[1] / "assets" / "bagel_official_tiny"


def test_the_released_shapes_count_14b():
    plan = memory_plan(BagelConfig.bagel_7b_mot(), (1024, 1024), dtype="bf16")
    assert abs(plan.parameters / PUBLISHED_BAGEL_7B_MOT_TOTAL - 1) < 0.06, plan.parameters
    # "7B active": one expert's path through the LLM is Qwen2.5-7B (7.61B parameters, its model card)
    llm_active = plan.groups["LLM embeddings, lm_head"] + plan.groups["LLM und expert"] + plan.groups["LLM final norms"]
    assert abs(llm_active / 7.61e9 - 1) < 0.01, llm_active
    assert plan.active_parameters == plan.parameters - plan.groups["LLM gen expert"]
    assert plan.groups["LLM und expert"] == plan.groups["LLM gen expert"]
    assert plan.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert plan.latent_tokens() == 64 * 64 and plan.vit_tokens() == 70 * 70
    assert plan.weight_bytes("fp32") == 2 * plan.weight_bytes("bf16")
    assert plan.peak_bytes > plan.weight_bytes()


def test_counts_are_exact_on_a_real_model():
    cfg = read_model_config(TINY)
    model = from_pretrained(TINY)
    assert memory_plan(cfg, (32, 32), dtype="fp32").parameters == sum(t.numel() for t in model.state_dict().values())


def test_dry_run_loads_nothing_and_reports(capsys, monkeypatch):
    monkeypatch.setattr("bagel.checkpoint.pretrained.from_pretrained", None)  # a load would fail loudly
    assert generate.main(["--dry-run", "--model", str(TINY), "--size", "64x48", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "nothing loaded" in out and "parameters:" in out and "KV cache" in out and "peak estimate" in out
    assert "2 x 64x48 with 2 guidance branch(es)" in out


@pytest.mark.parametrize("argv,match", [(["--size", "60x48"], "multiples of 16"), (["--batch", "0"], "--batch"),
                                        ([], None)])
def test_dry_run_checks_and_required_arguments(argv, match, capsys):
    if match is None:  # without --dry-run, --prompt and --out are required
        with pytest.raises(SystemExit) as e:
            generate.main(["--model", str(TINY)])
        assert e.value.code == 2 and "--prompt, --out" in capsys.readouterr().err
        return
    assert generate.main(["--dry-run", "--model", str(TINY), *argv]) == 2
    assert match in capsys.readouterr().err
