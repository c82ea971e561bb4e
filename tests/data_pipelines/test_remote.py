"""Shards in object storage: the reader against real servers on 127.0.0.1 (an HTTP server from the
standard library with injected faults, and moto's S3 through s3fs), started by the tests."""

import json
import logging
import sys
import tarfile
from collections import Counter

import pytest

from bagel.config import BagelConfig
from data_pipelines.loader import PackLoader
from data_pipelines.remote import StorageConfig, open_binary, redact
from data_pipelines.shards import DataError, ShardStream, iter_tar, load_manifest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))  # --import-mode=importlib
from servers import FileServer, s3_server, upload_folder  # noqa: E402
from test_shards import write_numbered  # noqa: E402

FAST = StorageConfig(backoff=0.01, max_backoff=0.05, block_size=4096, timeout=10)


def _samples(manifest, **kw):
    stream = ShardStream("t", manifest, seed=0, slot=0, num_slots=1, shuffle_buffer=4, **kw)
    return [(s["__key__"], s["__ref__"], s["0.png"]) for s in stream]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    write_numbered(root / "num", n=40, per_shard=10)
    return root


@pytest.fixture(scope="module")
def local(shards):
    return _samples(load_manifest(shards / "num"))


def test_http_reads_what_local_disk_reads(shards, local):
    with FileServer(shards) as server:
        manifest = load_manifest(f"{server.url}/num", FAST)
        assert manifest.shard_path(0) == f"{server.url}/num/num-000000.tar"
        assert _samples(manifest) == local


def test_http_500s_for_a_while_are_retried(shards, local):
    with FileServer(shards) as server:
        manifest = load_manifest(f"{server.url}/num", FAST)
        server.faults(fail_500=4)
        stats = Counter()
        assert _samples(manifest, stats=stats) == local
        assert not stats and server.httpd.fail_500 == 0


def test_dropped_connections_resume_at_the_right_sample(shards, local):
    # every other GET is cut after 3000 bytes, 12 times: reads go on from the byte where they broke off
    with FileServer(shards) as server:
        manifest = load_manifest(f"{server.url}/num", FAST)
        server.faults(drop_after=3000, drops=12, drop_every=2)
        stats = Counter()
        assert _samples(manifest, stats=stats) == local
        assert not stats and server.httpd.drops == 0


def test_reconnect_continues_mid_object(shards):
    data = (shards / "num" / "num-000000.tar").read_bytes()
    with FileServer(shards) as server:
        server.faults(drop_after=1500, drops=3)
        reader = open_binary(f"{server.url}/num/num-000000.tar", FAST)
        got = reader.read()
        assert got == data and reader.raw.retried == 3 and len(data) > 3 * 4096


def test_exact_resume_over_http(shards):
    with FileServer(shards) as server:
        manifest = load_manifest(f"{server.url}/num", FAST)
        full = [s["__key__"] for s in ShardStream("t", manifest, seed=1, slot=0, num_slots=1, shuffle_buffer=5)]
        first = ShardStream("t", manifest, seed=1, slot=0, num_slots=1, shuffle_buffer=5)
        head = [next(first)["__key__"] for _ in range(13)]
        second = ShardStream("t", manifest, seed=1, slot=0, num_slots=1, shuffle_buffer=5)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + [s["__key__"] for s in second] == full


def test_a_shard_that_stays_unreachable_is_skipped_and_counted(shards, local):
    with FileServer(shards) as server:
        manifest = load_manifest(f"{server.url}/num", FAST)
        manifest.shards[1].path = "gone.tar"  # listed in the manifest, 404 on the server
        stats = Counter()
        got = _samples(manifest, stats=stats)
        assert stats == {"unreadable_shard": 1}
        assert sorted(k for k, *_ in got) == sorted(k for k, *_ in local if not "s0010" <= k <= "s0019")


def test_persistent_500s_give_up_after_the_retries(shards):
    with FileServer(shards) as server:
        server.faults(fail_500=10_000)
        stats = Counter()
        assert list(iter_tar(f"{server.url}/num/num-000000.tar", stats, storage=FAST)) == []
        assert stats == {"unreadable_shard": 1}
        assert server.gets == FAST.retries + 1


