"""2 ranks (torchrun, gloo) against one process with the same global batch; resume with 2 ranks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bagel.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, single_process_run):
    out = tmp_path_factory.mktemp("dist")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(REPO / "tests/train/dist_worker.py"), str(out),
           str(single_process_run[1])]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    runs["dir"] = out
    return runs


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """(history, run directory) of the one-process reference; it checkpoints at step 3."""
    from bagel.train.config import load_config

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import FAST, RECIPE
    from dist_worker import COMMON

    out = tmp_path_factory.mktemp("single")
    cfg = load_config(RECIPE, [f"--run_dir={out}", *FAST, *COMMON, "--checkpoint.every=3"])
    return Trainer(cfg).run().history, out


@pytest.fixture(scope="module")
def single_process(single_process_run):
    return single_process_run[0]


@pytest.fixture(scope="module")
def single_process_lora(tmp_path_factory):
    from bagel.train.config import load_config

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import FAST, RECIPE
    from dist_worker import COMMON, LORA

    out = tmp_path_factory.mktemp("single_lora")
    return Trainer(load_config(RECIPE, [f"--run_dir={out}", *FAST, *COMMON, *LORA])).run().history


@pytest.mark.parametrize("mode", ["fsdp_lora", "ddp_lora"])
def test_lora_two_ranks_match_one_process(two_rank_runs, single_process_lora, mode):
    _assert_matches(two_rank_runs[mode], single_process_lora, mode)
    assert single_process_lora[-1]["grad_norm"] > 0  # adapters did train


def _max_diff(a, b, key):
    assert len(a) == len(b)
    return max(abs(x[key] - y[key]) for x, y in zip(a, b))


def _assert_matches(runs, reference, mode: str, tol: float = 1e-4) -> None:
    """Loss and gradient norm of every step within `tol` of the one-process reference."""
    for key in ("loss_ce", "loss_mse", "grad_norm"):
        diff = _max_diff(runs, reference, key)
        print(f"{mode} {key}: max |diff| vs one process = {diff:.2e}")
        assert diff < tol, key


# fp32 on both sides: only the summation order of the gradient reduction differs. Measured:
# max |diff| ~1e-6 over 6 steps; tolerance 1e-4.
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_match_one_process(two_rank_runs, single_process, mode):
    _assert_matches(two_rank_runs[mode], single_process, mode)
    assert [r["tokens"] for r in two_rank_runs[mode]] == [r["tokens"] for r in single_process]


def test_ranks_missing_a_modality_still_match(two_rank_runs, tmp_path):
    from bagel.train.config import load_config

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import FAST, RECIPE
    from dist_worker import COMMON

    cfg = load_config(RECIPE, [f"--run_dir={tmp_path}", *FAST, *COMMON, "--data.samples_per_batch=2",
                               "--train.steps=3"])
    single = Trainer(cfg).run().history
    for key in ("loss_ce", "loss_mse", "grad_norm"):
        assert _max_diff(two_rank_runs["fsdp_sparse"], single, key) < 1e-4, key
    assert [r["tokens"] for r in two_rank_runs["fsdp_sparse"]] == [r["tokens"] for r in single]


def test_exact_resume_with_two_ranks(two_rank_runs):
    full, resumed = two_rank_runs["fsdp"], two_rank_runs["fsdp_resumed"]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for key in ("loss_ce", "loss_mse", "grad_norm"):
        diff = _max_diff(full[3:], resumed, key)
        print(f"2-rank resume {key}: max |diff| = {diff:.2e}")
        assert diff <= 1e-6, key


def test_elastic_resume_one_rank_to_two(two_rank_runs, single_process):
    # the one-process step-3 checkpoint continued on 2 FSDP ranks (DCP reshards the weights and
    # the optimizer, the data position carries over): steps 4-6 as in the uninterrupted run
    resumed = two_rank_runs["elastic_1to2"]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    _assert_matches(resumed, single_process[3:], "1 -> 2 ranks")


def test_elastic_resume_two_ranks_to_one(two_rank_runs, tmp_path):
    from bagel.train.config import load_config

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import FAST, RECIPE
    from dist_worker import COMMON

    src = two_rank_runs["dir"] / "fsdp" / "checkpoints" / "step_00000003"
    shutil.copytree(src, tmp_path / "checkpoints" / src.name)
    cfg = load_config(RECIPE, [f"--run_dir={tmp_path}", *FAST, *COMMON, "--checkpoint.resume=auto"])
    resumed = Trainer(cfg).run().history
    assert [r["step"] for r in resumed] == [4, 5, 6]
    _assert_matches(resumed, two_rank_runs["fsdp"][3:], "2 -> 1 rank")


def test_fsdp_bf16_with_activation_checkpointing(two_rank_runs, single_process):
    # bf16 compute over fp32 shards vs the fp32 single-process curve: tolerance 0.02 absolute.
    bf16 = two_rank_runs["fsdp_bf16"]
    for key in ("loss_ce", "loss_mse"):
        diff = _max_diff(bf16, single_process[:3], key)
        print(f"fsdp bf16 {key}: max |diff| vs fp32 one process = {diff:.2e}")
        assert diff < 0.02, key


def test_a_dead_rank_is_named_in_one_line_by_the_survivor(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--config", str(REPO / "configs/train/tiny_cpu.yaml"), f"--run_dir={tmp_path / 'run'}",
            "--parallel.mode=ddp", "--train.steps=6", "--log.progress=false", "--log.tensorboard=false",
            "--log.plot=false", "--log.peak_tflops=0.1", "--data.samples_per_batch=2", "--checkpoint.export=false"]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests/train/die_at_step.py"), *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert procs[1].returncode == 3
    err = outs[0][1]
    assert procs[0].returncode == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("bagel-train")]
    assert len(lines) == 1 and f"rank 0: rank 1 (pid {procs[1].pid}) died" in lines[0], err
