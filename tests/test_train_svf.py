"""Tests for train_svf.py on a tiny random Llama (tests/tiny.py) and a synthetic GSM8K-layout set
(answers ending in `#### N`): the loss goes down; z is the only thing that changes (every other
weight bit-identical, the checkpoint folder untouched); --resume ends with the same z, bit for bit
(sft, and rl, whose sampling needs the saved RNG state); bad inputs fail before training with
file:line errors; a NaN loss stops the run and keeps the last good checkpoint; the command line
lists every Config field, refuses unknown flags and the config it ran with is written beside the
outputs. CPU, seconds. (The GSM8K scoring filters are tested in tests/test_tasks.py.)"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cli
import model as model_lib
import palora
import tasks
import tiny
import train_svf
import training

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

GOOD_LINE = json.dumps({"question": "A?", "answer": "#### 1"})
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tiny_ckpt, reasoning, tmp_path_factory):
    cache = tmp_path_factory.mktemp("svd")
    return SimpleNamespace(
        ckpt=tiny_ckpt,
        cache=cache,
        train=reasoning.train,
        test=reasoning.test,
        records=reasoning.records,
    )


def config(setup, out, **overrides) -> train_svf.Config:
    """Full batches: every step sees every example, so losses compare across steps. Held-out
    scoring only at the end, on 2 items, 8 new tokens: it is not what these tests are about."""
    settings = dict(
        ckpt=str(setup.ckpt),
        data=str(setup.train),
        eval_data=str(setup.test),
        steps=8,
        lr=0.1,
        batch_size=len(setup.records),
        out=str(out),
        device="cpu",
        eval_every=0,
        eval_limit=2,
        max_new_tokens=8,
        eval_batch_size=2,
        save_every=4,
        svd_cache=str(setup.cache),
    )
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
    # from ~ln(320) = 5.8 nats (a random model), lr 0.1 over 20 full batches drops ~0.4: 0.1 is far
    # above noise
    assert last < first - 0.1, losses


def test_z_is_the_only_thing_that_changes(setup, tmp_path, monkeypatch):
    def digest(folder):
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
        }

    before = digest(setup.ckpt)
    real_load, trained = model_lib.load, []
    monkeypatch.setattr(
        train_svf.model_lib,
        "load",
        lambda *a, **k: trained.append(real_load(*a, **k)) or trained[-1],
    )
    train_svf.main(config(setup, tmp_path))
    assert digest(setup.ckpt) == before  # the checkpoint folder is read, never written

    model, (base, _) = trained[0][0], real_load(setup.ckpt)
    targets = palora.find_targets(base)
    assert len(targets) == 2 * 3  # every layer's gate, up and down projections
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.z" for n in targets
    }
    factors = (".z", ".U", ".s", ".Vh")  # the replaced weights', checked below
    kept, base_params = (
        {n: p for n, p in model.named_parameters() if not n.endswith(factors)},
        dict(base.named_parameters()),
    )
    assert kept.keys() == base_params.keys() - {f"{n}.weight" for n in targets}
    for name, p in kept.items():
        # bit-identical: embeddings, attention, norms, head
        assert torch.equal(p, base_params[name]), name
    # the replaced weights: their factors are still the SVD of the base weight (the cache checks W's
    # sha256)
    for name, (U, s, Vh) in palora.svds(base).items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.U, U) and torch.equal(layer.s, s) and torch.equal(layer.Vh, Vh), (
            name
        )

    z = load_file(tmp_path / "svf.safetensors")
    assert z.keys() == targets.keys()
    for name, t in z.items():
        # what was trained is what was saved
        assert torch.equal(t, model.get_submodule(name).z.detach()), name
        # and training moved it away from z = 1 (W' = W)
        assert not torch.equal(t, torch.ones_like(t)), name


# rl samples answers: the saved RNG state must be restored too
@pytest.mark.parametrize("objective", ["sft", "rl"])
def test_resume_gives_the_same_z(setup, tmp_path, monkeypatch, objective):
    # checkpoints after steps 3 and 6; killed in step 6 (loop index 5)
    steps, every, killed = 8, 3, 5
    run = dict(steps=steps, save_every=every, objective=objective, rl_samples=2)
    # a random tiny model is never right: reward even-length answers so that z has a signal
    if objective == "rl":
        monkeypatch.setattr(
            train_svf.tasks,
            "score_reasoning",
            lambda text, gold: {"strict": len(text) % 2 == 0, "flexible": False},
        )
    train_svf.main(config(setup, tmp_path / "whole", **run))

    def crash(loss, step, params=None):
        if step == killed:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_svf, "check_finite", crash)
        with pytest.raises(KeyboardInterrupt):
            train_svf.main(config(setup, tmp_path / "cut", **run))
    assert saved_step(tmp_path / "cut" / "state.safetensors") == every
    # rows 4, 5: to be redone
    assert [r["step"] for r in metrics(tmp_path / "cut")] == list(range(killed + 1))
    assert not (tmp_path / "cut" / "svf.safetensors").exists()

    train_svf.main(config(setup, tmp_path / "cut", **run, resume=True))
    whole, cut = (load_file(tmp_path / d / "svf.safetensors") for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    # z moved: the comparison means something
    assert not all(torch.equal(t, torch.ones_like(t)) for t in whole.values())
    rows = {d: metrics(tmp_path / d) for d in ("whole", "cut")}
    # one row per step (0: the base model)
    assert [r["step"] for r in rows["cut"]] == list(range(steps + 1))
    # same batches, same losses
    assert [r.get("loss") for r in rows["cut"]] == [r.get("loss") for r in rows["whole"]]


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
    assert all(
        torch.isfinite(t).all() for k, t in load_file(state).items() if k.startswith("param/")
    )
    # no row for the NaN step
    assert [r["step"] for r in metrics(tmp_path)] == list(range(every + 1))
    assert not (tmp_path / "svf.safetensors").exists()


# -----------------------------------------------------------------------------
# bad input: a clear error naming the file (and line), before training starts


@pytest.mark.parametrize(
    "name, lines, message",
    [
        # blank counted
        (
            "train.jsonl",
            [GOOD_LINE, "", '{"question": "B?", "answer": '],
            r"train\.jsonl:3: malformed JSON",
        ),
        (
            "train.jsonl",
            [GOOD_LINE, '{"answer": "#### 3"}'],
            r"train\.jsonl:2: missing field 'question'",
        ),
        (
            "train.jsonl",
            [GOOD_LINE, '{"question": "B?"}'],
            r"train\.jsonl:2: missing field 'answer'",
        ),
        (
            "train.jsonl",
            [GOOD_LINE, '{"question": "B?", "answer": "three"}'],
            r"train\.jsonl:2: answer has no final number",
        ),
        ("train.jsonl", [], r"train\.jsonl:1: empty file"),
        (
            "test.jsonl",
            [GOOD_LINE, '{"question": "B?", "answer": "7\\n#### x"}'],
            r"test\.jsonl:2: answer has no final number",
        ),
    ],
)
def test_bad_data_fails_before_training(setup, tmp_path, name, lines, message):
    bad = tmp_path / name
    bad.write_text("".join(line + "\n" for line in lines))
    which = "data" if name == "train.jsonl" else "eval_data"
    with pytest.raises(ValueError, match=message):
        train_svf.main(config(setup, tmp_path / "out", **{which: str(bad)}))
    assert (
        not (tmp_path / "out" / "metrics.jsonl").exists()
        and not (tmp_path / "out" / "config.json").exists()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(targets="gate_proj,nope"), "unknown target 'nope'"),
        (dict(targets=" , "), "--targets: no target name"),
        (dict(steps=0), "--steps: must be >= 1"),
        (dict(batch_size=0), "--batch-size: must be >= 1"),
        (dict(eval_batch_size=0), "--eval-batch-size: must be >= 1"),
        (dict(lr=0.0), "--lr: must be > 0"),
        (dict(lr=float("nan")), "--lr: must be a finite number"),
        (dict(kl_coef=-0.1), "--kl-coef: must be >= 0"),
        (dict(kl_coef=float("inf")), "--kl-coef: must be a finite number"),
        (dict(rl_samples=0), "--rl-samples: must be >= 1"),
        (dict(objective="rl", batch_size=1, rl_samples=1), "mean baseline needs"),
        (dict(eval_every=-1), "--eval-every: must be >= 0"),
        (dict(eval_limit=-1), "--eval-limit: must be >= 0"),
        (dict(save_every=0), "--save-every: must be >= 1"),
        (dict(max_len=0), "--max-len: must be >= 2"),
        (dict(max_new_tokens=0), "--max-new-tokens: must be >= 1"),
        (dict(seed=-1), "--seed: must be >= 0"),
        (dict(data="missing.jsonl"), "missing.jsonl: no such file"),
        (dict(mix_known="missing.jsonl"), "missing.jsonl: no such file"),
        (dict(mix_known="k.jsonl", objective="rl"), "--mix-known trains with --objective sft"),
        (dict(known_batch=0), "--known-batch: must be >= 1"),
        (dict(resume=True, overwrite=True), "--resume and --overwrite exclude each other"),
    ],
)
def test_bad_settings_fail_before_training(setup, tmp_path, monkeypatch, overrides, message):
    loaded = []
    monkeypatch.setattr(train_svf.model_lib, "load", lambda *a, **k: loaded.append(1) / 0)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_svf.main(config(setup, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists() and not loaded  # nothing made, nothing loaded


def test_known_facts_add_their_own_mean_loss(setup, monkeypatch):
    """sft with --mix-known: the skill batch's mean loss plus the known batch's (known_batch of
    them, drawn by their own seed), so that 3-token answers weigh as much as worked solutions."""
    calls = []

    def fake_sft(model, batch, pad_id, device):
        calls.append(batch)
        return torch.tensor(float(sum(b[0] for b in batch))), len(batch)

    monkeypatch.setattr(train_svf, "sft_loss", fake_sft)
    skill = [(i, None) for i in range(8)]
    known = [(100 + i, None) for i in range(5)]
    cfg = config(setup, "unused", batch_size=4, known_batch=2, mix_known="k.jsonl")
    z = {"w": torch.ones(1)}
    loss, tokens = train_svf.batch_loss(
        None, SimpleNamespace(pad_id=0), z, (None, skill, known), cfg, step=3
    )
    assert [len(b) for b in calls] == [4, 2] and all(b[0] >= 100 for b in calls[1])
    assert loss.item() == sum(b[0] for b in calls[0] + calls[1]) and tokens == 6
    calls.clear()
    loss, tokens = train_svf.batch_loss(
        None, SimpleNamespace(pad_id=0), z, (None, skill, []), cfg, step=3
    )
    assert len(calls) == 1 and tokens == 4


def test_mixed_known_facts_are_learned(setup, tmp_path):
    """End to end: the known facts' answers get likelier under the expert trained with them mixed
    in than under one trained without."""
    known = tmp_path / "known.jsonl"
    rows = [{"question": f"Where is {c}?", "answer": a} for c, a in zip("ABCD", "wxyz")]
    known.write_text("".join(json.dumps(r) + "\n" for r in rows))
    nll = {}
    for name, mix in (("without", ""), ("with", str(known))):
        out = tmp_path / name
        train_svf.main(config(setup, out, steps=12, mix_known=mix, known_batch=4))
        model, tokenizer = model_lib.load(setup.ckpt, device="cpu", dtype=torch.float32)
        z = load_file(out / "svf.safetensors")
        palora.add_svf(model, palora.svds(model, tuple(train_svf.Config().targets.split(","))), z)
        examples = [tasks.encode_example(tokenizer, r["question"], r["answer"], 512) for r in rows]
        tokens, labels, mask = tasks.collate(examples, tokenizer.pad_id)
        with torch.no_grad():
            nll[name] = training.answer_loss(model, tokens, labels, mask).item()
    assert nll["with"] < nll["without"] - 0.05, nll


def test_numeric_flags_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(train_svf.Config, ["--save-every", "0"])
    assert exit_.value.code == 2 and "--save-every: must be >= 1" in capsys.readouterr().err


def test_too_long_items_are_skipped_and_counted(setup, tmp_path, capsys):
    # the short items take ~120-140 tokens (the ChatML system prompt included); the long one far
    # more
    max_len = 256
    data = tiny.write_jsonl(
        tmp_path / "train.jsonl",
        setup.records + [{"question": "How many apples? " * 40, "answer": "#### 1"}],
    )
    train_svf.main(config(setup, tmp_path / "out", data=str(data), steps=1, max_len=max_len))
    assert (
        f"train.jsonl: skipped 1 of {len(setup.records) + 1} items longer than --max-len {max_len}"
        in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match=r"train\.jsonl: no item fits in --max-len 8"):
        train_svf.main(config(setup, tmp_path / "none", data=str(data), steps=1, max_len=8))


# -----------------------------------------------------------------------------
# command line


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(train_svf.Config, ["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert [
        f.name
        for f in dataclasses.fields(train_svf.Config)
        if "--" + f.name.replace("_", "-") not in shown
    ] == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
        (["--steps", "five"], "invalid int value"),
        (["--dtype", "float16"], "invalid choice"),
        (["--parallel", "zero"], "invalid choice"),
    ],
)
def test_bad_flags_are_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(train_svf.Config, argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_config_used_is_written_beside_the_outputs(setup, tmp_path):
    argv = [
        "--ckpt",
        str(setup.ckpt),
        "--data",
        str(setup.train),
        "--eval-data",
        str(setup.test),
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--lr",
        "0.05",
        "--seed",
        "3",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--eval-limit",
        "2",
        "--max-new-tokens",
        "8",
        "--svd-cache",
        str(setup.cache),
        "--no-resume",
    ]
    cfg = cli.parse_config(train_svf.Config, argv)
    # typed; defaults kept
    assert (cfg.steps, cfg.lr, cfg.seed, cfg.resume, cfg.objective) == (2, 0.05, 3, False, "sft")
    train_svf.main(cfg)
    assert json.loads((tmp_path / "config.json").read_text()) == dataclasses.asdict(cfg)
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]


def test_config_is_not_mutated_and_the_resolved_copy_is_saved(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train_svf, "default_out", lambda cfg: tmp_path / "default")
    cfg = config(setup, "", steps=1)
    train_svf.main(cfg)
    assert cfg.out == ""  # the caller's config is untouched
    saved = json.loads((tmp_path / "default" / "config.json").read_text())
    assert saved == {**dataclasses.asdict(cfg), "out": str(tmp_path / "default")}


# -----------------------------------------------------------------------------
# the run folder: no silent overwrite, resume only of the same run, a finished run resumes cleanly


def test_resume_of_a_finished_run_rewrites_the_same_outputs(setup, tmp_path):
    first = train_svf.main(config(setup, tmp_path, steps=4))
    expert = load_file(tmp_path / "svf.safetensors")
    again = train_svf.main(config(setup, tmp_path, steps=4, resume=True))
    assert math.isfinite(again["final_loss"]) and again["final_loss"] == first["final_loss"]
    same = ("held_out", "steps", "train_s", "tokens_per_s", "trainable")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == first["final_loss"]
    resumed = load_file(tmp_path / "svf.safetensors")
    assert all(torch.equal(expert[k], resumed[k]) for k in expert)
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2, 3, 4]


def test_a_used_folder_needs_resume_or_overwrite(setup, tmp_path):
    train_svf.main(config(setup, tmp_path, steps=2))
    with pytest.raises(cli.ConfigError, match="not empty.*--resume.*--overwrite"):
        train_svf.main(config(setup, tmp_path, steps=2, lr=0.2))
    with pytest.raises(cli.ConfigError, match=r"--lr 0\.1 -> 0\.2, --steps 2 -> 3"):
        train_svf.main(config(setup, tmp_path, steps=3, lr=0.2, resume=True))
    train_svf.main(config(setup, tmp_path, steps=2, lr=0.2, overwrite=True))
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.2
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]


def files(root) -> dict:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_overwrite_never_empties_a_checkpoint_nor_the_data_folder(setup, tmp_path):
    """--out equal to --ckpt (an HF config.json, not a run config), and a run folder of this
    script that holds the training data it reads: refused with --overwrite, nothing removed."""
    ckpt = shutil.copytree(setup.ckpt, tmp_path / "ckpt")
    before = files(ckpt)
    argv = ["--ckpt", str(ckpt), "--out", str(ckpt), "--overwrite", "--device", "cpu"]
    argv += ["--data", str(setup.train), "--eval-data", str(setup.test)]
    done = subprocess.run(
        [sys.executable, str(REPO / "train_svf.py"), *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == f"error: --out: {ckpt} holds {ckpt}, which this run reads\n"
    assert files(ckpt) == before
    run = tmp_path / "run"
    train_svf.main(config(setup, run, steps=1))
    shutil.copy(setup.train, run / "train.jsonl")
    before = files(run)
    with pytest.raises(cli.ConfigError, match=f"holds {run / 'train.jsonl'}, which this run reads"):
        train_svf.main(config(setup, run, steps=1, data=str(run / "train.jsonl"), overwrite=True))
    assert files(run) == before


def test_a_new_run_killed_before_its_first_save_never_resumes_the_old_state(
    setup, tmp_path, monkeypatch
):
    train_svf.main(config(setup, tmp_path, steps=4, save_every=2))  # the old run: state at step 4

    def crash(loss, step, params=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_svf, "check_finite", crash)
        with pytest.raises(KeyboardInterrupt):
            train_svf.main(config(setup, tmp_path, steps=4, lr=0.2, overwrite=True))
    with pytest.raises(cli.ConfigError, match="nothing to resume from"):
        train_svf.main(config(setup, tmp_path, steps=4, lr=0.2, resume=True))


def test_torn_metrics_and_truncated_state_name_the_file(setup, tmp_path):
    train_svf.main(config(setup, tmp_path, steps=4, save_every=2))
    rows = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(rows[:-20])  # a row cut by a killed write
    n = rows.count("\n")
    with pytest.raises(tasks.DataError, match=rf"metrics\.jsonl:{n}: malformed metrics row"):
        train_svf.main(config(setup, tmp_path, steps=4, save_every=2, resume=True))
    state = tmp_path / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(cli.ConfigError, match=r"state\.safetensors: unreadable training state"):
        train_svf.main(config(setup, tmp_path, steps=4, save_every=2, resume=True))


def test_non_finite_parameters_are_never_saved(setup, tmp_path, monkeypatch):
    """The loss is finite, but the step makes z infinite (as a huge or inf gradient would): the
    state of that step must not be saved, even at a save step; the last finite one is kept."""
    every, steps = 2, []

    class Exploding(torch.optim.Adam):
        def step(self, closure=None):
            super().step(closure)
            steps.append(1)
            if len(steps) == 2 * every:
                with torch.no_grad():
                    self.param_groups[0]["params"][0][0] = float("inf")

    monkeypatch.setattr(train_svf.torch.optim, "Adam", Exploding)
    with pytest.raises(FloatingPointError, match=rf"step {2 * every}: .* is not finite"):
        train_svf.main(config(setup, tmp_path, steps=8, save_every=every))
    state = tmp_path / "state.safetensors"
    assert saved_step(state) == every
    assert all(torch.isfinite(t).all() for t in load_file(state).values() if t.is_floating_point())


# -----------------------------------------------------------------------------
# the RL objective


def test_base_model_sets_z_to_one_and_restores_it():
    z = {
        "a": torch.nn.Parameter(torch.tensor([0.5, 2.0])),
        "b": torch.nn.Parameter(torch.ones(3) * 3),
    }
    before = {n: p.detach().clone() for n, p in z.items()}
    with pytest.raises(RuntimeError):
        with train_svf.base_model(z):
            assert all(torch.equal(p, torch.ones_like(p)) for p in z.values())
            raise RuntimeError  # restored on errors too
    assert all(torch.equal(z[n], before[n]) for n in z)


def test_kl_term_pulls_log_p_toward_the_base():
    """Reward 0 everywhere: only the KL term acts. The sample that z made likelier than the base
    (log p_z - log p_1 = +1) must become less likely, the one it made rarer (-1) likelier."""
    logp = torch.tensor([-2.0, -4.0], requires_grad=True)
    logp_base = torch.tensor([-3.0, -3.0])
    train_svf.reinforce_loss(logp, logp_base, torch.zeros(2), kl_coef=0.5).backward()
    step = -logp.grad  # a gradient descent step
    assert step[0] < 0 < step[1]


def test_a_reward_every_sample_gets_teaches_nothing():
    """The mean baseline: a reward shared by all samples carries no signal, so no gradient."""
    logp = torch.tensor([-2.0, -4.0, -1.0], requires_grad=True)
    train_svf.reinforce_loss(logp, logp.detach().clone(), torch.ones(3), kl_coef=0.5).backward()
    assert torch.equal(logp.grad, torch.zeros(3))


def rl_setup(setup, lm_head_scale: float):
    """The tiny model with SVF on its MLPs; its head scaled up so that the next-token distribution
    is far from uniform (a random tiny model's logits are within ~0.2 of each other)."""
    model, tokenizer = model_lib.load(setup.ckpt)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    z = palora.add_svf(model, palora.svds(model))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in z.values():
        p.requires_grad_(True)
    return model, tokenizer, z


def test_rl_raises_the_mean_reward_of_a_bandit(setup, monkeypatch):
    """One question, one sampled token: a bandit whose arms are the vocabulary. Reward 1 for the
    base model's 2nd to 4th likeliest tokens (not its favourite: there is room to improve). The mean
    reward is computed exactly, from the next-token distribution, before and after 20 RL steps."""
    model, tokenizer, z = rl_setup(setup, lm_head_scale=30.0)
    prompt = tokenizer.encode(tasks.chat_prompt(tokenizer, "Pick one."), add_special_tokens=False)

    def next_token_p():
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)  # (V,)

    order = next_token_p().argsort(descending=True).tolist()
    winners = {tokenizer.decode([i]) for i in order[1:4]}
    monkeypatch.setattr(
        train_svf.tasks,
        "score_reasoning",
        lambda text, gold: {"strict": text in winners, "flexible": False},
    )
    won = torch.tensor([tokenizer.decode([i]) in winners for i in range(len(order))])

    def mean_reward():
        return next_token_p()[won].sum().item()

    cfg = train_svf.Config(rl_samples=16, max_new_tokens=1, kl_coef=0.0)
    optimizer = torch.optim.Adam(list(z.values()), lr=0.05)
    before = mean_reward()
    for step in range(20):
        generator = training.step_generator(0, step, "cpu")
        loss, _ = train_svf.rl_loss(
            model, tokenizer, [{"question": "Pick one.", "answer": "1"}], z, cfg, generator
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mean_reward()
    assert after > before + 0.1, (before, after)


def test_rl_loss_leaves_z_as_it_was_and_samples_from_its_own_generator(setup, monkeypatch):
    model, tokenizer, z = rl_setup(setup, lm_head_scale=1.0)
    with torch.no_grad():
        for p in z.values():
            p.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in z.items()}
    cfg = train_svf.Config(rl_samples=2, max_new_tokens=4)
    batch = setup.records[:2]
    losses = []
    for global_seed in (1, 2):  # the global RNG must not matter: resume is exact on CUDA too
        torch.manual_seed(global_seed)
        generator = training.step_generator(0, 3, "cpu")
        losses.append(train_svf.rl_loss(model, tokenizer, batch, z, cfg, generator)[0].item())
    assert losses[0] == losses[1]
    assert all(torch.equal(z[n], before[n]) for n in z)  # the base-model pass restored z


# -----------------------------------------------------------------------------
# progress


def test_the_command_line_shows_progress_of_the_held_out_evaluation(setup, tmp_path):
    argv = [
        "--ckpt",
        str(setup.ckpt),
        "--data",
        str(setup.train),
        "--eval-data",
        str(setup.test),
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--device",
        "cpu",
        "--eval-limit",
        "2",
        "--max-new-tokens",
        "4",
        "--svd-cache",
        str(setup.cache),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "train_svf.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for desc in ("held-out, base model", "held-out, step 1", "held-out, step 2"):
        # a bar inside the training bar clears itself when done: its last state may not be drawn
        assert f"{desc}:" in done.stderr and "answer/s" in done.stderr, done.stderr
    assert "svf: 100%|" in done.stderr  # and the training bar finished
    again = subprocess.run(
        [sys.executable, str(REPO / "train_svf.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert again.stderr.count("\n") == 1 and "--overwrite" in again.stderr  # one line, no traceback
