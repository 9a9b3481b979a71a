"""Tests for train_svf.py on a tiny random Llama (tests/tiny.py) and a synthetic GSM8K-layout set (answers ending in
`#### N`): the loss goes down; z is the only thing that changes (every other weight bit-identical, the checkpoint
folder untouched); --resume ends with the same z, bit for bit (sft, and rl, whose sampling needs the saved RNG
state); bad inputs fail before training with file:line errors; a NaN loss stops the run and keeps the last good
checkpoint; the command line lists every Config field, refuses unknown flags and the config it ran with is written
beside the outputs. CPU, seconds.
(The GSM8K scoring filters are tested in tests/test_tasks.py.)
"""
import dataclasses
import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import model as model_lib
import palora
import tiny
import train_svf
import cli
import training

pytestmark = pytest.mark.usefixtures("one_thread")

REASONING = [{"question": f"What is {i} + {i + 1}?", "answer": f"{i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n"
              f"#### {2 * i + 1}"} for i in range(4)]
GOOD_LINE = json.dumps(REASONING[0])




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_svf")
    return SimpleNamespace(ckpt=tiny.make_tiny_llama(root / "ckpt"), cache=root / "svd",
                           train=tiny.write_jsonl(root / "train.jsonl", REASONING), test=tiny.write_jsonl(root / "test.jsonl", REASONING))


def config(setup, out, **overrides) -> train_svf.Config:
    """Full batches (batch_size = len(REASONING)): every step sees every example, so losses compare across steps.
    Held-out scoring only at the end, on 2 items, 8 new tokens: it is not what these tests are about."""
    settings = dict(ckpt=str(setup.ckpt), data=str(setup.train), eval_data=str(setup.test), steps=8, lr=0.1,
                    batch_size=len(REASONING), out=str(out), device="cpu", eval_every=0, eval_limit=2, max_new_tokens=8,
                    eval_batch_size=2, save_every=4, svd_cache=str(setup.cache))
    return train_svf.Config(**{**settings, **overrides})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved_step(state_path) -> int:
    with safe_open(str(state_path), "pt") as f:
        return int(f.metadata()["step"])


# -----------------------------------------------------------------------------
# training


def test_loss_goes_down(setup, tmp_path):
    steps = 20
    train_svf.main(config(setup, tmp_path, steps=steps))
    losses = [r["loss"] for r in metrics(tmp_path) if "loss" in r]
    assert len(losses) == steps
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # from ~ln(320) = 5.8 nats (a random model), lr 0.1 over 20 full batches drops ~0.4: 0.1 is far above noise
    assert last < first - 0.1, losses


def test_z_is_the_only_thing_that_changes(setup, tmp_path, monkeypatch):
    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    before = digest(setup.ckpt)
    real_load, trained = model_lib.load, []
    monkeypatch.setattr(train_svf.model_lib, "load", lambda *a, **k: trained.append(real_load(*a, **k)) or trained[-1])
    train_svf.main(config(setup, tmp_path))
    assert digest(setup.ckpt) == before  # the checkpoint folder is read, never written

    model, (base, _) = trained[0][0], real_load(setup.ckpt)
    targets = palora.find_targets(base)
    assert len(targets) == 2 * 3  # every layer's gate, up and down projections
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.z" for n in targets}
    kept, base_params = {n: p for n, p in model.named_parameters() if not n.endswith(".z")}, dict(base.named_parameters())
    assert kept.keys() == base_params.keys() - {f"{n}.weight" for n in targets}
    for name, p in kept.items():
        assert torch.equal(p, base_params[name]), name  # bit-identical: embeddings, attention, norms, head
    # the replaced weights: their factors are still the SVD of the base weight (the cache checks W's sha256)
    for name, (U, s, Vh) in palora.compute_svds(base, cache_dir=setup.cache).items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.U, U) and torch.equal(layer.s, s) and torch.equal(layer.Vh, Vh), name

    z = load_file(tmp_path / "svf.safetensors")
    assert z.keys() == targets.keys()
    for name, t in z.items():
        assert torch.equal(t, model.get_submodule(name).z.detach()), name  # what was trained is what was saved
        assert not torch.equal(t, torch.ones_like(t)), name  # and training moved it away from z = 1 (W' = W)


