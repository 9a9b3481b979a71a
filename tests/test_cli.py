"""Bad input through every script's command line: one line `error: <file>:<line>: <problem>` (or the
flag) on stderr, exit status 2, no traceback, and nothing written. In process (cli.run), on the tiny
setup; each case names the file, line or flag the user must fix."""

import dataclasses
import json
import os

import pytest

import cli
import evaluate
import inject
import model as model_lib
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
        (["--verify", "r", "--adapter", "r"], "--verify: checks one run alone, without --adapter"),
        (["--verify", "r", "--probe-report", "p"], "--verify: checks one run alone, without --pro"),
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
        (["--seeds", "0,x"], "--seeds: comma-separated integers, got '0,x'"),
        (["--seeds", "0,-1"], "--seeds: each in [0, 2147483647], got -1"),
        (["--seeds", str(2**70)], "--seeds: each in [0, 2147483647], got 1180591620717411303424"),
    ],
)
def test_reproduce_bad_input(setup, tmp_path, capsys, argv, where):
    if "-1" in argv:
        with pytest.raises(SystemExit) as exit_:
            cli.parse_config(reproduce.Config, argv)
        assert exit_.value.code == 2 and where in capsys.readouterr().err
        return
    assert where in run(reproduce, ["--ckpt", str(setup.ckpt), *argv], capsys)


# -----------------------------------------------------------------------------
# the bad-input table: a row per bound of every int flag (generated: a new flag gets its row), and
# per device, context and folder problem of each script


SCRIPTS = {"train_svf": train_svf, "inject": inject, "evaluate": evaluate, "reproduce": reproduce}


def int_rows():
    """Every int flag of every script, just past its upper bound (its own le or lt, else
    cli.INT_MAX), with the message that names it."""
    rows = []
    for name, script in SCRIPTS.items():
        for f in dataclasses.fields(script.Config):
            if f.type not in (int, "int"):
                continue
            flag = "--" + f.name.replace("_", "-")
            if "le" in f.metadata:
                value, message = f.metadata["le"] + 1, f"must be <= {f.metadata['le']}"
            elif "lt" in f.metadata:
                value, message = f.metadata["lt"], f"must be < {f.metadata['lt']}"
            else:
                value, message = cli.INT_MAX + 1, f"must be <= {cli.INT_MAX}"
            rows.append(pytest.param(script, flag, value, message, id=f"{name}{flag}"))
    return rows


