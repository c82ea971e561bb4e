"""GenEval generation: layout on disk, verbatim metadata, per-image seeds independent of batching,
GenEval's aggregation through a stub scorer, and bad input. Images are 32x32 with 2 timesteps on the
tiny random-weight model, loaded once."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from bagel.cli import eval as cli
from bagel.sampling import ImageGenConfig
from eval import geneval, runner

TINY = Path(__file__).parents[1] / "assets" / "bagel_official_tiny"

# odd spacing, key order, extra keys and unicode: metadata.jsonl must keep the line as written
LINES = [
    '{"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "cow", "count": 1}], '
    '"prompt": "a photo of a bench and a cow"}',
    '{"prompt":"a photo of a café sign",  "tag":"single_object","include":[{"class":"stop sign","count":1}],'
    '"exclude": []}',
]
SMALL = ["--size", "32x32", "--steps", "2", "--samples-per-prompt", "2", "--quiet"]


def write_meta(path, lines=LINES) -> str:
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # trailing blank line is skipped
    return str(path)


@pytest.fixture(scope="module")
def engine():
    return runner.load_engine(str(TINY))


def pngs(root) -> dict:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/samples/*.png"))}


def test_defaults_are_bagels_geneval_settings():
    args = cli.build_parser().parse_args(["--task", "geneval", "--model", "m", "--data", "d.jsonl"])
    s = geneval.settings_from_args(args)
    assert s == geneval.GenSettings()
    assert (s.samples_per_prompt, s.height, s.width) == (4, 1024, 1024)  # the benchmark's protocol
    assert s.image_config() == ImageGenConfig.preset("geneval")  # the one preset, not a copy of it
    args = cli.build_parser().parse_args(["--task", "geneval", "--model", "m", "--data", "d.jsonl", *SMALL,
                                          "--cfg-text", "6", "--cfg-interval", "0.4", "1", "--seed", "9"])
    s = geneval.settings_from_args(args)
    assert (s.height, s.width, s.steps, s.samples_per_prompt, s.cfg_text_scale, s.cfg_interval, s.seed) == \
        (32, 32, 2, 2, 6.0, (0.4, 1.0), 9)


def test_layout_metadata_and_seeds_independent_of_batch_size(tmp_path, engine, monkeypatch):
    data = write_meta(tmp_path / "evaluation_metadata.jsonl")
    settings = geneval.GenSettings(samples_per_prompt=2, height=32, width=32, steps=2, seed=7)
    out1 = tmp_path / "bs1"
    m = geneval.run(data, engine, str(out1), settings, batch_size=1, model="tiny", progress=False)

    # the layout GenEval's evaluate_images.py walks, and our files beside it
    assert sorted(os.listdir(out1)) == ["00000", "00001", "images.jsonl", "manifest.json"]
    for index, line in enumerate(LINES):
        folder = out1 / f"{index:05d}"
        assert sorted(os.listdir(folder)) == ["grid.png", "metadata.jsonl", "samples"]
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png"]
        assert (folder / "metadata.jsonl").read_text(encoding="utf-8") == line + "\n"  # verbatim
        with open(folder / "metadata.jsonl", encoding="utf-8") as f:
            assert json.load(f) == json.loads(line)  # what GenEval's scorer does with it
        with Image.open(folder / "samples" / "0001.png") as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        with Image.open(folder / "grid.png") as im:
            assert im.size == (64, 32)
    rows = [json.loads(x) for x in (out1 / "images.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"], r["seed"]) for r in rows] == [(0, 0, 7), (0, 1, 8), (1, 0, 9), (1, 1, 10)]
    assert rows[2]["tag"] == "single_object" and rows[2]["path"] == "00001/samples/0000.png"

    assert m == json.loads((out1 / "manifest.json").read_text())
    for key in ("model", "task", "data", "settings", "seeds", "counts", "wall_time_s", "versions", "prompts"):
        assert key in m
    assert m["task"] == "geneval" and m["model"] == "tiny" and len(m["data"]["sha256"]) == 64
    st = m["settings"]
    assert (st["size"], st["steps"], st["samples_per_prompt"], st["batch_size"]) == ("32x32", 2, 2, 1)
    assert (st["cfg_text_scale"], st["cfg_img_scale"], st["cfg_renorm_type"], st["timestep_shift"]) == \
        (4.0, 1.0, "global", 3.0)
    assert m["seeds"]["rule"] == "seed + index * samples_per_prompt + sample" and m["seeds"]["last"] == 10
    assert m["counts"]["prompts"] == 2 and m["counts"]["images"] == 4 and m["metrics"] == {}

    # the same run through the CLI with batches of 3 (one batch spans both prompts): same bytes
    monkeypatch.setattr(runner, "load_engine", lambda *a, **k: engine)
    out3 = tmp_path / "bs3"
    assert cli.main(["--task", "geneval", "--model", str(TINY), "--data", data, *SMALL, "--seed", "7",
                     "--batch-size", "3", "--out", str(out3)]) == 0
    one, three = pngs(out1), pngs(out3)
    assert len(one) == 4 and one == three
    assert one["00000/samples/0000.png"] != one["00000/samples/0001.png"]  # the seeds do differ
    assert json.loads((out3 / "manifest.json").read_text())["settings"]["batch_size"] == 3

    # --limit and another batching: image (1, 1) does not depend on what else is generated
    out_lim = tmp_path / "limit"
    geneval.run(data, engine, str(out_lim), replace(settings, grid=False), limit=1, batch_size=2, progress=False)
    assert sorted(os.listdir(out_lim)) == ["00000", "images.jsonl", "manifest.json"]
    assert sorted(os.listdir(out_lim / "00000")) == ["metadata.jsonl", "samples"]  # no grid.png
    assert pngs(out_lim) == {k: v for k, v in one.items() if k.startswith("00000/")}


# ----------------------------------------------------------------------------------------------------
# Scoring: GenEval's aggregation with a stub scorer (no model needed)

# tag "color": prompt 0 -> [right, wrong], prompt 1 -> [wrong, wrong]; tag "count": prompt 2 -> [right, right]
TAGS = ["color", "color", "count"]
VERDICTS = {(0, 0): True, (0, 1): False, (1, 0): False, (1, 1): False, (2, 0): True, (2, 1): True}

STUB_SCORER = '''
import os

def judge(out_dir, rows):
    """GenEval-style rows: filename as a path through out_dir, plus the scorer's own keys."""
    verdicts = {(0, 0): True, (0, 1): False, (1, 0): False, (1, 1): False, (2, 0): True, (2, 1): True}
    out = []
    for index, row in enumerate(rows):
        for sample in range(2):
            path = os.path.join(out_dir, f"{index:05d}", "samples", f"{sample:04d}.png")
            out.append({"filename": path, "correct": verdicts[index, sample], "reason": row["prompt"]})
    return out

