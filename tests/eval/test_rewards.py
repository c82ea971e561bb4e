"""Reward plug-ins: the digits judge reward, an external scorer process, output validation."""

import sys
import textwrap

import numpy as np
import pytest
import torch

from eval.rewards import DigitsReward, RewardError, SubprocessReward, load_reward, validate_scores

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def real_digits():
    from data_pipelines.digits import digit_image
    from eval.digits import load_split

    images, labels = load_split("test")
    return [digit_image(im, 32) for im in images[:40]], labels[:40]


def test_digits_reward_prefers_the_right_digit(real_digits):
    images, labels = real_digits
    reward = DigitsReward()
    right = reward(images, [""] * len(images), [{"digit": int(d)} for d in labels])
    wrong = reward(images, [""] * len(images), [{"digit": int((d + 1) % 10)} for d in labels])
    assert right.shape == (40,) and np.all((0 <= right) & (right <= 1))
    assert right.mean() > 0.5 and (right > wrong).mean() > 0.9
    correct = DigitsReward(mode="correct")(images, [""] * 40, [{"digit": int(d)} for d in labels])
    assert set(np.unique(correct)) <= {0.0, 1.0} and correct.mean() > 0.9
    with pytest.raises(RewardError, match="has no 'digit'"):
        reward(images[:2], ["", ""], [{"digit": 1}, {}])


def test_external_scorer_in_another_process(tmp_path, real_digits):
    script = tmp_path / "scorer.py"
    script.write_text(textwrap.dedent("""
        import base64, io, json, sys
        from PIL import Image
        for line in sys.stdin:
            req = json.loads(line)
            sizes = [Image.open(io.BytesIO(base64.b64decode(s))).size[0] for s in req["images"]]
            print(json.dumps({"scores": [w + len(p) for w, p in zip(sizes, req["prompts"])]}), flush=True)
    """))
    reward = load_reward(f"subprocess:{sys.executable} {script}")
    images = real_digits[0][:3]
    assert reward(images, ["a", "bb", ""], [{}] * 3) == [33, 34, 32]
    assert reward(images[:1], ["x"], [{}]) == [33]  # the process is kept between batches
    reward.close()
    broken = SubprocessReward(f"{sys.executable} -c 'print(1)'")
    with pytest.raises(RewardError, match="expected a JSON line with 'scores'"):
        broken(images[:1], ["x"], [{}])


def test_named_rewards_and_bad_names():
    assert load_reward("numpy:mean") is np.mean
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        load_reward("nope")
    with pytest.raises(RewardError, match="cannot be loaded"):
        load_reward("no_such_module_x:f")
    with pytest.raises(RewardError, match="cannot start"):
        load_reward("subprocess:/no/such/program")


def test_scores_are_validated():
    scores, ok = validate_scores([1.0, float("nan"), 2.0, float("inf")], 4)
    assert scores.dtype == torch.float64 and ok.tolist() == [True, False, True, False]
    with pytest.raises(RewardError, match=r"shape \(3,\), expected \(4,\)"):
        validate_scores([1, 2, 3], 4, "reward")
    with pytest.raises(RewardError, match=r"shape \(2, 2\)"):
        validate_scores([[1, 2], [3, 4]], 4)
    with pytest.raises(RewardError, match="not numbers"):
        validate_scores(["a", "b"], 2)