@pytest.mark.parametrize("script, flag, value, message", int_rows())
def test_every_int_flag_is_bounded(capsys, script, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(script.Config, [flag, str(value)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {flag}: {message}, got {value}\n"


def test_the_table_has_a_row_for_every_int_flag_of_inject():
    """Not a restatement: the rows come from the dataclass, so this checks the generator finds the
    flags (a Config whose annotations became strings must not empty the table)."""
    flags = {p.values[1] for p in int_rows() if p.values[0] is inject}
    assert {"--rank", "--epochs", "--seed", "--fact-tokens", "--max-len"} <= flags


CONTEXT = 128  # tests/tiny.py's max_position_embeddings


@pytest.mark.parametrize(
    "script, argv, where",
    [
        (train_svf, ["--device", "tpu"], "--device tpu: not a device"),
        (train_svf, ["--device", "meta"], "--device meta: palora runs on cpu or cuda"),
        (train_svf, ["--device", "cuda:7"], "--device cuda:7: "),
        (train_svf, ["--max-new-tokens", "1000000000000"], "--max-new-tokens: must be <="),
        (
            train_svf,
            ["--max-new-tokens", "129"],
            f"--max-new-tokens: 129 tokens do not fit the model's context ({CONTEXT})",
        ),
        (train_svf, ["--out", "{afile}"], "is not a folder"),
        (train_svf, ["--data", "{adir}"], "adir: not a file"),
        (inject, ["--facts", "{adir}"], "adir: not a file"),
        (inject, ["--svf", "{adir}"], "adir: not a file"),
        (evaluate, ["--facts", "{adir}"], "adir: not a file"),
        (evaluate, ["--known", "{adir}"], "adir: not a file"),
        (inject, ["--device", "tpu"], "--device tpu: not a device"),
        (inject, ["--fact-tokens", "129"], "--fact-tokens: 129 tokens do not fit"),
        (inject, ["--seed", "-1"], "--seed: must be >= 0"),
        (evaluate, ["--device", "tpu"], "--device tpu: not a device"),
        (evaluate, ["--max-new-tokens", "1000000000000"], "--max-new-tokens: must be <="),
        (evaluate, ["--max-new-tokens", "129"], "--max-new-tokens: 129 tokens do not fit"),
        (evaluate, ["--fact-tokens", "129"], "--fact-tokens: 129 tokens do not fit"),
        # sizes that allocate: A (r x 96) and B (64 x r) per down_proj; the mixed-in and covariance
        # examples as whole passes over their pools; smf's values (slots x D) per memory layer;
        # rl's sampled answers, one generate() row each
        (inject, ["--rank", "100000"], "--rank: 100000 is above the rank of down_proj (64 x 96)"),
        (inject, ["--act-examples", "2147483647"], "--act-examples: must be <= 65536"),
        (inject, ["--mix-ratio", "1e12"], "--mix-ratio: must be <= 16"),
        (inject, ["--method", "smf", "--smf-slots", "2147395600"], "--smf-slots: must be <="),
        (
            train_svf,
            ["--objective", "rl", "--rl-samples", "100000"],
            "--rl-samples: --batch-size x --rl-samples answers sampled per step must be <= 65536",
        ),
    ],
)
def test_bad_flags_are_one_line_before_the_model_loads(
    setup, tmp_path, files, capsys, monkeypatch, script, argv, where
):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    (tmp_path / "adir").mkdir()
    argv = [a.format(afile=afile, adir=tmp_path / "adir") for a in argv]
    base = {
        train_svf: ["--data", str(setup.skill), "--eval-data", str(setup.skill)],
        inject: ["--facts", str(setup.facts), "--svf", str(setup.svf), "--mix-skill", "none"],
        evaluate: ["--reasoning", str(setup.skill), "--facts", str(setup.facts), "--svf", "none"],
    }[script]
    monkeypatch.setattr(script.model_lib, "load", None)  # a call would be a TypeError: too late
    err = run(script, common(setup, tmp_path) + base + argv, capsys)
    assert where in err
    assert afile.read_text() == "mine"
    if script is not evaluate:  # evaluate checks that --out is writable first
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--max-new-tokens", "129"], "--max-new-tokens: 129 tokens do not fit"),
        (["--device", "tpu"], "--device tpu: not a device"),
    ],
)
def test_reproduce_refuses_bad_flags_before_any_run(
    setup, tmp_path, capsys, monkeypatch, argv, where
):
    """Checked before the first training run, not by evaluate.py hours later; nothing written."""
    monkeypatch.setattr(inject.model_lib, "load", None)  # a call would be a TypeError: too late
    out = tmp_path / "out"
    base = ["--ckpt", str(setup.ckpt), "--svf", str(setup.svf), "--facts", str(setup.facts)]
    err = run(reproduce, base + ["--out", str(out), "--seeds", "0", *argv], capsys)
    assert where in err
    assert not out.exists()


def test_model_py_refuses_a_seed_no_generator_takes(capsys):
    with pytest.raises(SystemExit) as exit_:
        model_lib.parse_args(["hi", "--seed", str(2**70)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --seed: must be in [0, {cli.INT_MAX}], got {2**70}\n"


def test_reproduce_never_writes_over_the_facts_it_reads(setup, tmp_path, capsys):
    """--out the folder of --facts: its facts.jsonl (the first --n-facts lines) would replace the
    user's file of that name."""
    facts = tmp_path / "facts.jsonl"
    facts.write_bytes(setup.facts.read_bytes())
    argv = ["--ckpt", str(setup.ckpt), "--facts", str(facts), "--out", str(tmp_path)]
    err = run(reproduce, argv + ["--n-facts", "2", "--seeds", "0"], capsys)
    assert err == f"error: --out: {tmp_path} holds {facts}, which this run reads\n"
    assert facts.read_bytes() == setup.facts.read_bytes()


def test_unexpected_errors_keep_their_traceback():
    """Only expected errors become one line: a bug must not be hidden."""

    def bug(_):
        raise KeyError("a bug")

    def nameless(_):
        raise OSError("no path named")

    with pytest.raises(KeyError):
        cli.run(bug, None)
    with pytest.raises(OSError, match="no path named"):
        cli.run(nameless, None)


def test_the_systems_refusal_of_a_path_is_one_line(tmp_path, capsys):
    """A folder where a file goes, a file where a folder goes, a rename onto a folder, permission
    denied (made by hand: the tests may run as root, whom no mode refuses): `error: <path>:
    <reason>`, exit 2, the path the user named."""
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("mine")
    adir.mkdir()
    denied = PermissionError(13, "Permission denied", str(tmp_path / "locked"))
    cases = [
        (lambda: open(adir, "rb"), f"{adir}: Is a directory"),
        (lambda: (afile / "cache").mkdir(), f"{afile / 'cache'}: Not a directory"),
        (lambda: os.replace(afile, adir), f"{adir}: Is a directory"),
        (lambda: (_ for _ in ()).throw(denied), f"{tmp_path / 'locked'}: Permission denied"),
    ]
    for fail, line in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.run(lambda f: f(), fail)
        assert exit_.value.code == 2
        assert capsys.readouterr().err == f"error: {line}\n"


@pytest.mark.parametrize("script", [inject, train_svf, evaluate])
@pytest.mark.parametrize("under", [False, True])
def test_a_file_where_the_svd_cache_folder_goes_is_refused_first(
    setup, tmp_path, capsys, monkeypatch, script, under
):
    """--svd-cache naming a file, or a folder under one: one line before the model loads (it was a
    NotADirectoryError once the SVDs were computed), the file untouched."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    loaded = []
    monkeypatch.setattr(model_lib, "load", lambda *a, **k: loaded.append(1))
    cache = afile / "svd" if under else afile
    argv = common(setup, tmp_path) + ["--svd-cache", str(cache)]
    if script is inject:
        argv += ["--facts", str(setup.facts), "--svf", str(setup.svf), "--mix-skill", "none"]
    if script is train_svf:
        argv += ["--data", str(setup.skill), "--eval-data", ""]
    if script is evaluate:
        argv += ["--reasoning", str(setup.skill), "--reasoning-ood", "", "--known", ""]
    err = run(script, argv, capsys)
    assert err == f"error: --svd-cache {cache}: {afile} is not a folder\n"
    assert afile.read_text() == "mine" and not loaded


def test_model_py_refuses_a_file_as_svd_cache(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        model_lib.parse_args(["hi", "--svd-cache", str(tmp_path / "afile"), "--device", "cpu"])
    assert exit_.value.code == 2
    assert "is not a folder" in capsys.readouterr().err