def skip_last(out_dir, rows):
    return judge(out_dir, rows)[:-1] + [{"filename": "elsewhere/00099/samples/0000.png", "correct": True}]

def in_order(out_dir, rows):
    return [{"correct": c} for c in [True, False, False, False, True, True]]
'''


def write_images(root) -> str:
    for index, tag in enumerate(TAGS):
        folder = Path(root) / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps({"tag": tag, "include": [], "prompt": f"p{index}"}))
        for sample in range(2):
            Image.new("RGB", (16, 16)).save(folder / "samples" / f"{sample:04d}.png")
    return str(root)


def test_summary_is_genevals_mean_over_tags():
    judged = [{"tag": TAGS[i], "index": i, "correct": c} for (i, _), c in VERDICTS.items()]
    m = geneval.summarize(judged)
    assert m["tags"]["color"] == {"accuracy": 0.25, "correct": 1, "images": 4}
    assert m["tags"]["count"] == {"accuracy": 1.0, "correct": 2, "images": 2}
    assert m["overall"] == pytest.approx((0.25 + 1.0) / 2)  # 0.625, not the image mean 3/6
    assert m["image_accuracy"] == pytest.approx(0.5)
    assert m["prompts_any_correct"] == pytest.approx(2 / 3)


def test_stub_scorer_through_the_cli(tmp_path, monkeypatch):
    images = write_images(tmp_path / "images")
    (tmp_path / "stub_geneval_scorer.py").write_text(STUB_SCORER)
    spec = f"{tmp_path / 'stub_geneval_scorer.py'}:judge"
    out = tmp_path / "scored"
    assert cli.main(["--task", "geneval", "--score-only", images, "--scorer", spec, "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["mode"] == "score-only" and m["scorer"] == spec
    assert m["metrics"]["overall"] == pytest.approx(0.625)
    assert m["metrics"]["tags"]["color"]["accuracy"] == pytest.approx(0.25)
    assert m["counts"] == {"prompts": 3, "images": 6, "judged": 6, "unjudged": 0, "unknown_judgements": 0,
                           "duplicate_judgements": 0}
    rows = [json.loads(x) for x in (out / "judgements.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"], r["correct"]) for r in rows] == [(i, s, c) for (i, s), c in VERDICTS.items()]
    assert rows[0]["reason"] == "p0" and rows[0]["path"] == "00000/samples/0000.png"

    # an image the scorer skipped stays in the denominator as wrong; an unknown filename is counted
    monkeypatch.syspath_prepend(str(tmp_path))
    _, metrics, counts = geneval.score(images, cli.load_scorer("stub_geneval_scorer:skip_last"))
    assert counts["unjudged"] == 1 and counts["unknown_judgements"] == 1
    assert metrics["tags"]["count"]["accuracy"] == pytest.approx(0.5)  # (2, 1) unjudged -> wrong
    assert metrics["overall"] == pytest.approx((0.25 + 0.5) / 2)
    # judgements without filenames are taken in layout order
    _, metrics, _ = geneval.score(images, cli.load_scorer("stub_geneval_scorer:in_order"))
    assert metrics["overall"] == pytest.approx(0.625)


def test_bad_scorer_output_and_specs(tmp_path):
    images = write_images(tmp_path / "images")
    with pytest.raises(ValueError, match="one per image"):
        geneval.score(images, lambda out, rows: [{"correct": True}])
    with pytest.raises(ValueError, match="'correct' must be a bool"):
        geneval.score(images, lambda out, rows: [{"correct": "yes"}] * 6)
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        cli.load_scorer("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        cli.load_scorer("no_such_module_xyz:judge")


# ----------------------------------------------------------------------------------------------------
# Bad input: clear messages, exit status 2, before the model is loaded


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    path = write_meta(tmp_path / "meta.jsonl", [LINES[0], "", '{"tag": "colors", "include": [], "prompt": "x"',
                                               LINES[1]])
    with pytest.raises(geneval.DataLayoutError, match=r"meta\.jsonl:3: not valid JSON"):
        geneval.read(path)
    assert len(geneval.read(path, limit=1)) == 1  # rows past the limit are not read
    rc = cli.main(["--task", "geneval", "--model", "no/such/model", "--data", path, "--out", str(tmp_path / "o")])
    assert rc == 2 and "meta.jsonl:3" in capsys.readouterr().err
    missing = write_meta(tmp_path / "m2.jsonl", ['{"tag": "colors", "prompt": "a red car"}'])
    with pytest.raises(geneval.DataLayoutError, match=r"m2\.jsonl:1: missing key 'include'"):
        geneval.read(missing)


def test_bad_size_missing_model_and_used_out_dir(tmp_path, capsys):
    data = write_meta(tmp_path / "meta.jsonl")
    base = ["--task", "geneval", "--data", data, "--quiet"]
    assert cli.main([*base, "--model", str(TINY), "--size", "40x32", "--out", str(tmp_path / "a")]) == 2
    assert "multiples of 16 px for this model" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(TINY), "--size", "big", "--out", str(tmp_path / "a")]) == 2
    assert "expected WxH" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tmp_path / "nope"), *SMALL, "--out", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    used = tmp_path / "used"
    (used / "00000").mkdir(parents=True)
    assert cli.main([*base, "--model", str(TINY), *SMALL, "--out", str(used)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(TINY), *SMALL, "--scorer", "nomodule_xyz:f",
                     "--out", str(tmp_path / "b")]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
