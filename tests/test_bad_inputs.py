"""experiments/bad_inputs.py's 197 cases, each script's bad inputs by cause, as a test: every case
one line `error: ...`, exit 2, no traceback, no file of the user's touched, nothing made. A new
flag or file gets its rows there."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import bad_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_bad_input_is_one_line_and_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative default lands here
    results = bad_inputs.run_all(tmp_path)
    failed = [f"{script} {extra}: {why}" for _, script, extra, _, why in results if why]
    assert len(results) == len(bad_inputs.cases()) and not failed, "\n".join(failed)


def test_the_judge_fails_what_it_should():
    """The harness itself: a traceback, another exit status, two error lines, a touched or a new
    file each fail a case."""
    cache, a, b = Path("/c"), Path("/a"), Path("/b")
    judge = bad_inputs.judge
    assert judge(2, "error: x\n", {a: "1"}, {a: "1"}, cache) == ""
    assert judge(2, "error: x\n", {}, {cache / "svd": "f"}, cache) == ""  # the SVD cache may grow
    assert judge("traceback", "Traceback ...\nKeyError: 'x'\n", {}, {}, cache).startswith("trace")
    assert judge(0, "done\n", {}, {}, cache).startswith("exit 0")
    assert judge(2, "error: x\nerror: y\n", {}, {}, cache) == "2 error lines"
    assert judge(2, "error: x\n", {a: "1"}, {a: "2"}, cache) == f"touched {a}"
    assert judge(2, "error: x\n", {a: "1"}, {}, cache) == f"touched {a}"
    assert judge(2, "error: x\n", {}, {b: "1"}, cache) == f"wrote {b}"
