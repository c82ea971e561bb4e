"""`bagel-data convert` in parallel parts with resume after a kill, inputs by URL, and
`bagel-data inspect` verifying a dataset shard by shard."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bagel.cli.data import main
from data_pipelines.converters.parallel import PARTS_DIR, ConvertJob, convert_dataset, run_part
from data_pipelines.shards import ShardStream, load_manifest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib
from servers import FileServer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), (i % 256, (7 * i) % 256, 40)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """A folder-format input: 700 captioned images (3 line blocks), two bad records."""
    root = tmp_path_factory.mktemp("captions")
    (root / "img").mkdir()
    lines = []
    for i in range(700):
        (root / "img" / f"{i}.png").write_bytes(_png(i))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"picture number {i}"}))
    lines[5] = "{broken"
    lines[400] = json.dumps({"image": "missing.png", "caption": "x"})
    (root / "caps.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _dataset(out):
    """{key: (document JSON, image bytes)} of a converted dataset."""
    stream = ShardStream("x", load_manifest(out), seed=0, slot=0, num_slots=1, shuffle_buffer=1)
    return {s["__key__"]: (s["json"], s["0.png"]) for s in stream}


def _convert(captions, out, *extra):
    return main(["convert", "folder", str(captions / "caps.jsonl"), "--images", str(captions / "img"),
                 "--out", str(out), "--max-samples", "100", *extra])


@pytest.fixture(scope="module")
def serial(captions, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "d"
    assert _convert(captions, out) == 0
    return _dataset(out)


def test_parallel_parts_convert_the_same_samples(captions, serial, tmp_path, capsys):
    assert len(serial) == 698
    assert _convert(captions, tmp_path / "d", "--workers", "2", "--parts", "4") == 0
    assert "skipped {'bad_image': 1, 'bad_jsonl_line': 1}" in capsys.readouterr().out
    assert _dataset(tmp_path / "d") == serial
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names[-1] == "manifest.json" and all(n.startswith("d-p00") for n in names[:-1])
    assert not (tmp_path / "d" / PARTS_DIR).exists()


def test_resume_keeps_finished_parts_and_redoes_the_rest(captions, serial, tmp_path):
    job = ConvertJob("folder", str(captions / "caps.jsonl"), str(tmp_path / "d"), "d",
                     images=str(captions / "img"), max_samples=100, parts=4)
    # a run killed after finishing parts 0 and 2, in the middle of part 1
    (tmp_path / "d" / PARTS_DIR).mkdir(parents=True)
    from data_pipelines.converters.parallel import _check_plan

    _check_plan(job, tmp_path / "d" / PARTS_DIR)
    kept = {k: run_part(job, k) for k in (0, 2)}
    stamps = {s["path"]: (tmp_path / "d" / s["path"]).stat().st_mtime_ns for k in kept for s in kept[k]["shards"]}
    (tmp_path / "d" / "d-p001-000000.tar").write_bytes(b"half of a part")
    (tmp_path / "d" / "d-p001-000001.tar.tmp").write_bytes(b"half of a shard")
    result = convert_dataset(job, workers=2, progress=False)
    assert result.resumed_parts == 2
    assert _dataset(tmp_path / "d") == serial
    assert all((tmp_path / "d" / p).stat().st_mtime_ns == t for p, t in stamps.items())  # not rewritten
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_a_killed_conversion_resumes(captions, serial, tmp_path):
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "bagel.cli.data", "convert", "folder", str(captions / "caps.jsonl"),
           "--images", str(captions / "img"), "--out", str(out), "--max-samples", "100", "--parts", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((out / PARTS_DIR).glob("p0*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / PARTS_DIR).glob("p0*.json")))
    if (out / "manifest.json").exists():
        pytest.skip("the conversion finished before the kill (machine too fast for this input)")
    assert 1 <= finished < 6
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {finished} of 6 parts were finished" in resumed.stdout
    assert _dataset(out) == serial


def test_resume_with_other_settings_is_refused(captions, tmp_path, capsys):
    job = ConvertJob("folder", str(captions / "caps.jsonl"), str(tmp_path / "d"), "d",
                     images=str(captions / "img"), max_samples=100, parts=2)
    from data_pipelines.converters.parallel import _check_plan

    (tmp_path / "d" / PARTS_DIR).mkdir(parents=True)
    _check_plan(job, tmp_path / "d" / PARTS_DIR)
    assert _convert(captions, tmp_path / "d", "--max-samples", "50") == 2
    err = capsys.readouterr().err
    assert "holds an unfinished conversion with max_samples=100, not 50" in err
    assert (tmp_path / "d" / PARTS_DIR / "plan.json").is_file()  # nothing of the earlier run deleted
    assert _convert(captions, tmp_path / "e") == 0
    assert _convert(captions, tmp_path / "e") == 2
    assert "already holds a converted dataset" in capsys.readouterr().err


def test_inputs_by_url(captions, serial, tmp_path):
    with FileServer(captions) as server:
        rc = main(["convert", "folder", f"{server.url}/caps.jsonl", "--images", f"{server.url}/img",
                   "--out", str(tmp_path / "d"), "--max-samples", "100", "--workers", "2", "--parts", "2"])
        assert rc == 0
    assert _dataset(tmp_path / "d") == serial


def test_inspect_verifies_every_shard(captions, tmp_path, capsys):
    assert _convert(captions, tmp_path / "d") == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "d"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "698 of 698 samples read; 0 of 7 shards with problems" in out
    with FileServer(tmp_path) as server:  # the same over HTTP
        assert main(["inspect", f"{server.url}/d"]) == 0
    capsys.readouterr()
    # damage: shard 1 truncated inside a member, one image of shard 3 replaced by junk of equal size
    shard1 = tmp_path / "d" / "d-000001.tar"
    data = shard1.read_bytes()
    shard1.write_bytes(data[: len(data) // 2 + 700])
    shard3 = tmp_path / "d" / "d-000003.tar"
    data = bytearray(shard3.read_bytes())
    at = data.index(b"\x89PNG")
    data[at:at + 16] = b"J" * 16
    shard3.write_bytes(bytes(data))
    assert main(["inspect", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert "d-000001.tar: " in out and "count_mismatch x1" in out and "truncated_shard x1" in out
    assert "d-000003.tar: 100/100 samples" in out and "bad_image x1" in out
    assert "2 of 7 shards with problems" in out


def test_inspect_summary_only(captions, tmp_path, capsys):
    assert _convert(captions, tmp_path / "d") == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "d"), "--summary"]) == 0
    out = capsys.readouterr().out
    assert '"num_samples": 698' in out and "shards with problems" not in out