@pytest.mark.parametrize("objective", ["sft", "rl"])  # rl samples answers: the saved RNG state must be restored too
def test_resume_gives_the_same_z(setup, tmp_path, monkeypatch, objective):
    steps, every, killed = 8, 3, 5  # checkpoints after steps 3 and 6; killed in step 6 (loop index 5)
    run = dict(steps=steps, save_every=every, objective=objective, rl_samples=2)
    if objective == "rl":  # a random tiny model is never right: reward even-length answers so that z has a signal
        monkeypatch.setattr(train_svf.tasks, "score_reasoning", lambda text, gold: {"strict": len(text) % 2 == 0, "flexible": False})
    train_svf.main(config(setup, tmp_path / "whole", **run))

    def crash(loss, step):
        if step == killed:
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(train_svf, "check_finite", crash)
        with pytest.raises(KeyboardInterrupt):
            train_svf.main(config(setup, tmp_path / "cut", **run))
    assert saved_step(tmp_path / "cut" / "state.safetensors") == every
    assert [r["step"] for r in metrics(tmp_path / "cut")] == list(range(killed + 1))  # rows 4, 5: to be redone
    assert not (tmp_path / "cut" / "svf.safetensors").exists()

    train_svf.main(config(setup, tmp_path / "cut", **run, resume=True))
    whole, cut = (load_file(tmp_path / d / "svf.safetensors") for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not all(torch.equal(t, torch.ones_like(t)) for t in whole.values())  # z moved: the comparison means something
    rows = {d: metrics(tmp_path / d) for d in ("whole", "cut")}
    assert [r["step"] for r in rows["cut"]] == list(range(steps + 1))  # one row per step (0: the base model)
    assert [r.get("loss") for r in rows["cut"]] == [r.get("loss") for r in rows["whole"]]  # same batches, same losses


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    every, real_loss, calls = 3, train_svf.sft_loss, []

    def nan_after_checkpoint(*args):
        loss, n_tokens = real_loss(*args)
        calls.append(step := len(calls) + 1)
        return (loss * float("nan") if step == every + 1 else loss), n_tokens
    monkeypatch.setattr(train_svf, "sft_loss", nan_after_checkpoint)
    with pytest.raises(FloatingPointError, match=rf"step {every + 1}: loss is nan"):
        train_svf.main(config(setup, tmp_path, steps=8, save_every=every))
    state = tmp_path / "state.safetensors"
    assert saved_step(state) == every
    assert all(torch.isfinite(t).all() for k, t in load_file(state).items() if k.startswith("param/"))
    assert [r["step"] for r in metrics(tmp_path)] == list(range(every + 1))  # no row for the NaN step
    assert not (tmp_path / "svf.safetensors").exists()


# -----------------------------------------------------------------------------
# bad input: a clear error naming the file (and line), before training starts


@pytest.mark.parametrize("name, lines, message", [
    ("train.jsonl", [GOOD_LINE, "", '{"question": "B?", "answer": '], r"train\.jsonl:3: malformed JSON"),  # blank counted
    ("train.jsonl", [GOOD_LINE, '{"answer": "#### 3"}'], r"train\.jsonl:2: missing field 'question'"),
    ("train.jsonl", [GOOD_LINE, '{"question": "B?"}'], r"train\.jsonl:2: missing field 'answer'"),
    ("train.jsonl", [GOOD_LINE, '{"question": "B?", "answer": "three"}'], r"train\.jsonl:2: answer has no final number"),
    ("train.jsonl", [], r"train\.jsonl:1: empty file"),
    ("test.jsonl", [GOOD_LINE, '{"question": "B?", "answer": "7\\n#### x"}'], r"test\.jsonl:2: answer has no final number"),
])
def test_bad_data_fails_before_training(setup, tmp_path, name, lines, message):
    bad = tmp_path / name
    bad.write_text("".join(line + "\n" for line in lines))
    which = "data" if name == "train.jsonl" else "eval_data"
    with pytest.raises(ValueError, match=message):
        train_svf.main(config(setup, tmp_path / "out", **{which: str(bad)}))
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(targets="gate_proj,nope"), "unknown target 'nope'"), (dict(steps=0), "--steps must be positive"),
    (dict(steps=-3), "--steps must be positive"), (dict(lr=0.0), "--lr must be positive"),
    (dict(lr=-1e-3), "--lr must be positive"), (dict(data="missing.jsonl"), "missing.jsonl: no such file"),
])
def test_bad_settings_fail_before_training(setup, tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_svf.main(config(setup, tmp_path / "out", **overrides))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_too_long_items_are_skipped_and_counted(setup, tmp_path, capsys):
    max_len = 256  # the short items take ~120-140 tokens (the ChatML system prompt included); the long one far more
    data = tiny.write_jsonl(tmp_path / "train.jsonl", REASONING + [{"question": "How many apples? " * 40, "answer": "#### 1"}])
    train_svf.main(config(setup, tmp_path / "out", data=str(data), steps=1, max_len=max_len))
    assert f"train.jsonl: skipped 1 of {len(REASONING) + 1} items longer than --max-len {max_len}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"train\.jsonl: no item fits in --max-len 8"):
        train_svf.main(config(setup, tmp_path / "none", data=str(data), steps=1, max_len=8))


# -----------------------------------------------------------------------------
# command line


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(train_svf.Config, ["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert [f.name for f in dataclasses.fields(train_svf.Config) if "--" + f.name.replace("_", "-") not in shown] == []


@pytest.mark.parametrize("argv, message", [
    (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    (["--steps", "five"], "invalid int value"), (["--dtype", "float16"], "invalid choice"),
])
def test_bad_flags_are_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(train_svf.Config, argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_config_used_is_written_beside_the_outputs(setup, tmp_path):
    argv = ["--ckpt", str(setup.ckpt), "--data", str(setup.train), "--eval-data", str(setup.test), "--out", str(tmp_path),
            "--steps", "2", "--lr", "0.05", "--seed", "3", "--batch-size", "2", "--device", "cpu", "--eval-limit", "2",
            "--max-new-tokens", "8", "--svd-cache", str(setup.cache), "--no-resume"]
    cfg = cli.parse_config(train_svf.Config, argv)
    assert (cfg.steps, cfg.lr, cfg.seed, cfg.resume, cfg.objective) == (2, 0.05, 3, False, "sft")  # typed; defaults kept
    train_svf.main(cfg)
    assert json.loads((tmp_path / "config.json").read_text()) == dataclasses.asdict(cfg)
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]
