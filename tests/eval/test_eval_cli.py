"""The runner with an injected predictor on two tasks, then `bagel-eval --score-only` end to end."""

import json
from pathlib import Path

import pytest

from bagel.cli import eval as cli
from eval import runner
from eval.items import Request


class YesPredictor:
    """Stands in for the model: answers "Yes" unless the question mentions a cat."""

    settings = {"kind": "test stub"}

    def __init__(self):
        self.calls = []

    def __call__(self, requests):
        self.calls.append(requests)
        assert all(isinstance(r, Request) and r.images and r.max_new_tokens > 0 for r in requests)
        return ["No, there is no cat." if "cat" in r.question else "Yes" for r in requests]


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_run_two_tasks_then_rescore_from_predictions(tmp_path, synthetic, capsys):
    pred = YesPredictor()
    out = tmp_path / "mme_run"
    m = runner.run("mme", synthetic.write_mme(tmp_path / "MME"), pred, protocol="bagel",
                   batch_size=4, out_dir=str(out), model="stub", progress=False)
    assert [len(b) for b in pred.calls] == [4, 2]  # the two code_reasoning items have no image
    assert m["counts"]["missing"] == 2 and m["counts"]["item_errors"] == 2
    assert m["settings"]["max_new_tokens"] == 20 and m["settings"]["predictor"] == {"kind": "test stub"}
    for key in ("model", "task", "data", "protocol", "prompts", "settings", "seeds", "metrics",
                "wall_time_s", "versions", "counts"):
        assert key in m
    assert len(m["data"]["sha256"]) == 64
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and sum(r["prediction"] is None for r in rows) == 2
    # existence: a (Yes/No right), b (Yes right, "Yes" to "bus?" wrong); artwork both "Yes" -> one right
    assert m["metrics"]["subtasks"]["existence"]["score"] == pytest.approx(75 + 50)

    pope_out = tmp_path / "pope_run"
    p = runner.run("pope", synthetic.write_pope(tmp_path / "pope"), YesPredictor(), out_dir=str(pope_out),
                   progress=False)
    assert p["counts"]["items"] == 6 and p["counts"]["missing"] == 1
    assert p["metrics"]["splits"]["random"]["recall"] == 1.0

    # re-score the saved file: same numbers, and the other protocol from the same file
    score_dir = tmp_path / "rescored"
    rc = cli.main(["--score-only", str(out / "predictions.jsonl"), "--protocol", "bagel",
                   "--out", str(score_dir)])
    assert rc == 0
    again = _manifest(score_dir)
    assert again["metrics"] == m["metrics"] and again["task"] == "mme" and again["mode"] == "score-only"
    assert again["counts"]["missing"] == 2
    printed = capsys.readouterr().out
    assert "perception" in printed and "counts/missing" in printed


def test_score_only_cli_on_hand_written_predictions(tmp_path, synthetic):
    data = synthetic.write_vqa(tmp_path / "vqa")
    preds = tmp_path / "preds.jsonl"
    preds.write_text("\n".join(json.dumps(r) for r in [
        {"id": "70", "answer": "Yes"}, {"id": "71", "answer": ""}, {"id": "999", "answer": "x"},
    ]) + "\n")
    for protocol, expected in (("standard", 0.0), ("bagel", 1 / 3)):
        out = tmp_path / protocol
        rc = cli.main(["--score-only", str(preds), "--task", "vqav2", "--data", data,
                       "--protocol", protocol, "--out", str(out)])
        assert rc == 0
        m = _manifest(out)
        assert m["metrics"]["vqa_accuracy"] == pytest.approx(expected)
        assert m["counts"]["items"] == 3  # "72" is missing and still counts
        assert (m["counts"]["missing"], m["counts"]["empty"], m["counts"]["unknown_ids"]) == (1, 1, 1)
        assert m["protocol"] == protocol and m["data"]["sha256"]
        judged = (out / "judgements.jsonl").read_text().splitlines()
        assert len(judged) == 3


def test_model_path_runs_the_engine_end_to_end(tmp_path, synthetic):
    """A real (tiny, random) BAGEL model through the engine: every item asked, scored, counted."""
    model = Path(__file__).resolve().parents[1] / "assets" / "bagel_official_tiny"
    out = tmp_path / "out"
    rc = cli.main(["--model", str(model), "--task", "mme", "--data", synthetic.write_mme(tmp_path / "MME"),
                   "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    m = _manifest(out)
    assert m["model"] == str(model) and m["counts"]["items"] > 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == m["counts"]["items"]
    answered = [p for p in preds if isinstance(p["prediction"], str)]
    assert len(answered) == m["counts"]["items"] - m["counts"]["missing"] > 0  # missing images stay counted


def test_missing_model_dir_is_a_clear_error(tmp_path, synthetic, capsys):
    rc = cli.main(["--model", str(tmp_path / "none"), "--task", "mme", "--data", synthetic.write_mme(tmp_path / "MME")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_bad_layout_and_bad_rows(tmp_path, capsys):
    assert cli.main(["--score-only", str(tmp_path / "none.jsonl"), "--task", "mme"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prediction": "yes"}) + "\n")
    assert cli.main(["--score-only", str(bad), "--task", "mme"]) == 2  # no gold and no --data
    assert "--data" in capsys.readouterr().err
    assert cli.main(["--score-only", str(bad), "--task", "pope", "--data", str(tmp_path)]) == 2


def test_predictions_that_match_no_item_are_refused_unless_allowed(tmp_path, synthetic, capsys):
    data = synthetic.write_vqa(tmp_path / "vqa")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": "not-an-id", "answer": "yes"}) + "\n")
    args = ["--score-only", str(preds), "--task", "vqav2", "--data", data, "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "none of its 1 ids matches an item" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main([*args, "--allow-missing"]) == 0
    assert _manifest(tmp_path / "o")["metrics"]["vqa_accuracy"] == 0.0
