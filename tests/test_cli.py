"""Bad input through every script's command line: one line `error: <file>:<line>: <problem>` (or the
flag) on stderr, exit status 2, no traceback, and nothing written. In process (cli.run), on the tiny
setup; each case names the file, line or flag the user must fix."""

import json

import pytest

import cli
import evaluate
import inject
import reproduce
import train_svf

pytestmark = pytest.mark.usefixtures("one_thread")


def run(script, argv, capsys) -> str:
    """The script's entry point (__main__) on argv: returns its one stderr line; asserts exit 2."""
    with pytest.raises(SystemExit) as exit_:
        cli.run(script.main, cli.parse_config(script.Config, argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def files(setup, tmp_path):
    """Broken inputs beside the tiny setup's good ones."""
    bad = {
        "torn": '{"question": "A?", "answer": "x"}\n{"question": "B?", "ans',
        "noanswer": '{"question": "A?"}\n',
        "nonumber": '{"question": "What is 1 + 1?", "answer": "two"}\n',
        "empty": "",
        "list": "[1, 2]\n",
    }
    paths = {}
    for name, text in bad.items():
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text(text)
    paths["config"] = tmp_path / "ckpt-bad"
    paths["config"].mkdir()
    (paths["config"] / "config.json").write_text("{not json")
    return paths


def common(setup, tmp_path):
    return ["--ckpt", str(setup.ckpt), "--out", str(tmp_path / "out"), "--device", "cpu"]


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--data", "{torn}"], "torn.jsonl:2: malformed JSON"),
        (["--data", "{noanswer}"], "noanswer.jsonl:1: missing field 'answer'"),
        (["--data", "{nonumber}"], "nonumber.jsonl:1: answer has no final number"),
        (["--data", "{empty}"], "empty.jsonl:1: empty file"),
        (["--eval-data", "{list}"], "list.jsonl:1: expected a JSON object"),
        (["--data", "missing.jsonl"], "missing.jsonl"),
        (["--ckpt", "{config}"], "config.json"),
        (["--ckpt", "no_such_model"], "no_such_model"),
        (["--targets", "q_proj,nope"], "nope"),
    ],
)
def test_train_svf_bad_input(setup, tmp_path, files, capsys, argv, where):
    argv = [a.format(**files) for a in argv]
    base = common(setup, tmp_path) + ["--data", str(setup.skill), "--eval-data", str(setup.skill)]
    err = run(train_svf, base + argv, capsys)
    assert where in err
    assert not (tmp_path / "out" / "state.safetensors").exists()


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--facts", "{torn}"], "torn.jsonl:2: malformed JSON"),
        (["--facts", "{noanswer}"], "noanswer.jsonl:1: missing field 'answer'"),
        (["--mix-skill", "{nonumber}"], "nonumber.jsonl:1: answer has no final number"),
        (["--mix-known", "{list}"], "list.jsonl:1: expected a JSON object"),
        (["--svf", "{torn}"], "torn.jsonl: unreadable safetensors file"),
        (["--ckpt", "{config}"], "config.json"),
        (["--targets", ","], "--targets"),
        (["--probe-threshold", "0.1", "--probe-global-fraction", "0.5"], "not both"),
    ],
)
def test_inject_bad_input(setup, tmp_path, files, capsys, argv, where):
    argv = [a.format(**files) for a in argv]
    base = common(setup, tmp_path) + [
        "--facts",
        str(setup.facts),
        "--svf",
        str(setup.svf),
        "--mix-skill",
        "none",
        "--svd-cache",
        "",
    ]
    err = run(inject, base + argv, capsys)
    assert where in err
    assert not (tmp_path / "out" / "state.safetensors").exists()


def test_inject_refuses_a_non_empty_out_and_a_foreign_resume(setup, tmp_path, capsys):
    base = common(setup, tmp_path) + [
        "--facts",
        str(setup.facts),
        "--svf",
        str(setup.svf),
        "--mix-skill",
        "none",
        "--svd-cache",
        "",
        "--epochs",
        "1",
        "--recall-target",
        "0",
    ]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert "--overwrite" in run(inject, base, capsys)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert "nothing to resume" in run(inject, base + ["--resume"], capsys)


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--reasoning", "{torn}"], "torn.jsonl:2: malformed JSON"),
        (["--reasoning-ood", "{nonumber}"], "nonumber.jsonl:1: answer has no final number"),
        (["--known", "{noanswer}"], "noanswer.jsonl:1: missing field 'answer'"),
        (["--facts", "{empty}"], "empty.jsonl:1: empty file"),
        (["--adapter", "no/such/run"], "no/such/run/config.json"),
        (["--verify", "no/such/run"], "no/such/run/config.json"),
        (["--probe-report", "{torn}"], "torn.jsonl: unreadable safetensors file"),
    ],
)
def test_evaluate_bad_input(setup, tmp_path, files, capsys, argv, where):
    argv = [a.format(**files) for a in argv]
    base = common(setup, tmp_path) + [
        "--reasoning",
        str(setup.skill),
        "--facts",
        str(setup.facts),
        "--reasoning-ood",
        "",
        "--known",
        str(setup.known),
        "--svd-cache",
        "",
    ]
    assert where in run(evaluate, base + argv, capsys)
    assert not (tmp_path / "out" / "results.json").exists()


def test_evaluate_run_made_for_another_checkpoint_is_named(setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"svf": [str(setup.svf)]}))
    err = run(evaluate, common(setup, tmp_path) + ["--adapter", str(run_dir)], capsys)
    assert str(run_dir) in err


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--methods", "palora,nope"], "unknown method 'nope'"),
        (["--seeds", "0", "--n-facts", "-1"], "--n-facts: must be >= 0"),
    ],
)
def test_reproduce_bad_input(setup, tmp_path, capsys, argv, where):
    if "-1" in argv:
        with pytest.raises(SystemExit) as exit_:
            cli.parse_config(reproduce.Config, argv)
        assert exit_.value.code == 2 and where in capsys.readouterr().err
        return
    assert where in run(reproduce, ["--ckpt", str(setup.ckpt), *argv], capsys)


def test_unexpected_errors_keep_their_traceback():
    """Only expected errors become one line: a bug must not be hidden."""

    def bug(_):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run(bug, None)
