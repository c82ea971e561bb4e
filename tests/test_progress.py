"""Progress output: a bar on a terminal, plain lines in a log file, nothing when quiet."""

from __future__ import annotations

import io

import pytest

from bagel import progress


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv("BAGEL_PROGRESS", raising=False)
    monkeypatch.delenv("BAGEL_PROGRESS_EVERY", raising=False)
    progress.set_mode("auto")
    yield
    progress.set_mode("auto")


def test_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert progress.current_mode() == "lines"
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert progress.current_mode() == "bar"
    monkeypatch.setenv("BAGEL_PROGRESS", "off")
    assert progress.current_mode() == "off"
    progress.set_mode("lines")  # a CLI flag wins over the environment
    assert progress.current_mode() == "lines"


def test_line_progress_prints_at_most_one_line_per_interval_and_one_at_the_end():
    out = io.StringIO()
    bar = progress.LineProgress(total=1000, desc="train", unit="step", every=3600, stream=out)
    for _ in range(1000):
        bar.set_postfix(ce="0.41", refresh=False)
        bar.update()
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[0].startswith("[train] 1000/1000 step (100%)") and "ce=0.41" in lines[0] and "took" in lines[0]

    out = io.StringIO()
    bar = progress.LineProgress(total=4, desc="x", every=0, stream=out)
    for _ in range(4):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "eta" in lines[0] and "eta" not in lines[-1]  # the last update is the close line


def test_track_iterates_and_off_is_silent(capsys):
    progress.set_mode("off")
    assert list(progress.track(range(5), desc="d")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
    progress.set_mode("lines")
    assert sum(progress.track(range(5), desc="d", unit="img")) == 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[d] 5/5 img (100%)" in err


def test_bad_settings_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="progress mode 'loud'"):
        progress.set_mode("loud")
    monkeypatch.setenv("BAGEL_PROGRESS_EVERY", "soon")
    with pytest.raises(ValueError, match="BAGEL_PROGRESS_EVERY='soon'"):
        progress.line_interval()


def test_format_duration():
    assert [progress.format_duration(s) for s in (12.34, 324, 3720)] == ["12.3s", "5m24s", "1h02m"]