def test_truncated_object_keeps_the_samples_before_the_cut(shards, tmp_path):
    data = (shards / "num" / "num-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 600])  # inside a member's data
    with FileServer(tmp_path) as server:
        stats = Counter()
        got = list(iter_tar(f"{server.url}/cut.tar", stats, storage=FAST))
        assert 0 < len(got) < 10 and stats == {"truncated_shard": 1}


def test_manifest_errors_are_one_line(shards):
    with FileServer(shards) as server:
        with pytest.raises(DataError, match=r"^manifest http://127.0.0.1:\d+/missing/manifest.json: "
                                            r"FileNotFoundError"):
            load_manifest(f"{server.url}/missing", FAST)
    with pytest.raises(DataError, match="needs the package gcsfs .pip install 'bagel.gcs.'."):
        load_manifest("gs://bucket/data", FAST)
    with pytest.raises(DataError, match="unreachable|failed 2 times|Cannot connect|ClientConnectorError"):
        load_manifest("http://127.0.0.1:9/data", StorageConfig(retries=1, backoff=0.01, timeout=2))


def test_credentials_never_reach_the_logs(shards, caplog):
    assert redact("https://user:secret@host:8080/a/b.tar?X-Amz-Signature=abc") == "https://host:8080/a/b.tar"
    with FileServer(shards) as server:
        url = server.url.replace("http://", "http://alice:hunter2@") + "/nope.tar?token=s3cr3t"
        stats = Counter()
        with caplog.at_level(logging.INFO):
            assert list(iter_tar(url, stats, storage=FAST)) == []
        assert stats == {"unreadable_shard": 1}
        assert "nope.tar" in caplog.text
        assert "hunter2" not in caplog.text and "s3cr3t" not in caplog.text and "alice" not in caplog.text


def test_file_urls_and_pipe_commands(shards, local):
    manifest = load_manifest(f"file://{shards / 'num'}")
    assert _samples(manifest) == local
    piped = load_manifest(shards / "num")
    for info in piped.shards:
        info.path = f"pipe:cat {shards / 'num' / info.path}"
    assert _samples(piped) == local
    stats = Counter()
    assert list(iter_tar("pipe:exit 3", stats)) == []
    assert stats == {"unreadable_shard": 1}


def test_loader_over_http_equals_local(digits_dir, tokenizer, make_config):
    sources = [{"name": t, "manifest": f"train/{t}", "epochs": 1} for t in ("t2i", "vqa")]
    take = lambda config: [(p.keys, p.batch.sequence_length)  # noqa: E731
                           for p in PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=0)]
    expected = take(make_config(sources, data_root=str(digits_dir)))
    with FileServer(digits_dir) as server:
        remote = make_config(sources, data_root=server.url, storage={"retries": 2, "backoff": 0.01})
        assert take(remote) == expected


@pytest.fixture
def s3(monkeypatch, shards):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import s3fs

    with s3_server(monkeypatch) as endpoint:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("data")
        upload_folder(fs, shards / "num", "data", "sets/num")
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()


def test_s3_reads_what_local_disk_reads(s3, local):
    assert _samples(load_manifest("s3://data/sets/num", FAST)) == local


def test_loader_over_s3_in_worker_processes_equals_local(s3, digits_dir, tokenizer, make_config):
    # s3fs runs its client on an event loop in a thread: worker processes forked from a loader that
    # already listed the bucket must each read through a client of their own
    import s3fs

    upload_folder(s3fs.S3FileSystem(), digits_dir / "train" / "t2i", "data", "digits/train/t2i")
    sources = [{"name": "t2i", "manifest": "train/t2i", "epochs": 1}]
    take = lambda root: [(p.keys, p.batch.sequence_length) for p in PackLoader(  # noqa: E731
        make_config(sources, data_root=root), BagelConfig.tiny(), tokenizer=tokenizer, num_workers=2)]
    expected = take(str(digits_dir))
    assert len(expected) > 1 and take("s3://data/digits") == expected


def test_s3_missing_bucket_and_wrong_credential_are_one_line(s3, monkeypatch):
    import boto3
    import moto.settings
    import s3fs

    with pytest.raises(DataError, match="^manifest s3://nobucket/x/manifest.json: FileNotFoundError"):
        load_manifest("s3://nobucket/x", FAST)
    iam = boto3.client("iam", endpoint_url=s3)
    iam.create_user(UserName="reader")
    policy = iam.create_policy(PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    iam.attach_user_policy(UserName="reader", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # from now on signatures count
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3fs.S3FileSystem.clear_instance_cache()
    assert load_manifest("s3://data/sets/num", FAST).num_samples == 40
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-42")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(DataError, match="PermissionError.*check the backend's credentials") as error:
        load_manifest("s3://data/sets/num", FAST)
    assert "not-the-secret-42" not in str(error.value) and "\n" not in str(error.value)


def test_tar_stream_of_a_pipe_skips_by_reading(shards):
    # a pipe cannot seek: resuming inside a shard reads through the skipped members
    stats = Counter()
    path = shards / "num" / "num-000001.tar"
    got = [(o, k) for o, k, _ in iter_tar(f"pipe:cat {path}", stats, start=7)]
    assert got == [(7, "s0017"), (8, "s0018"), (9, "s0019")] and not stats
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == 20


def test_remote_reads_are_ranged_blocks_not_downloads(shards):
    size = (shards / "num" / "num-000002.tar").stat().st_size
    with FileServer(shards) as server:
        reader = open_binary(f"{server.url}/num/num-000002.tar", FAST)
        assert reader.read(100) and size > 4 * FAST.block_size
        assert len(reader.raw._file.cache.cache) <= 2 * FAST.block_size  # held in memory: <= 2 blocks
        reader.close()
