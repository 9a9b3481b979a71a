"""Tests for inject.py on a tiny random Llama (tests/tiny.py) and a random SVF expert: every method
trains and changes the answers to the injected facts; training stops at the recall target; PALoRA's
merged model keeps every protected singular triplet; random protection keeps the probe's count, not
its set;
--resume ends with the same adapter and refuses another run; bad inputs fail before training, naming
the file (and line). CPU, seconds.
"""

import dataclasses
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
import cli
import inject
import model as model_lib
import palora
import smf
import tasks
import tiny
import train_svf
import training
from runs import FACTS, SKILL, config, identity, make_expert

pytestmark = pytest.mark.usefixtures("one_thread")


def expert_model(setup):
    """The base checkpoint with the SVF expert merged: the model every adapter is trained on."""
    model, tokenizer = model_lib.load(setup.ckpt)
    z, _ = adapters.load_svf(setup.svf, identity(setup.ckpt), model)
    svds = adapters.svds(model, palora.MLP_TARGETS, identity(setup.ckpt), setup.cache)
    palora.add_svf(model, {n: svd for n, svd in svds.items() if n in z}, z)
    return palora.merge_svf(model), tokenizer


def answers(setup, run=None):
    model, tokenizer = expert_model(setup)
    if run is not None:
        model, _ = adapters.load_run(model, run, identity(setup.ckpt))
    return tasks.answer(
        model, tokenizer, [f["question"] for f in FACTS], max_new_tokens=6, batch_size=8
    )


# -----------------------------------------------------------------------------
# training


SMALL_MEMORY = dict(smf_slots=256, smf_topk=4, smf_top_t=16, smf_background=12)  # tiny D = 64


@pytest.mark.parametrize("method", list(adapters.METHODS))
def test_each_method_learns_and_changes_answers(setup, tmp_path, method):
    """imsm and smf too: answers through model.generate (the Siamese's two KV caches; the memory
    layers), each run's own file beside the probe."""
    memory = SMALL_MEMORY if method == "smf" else {}
    summary = inject.main(config(setup, tmp_path, method=method, **memory))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == summary["steps"] == 8 * len(FACTS) // 4
    assert sum(losses[-2:]) < sum(losses[:2])  # the last epoch's loss below the first's
    assert answers(setup, tmp_path) != answers(setup)
    files = {"imsm": "imsm.safetensors", "smf": "smf.safetensors"}
    peft = ("adapter_config.json", "adapter_model.safetensors")
    for name in (
        *([files[method]] if method in files else peft),
        "probe.safetensors",
        "config.json",
        "summary.json",
    ):
        assert (tmp_path / name).is_file()
    assert adapters.run_file(tmp_path).name == files.get(method, "adapter_model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["svf"] == [
        str(setup.svf)
    ]  # resolved and saved


def test_default_replay_mixes_in_the_experts_training_data(setup, tmp_path):
    """mix_skill="expert" reads the expert's metadata "data" (the skill set it was trained on): 0.5
    per fact."""
    summary = inject.main(config(setup, tmp_path, mix_skill="expert", epochs=1))
    assert summary["examples"] == len(FACTS) + round(0.5 * len(FACTS))
    assert json.loads((tmp_path / "config.json").read_text())["mix_skill"] == str(setup.skill)


def test_palora_keeps_every_protected_triplet(setup, tmp_path):
    """On the whole merged model: for every target matrix W'' = W' + dW and every i in S, W'' v_i =
    s_i m_i u_i and
    u_iᵀ W'' = s_i m_i v_iᵀ, within float32 rounding of a merge (2 (R + in) u ||W||₂,
    palora.merge_svf's bound)."""
    inject.main(config(setup, tmp_path, method="palora"))
    model, _ = expert_model(setup)
    expert = {n: m.weight.detach().clone() for n, m in palora.find_targets(model).items()}
    model, _ = adapters.load_run(model, tmp_path, identity(setup.ckpt))
    base, _ = model_lib.load(setup.ckpt)
    svds = palora.svds(base)
    z, _ = adapters.load_svf(setup.svf, identity(setup.ckpt), base)
    protected = load_file(tmp_path / "probe.safetensors")
    assert set(protected) == set(expert) and len(expert) == 2 * 3  # every layer, every MLP matrix
    moved = 0.0
    for name, S in protected.items():
        assert (
            S.dtype == torch.int64
            and len(S) == round(0.5 * len(svds[name][1]))
            and torch.all(S[1:] > S[:-1])
        )
        U, s, Vh = (t.double() for t in svds[name])
        sm = (s * palora.multiplier(s, z[name].double()))[S]  # the expert's singular values on S
        W = model.get_submodule(name).weight.double()
        bound = 2 * (len(s) + W.shape[1]) * palora.U32 * torch.linalg.matrix_norm(W, 2)
        assert (
            W @ Vh[S].T - U[:, S] * sm
        ).norm() <= bound  # W'' v_i = s_i m_i u_i, (out, in) @ (in, k)
        assert (
            U[:, S].T @ W - sm[:, None] * Vh[S]
        ).norm() <= bound  # u_iᵀ W'' = s_i m_i v_iᵀ, (k, out) @ (out, in)
        moved = max(
            moved, ((W - expert[name].double()).norm() / expert[name].double().norm()).item()
        )
    assert moved > 1e-3  # the adapter did change the weights, off the protected subspace


@pytest.mark.parametrize("method", ["palora", "imsm", "smf"])
def test_resume_gives_the_same_adapter(setup, tmp_path, monkeypatch, method):
    """Also IMSM's two Adam groups and SMF's SparseAdam moments (and its slots' background)."""
    memory = SMALL_MEMORY if method == "smf" else {}
    inject.main(config(setup, tmp_path / "whole", epochs=4, method=method, **memory))

    def crash(loss, step, params):  # interrupted: killed at step 5, after the checkpoint at step 3
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(inject, "check_finite", crash)
    with pytest.raises(KeyboardInterrupt):
        inject.main(config(setup, tmp_path / "cut", epochs=4, method=method, **memory))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        adapters.run_file(tmp_path / "cut")
    inject.main(config(setup, tmp_path / "cut", epochs=4, resume=True, method=method, **memory))
    whole, cut = (load_file(adapters.run_file(tmp_path / d)) for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 9))


def test_resume_refuses_another_runs_settings(setup, tmp_path, monkeypatch):
    def crash(loss, step, params):
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(inject, "check_finite", crash)
    with pytest.raises(KeyboardInterrupt):
        inject.main(config(setup, tmp_path, epochs=4))
    monkeypatch.undo()
    with pytest.raises(cli.ConfigError, match=r"--lr 0.01 -> 0.02"):
        inject.main(config(setup, tmp_path, epochs=4, lr=2e-2, resume=True))


def test_default_svf_is_the_newest_for_this_checkpoint(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(inject, "RUNS", tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="train_svf.py"):
        inject.main(config(setup, tmp_path / "out", svf=[]))
    (tmp_path / "runs" / "svf-mine").mkdir(parents=True)
    (tmp_path / "runs" / "svf-mine" / "svf.safetensors").write_bytes(setup.svf.read_bytes())
    make_expert(tmp_path / "runs" / "other", tiny.make_tiny_llama(tmp_path / "other", seed=1))
    (tmp_path / "runs" / "other" / "svf").rename(
        tmp_path / "runs" / "svf-other"
    )  # newer, for another checkpoint
    assert (
        inject.latest_svf(identity(setup.ckpt), "tiny")
        == tmp_path / "runs" / "svf-mine" / "svf.safetensors"
    )


# -----------------------------------------------------------------------------
# bad input: a clear error naming the file (and line), before training starts


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"question": "A?", "answer": "x"}', '{"question": "B?", "answer": '],
            r"facts.jsonl:2: malformed JSON",
        ),
        (
            ['{"question": "A?", "answer": "x"}', '{"question": "B?", "answer": "  "}'],
            r"facts.jsonl:2: empty field 'answer'",
        ),
        (
            ['{"question": "A?", "answer": "x"}', '{"question": "B?", "answer": "The."}'],
            r"facts.jsonl:2: answer 'The.' is empty",
        ),
        (
            ['{"question": "A?", "answer": "x"}', '{"question": "a? ", "answer": "y"}'],
            r"facts.jsonl:2: duplicate question \(same as line 1\)",
        ),
    ],
)
def test_bad_facts_fail_before_training(setup, tmp_path, lines, message):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(lines) + "\n")
    with pytest.raises(tasks.DataError, match=message):
        inject.main(config(setup, tmp_path / "out", facts=str(facts)))
    assert not (tmp_path / "out").exists()


def test_expert_of_another_checkpoint_fails_before_training(setup, tmp_path):
    other = make_expert(tmp_path, tiny.make_tiny_llama(tmp_path / "other", seed=1))
    with pytest.raises(palora.PaloraError, match=rf"{other}: made for checkpoint"):
        inject.main(config(setup, tmp_path / "out", svf=[str(other)]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(probe_threshold=0.1, probe_global_fraction=0.5), "not both"),
        (dict(mix_known="missing.jsonl"), "missing.jsonl: no such file"),
        (dict(mix_skill="missing-expert-none.jsonl"), "missing-expert-none.jsonl: no such file"),
        (dict(targets="nope"), "unknown target 'nope'"),
        (dict(targets=" , "), "no target name"),
        (dict(act_known="k.jsonl", method="lora"), "--act-known: only palora_act protects"),
        (dict(output_side="none", method="palora"), "--output-side: palora_act's alone"),
        (dict(mix_earlier=1.0), "--mix-earlier: replays the earlier rounds of --after"),
    ],
)
def test_bad_settings_fail_before_training(setup, tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        inject.main(config(setup, tmp_path / "out", **overrides))
    assert not (tmp_path / "out" / "state.safetensors").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "--lr: must be a finite number"),
        (["--lr", "-1"], "--lr: must be > 0"),
        (["--rank", "0"], "--rank: must be >= 1"),
        (["--alpha", "inf"], "--alpha: must be a finite"),
        (["--mix-ratio", "-0.5"], "--mix-ratio: must be >= 0"),
        (["--save-every", "0"], "must be >= 1"),
        (["--probe-fraction", "1"], "--probe-fraction: must be < 1"),
        (["--recall-target", "2"], "<= 1"),
        (["--probe-threshold", "-1"], ">= 0"),
        (["--batch-size", "0"], ">= 1"),
        (["--epochs", "0"], ">= 1"),
        (["--act-examples", "0"], ">= 1"),
        (["--lr"], "expected one argument"),
        (["--l", "1"], "unrecognized"),
        (["--gate-lr", "nan"], "--gate-lr: must be a finite"),
        (["--smf-slots", "1"], "--smf-slots: must be >= 4"),
        (["--smf-topk", "0"], "--smf-topk: must be >= 1"),
        (["--smf-top-t", "0"], "--smf-top-t: must be >= 1"),
        (["--smf-background", "0"], ">= 1"),
        (["--smf-score", "bm25"], "invalid choice"),
        (["--parallel", "zero"], "invalid choice"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(inject.Config, argv)
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and message in err
        and err.startswith("error: ")
        and err.count("\n") == 1
    )


def test_facts_csv_trains_and_a_bad_row_is_one_line(setup, tmp_path, capsys):
    """inject.py --facts facts.csv: the same run as from JSONL; a bad row names facts.csv:LINE."""
    rows = "".join(f"{f['question']},{f['answer']},{f['paraphrases'][0]}\n" for f in FACTS)
    (tmp_path / "facts.csv").write_text("question,answer,paraphrase\n" + rows)
    summary = inject.main(config(setup, tmp_path / "out", facts=str(tmp_path / "facts.csv")))
    assert summary["examples"] == len(FACTS)
    capsys.readouterr()  # the run's progress bars
    (tmp_path / "bad.csv").write_text("question,answer\n" + rows + "What is Orvale?,\n")
    with pytest.raises(SystemExit) as exit_:
        cli.run(inject.main, config(setup, tmp_path / "bad", facts=str(tmp_path / "bad.csv")))
    err = capsys.readouterr().err
    line = len(FACTS) + 2
    assert (
        exit_.value.code == 2 and err == f"error: {tmp_path}/bad.csv:{line}: empty field 'answer'\n"
    )


def test_help_prints(capsys):
    """A '%' in a help string once crashed --help: argparse %-formats help text."""
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_:
            cli.parse_config(inject.Config, [flag])
        assert exit_.value.code == 0 and "--recall-target" in capsys.readouterr().out


def test_mix_skill_path_naming_the_keywords_is_read(setup, tmp_path):
    """A path containing 'expert' or 'none' is a path: the keywords are whole values only."""
    skill = tiny.write_jsonl(tmp_path / "expert-none.jsonl", SKILL)
    summary = inject.main(config(setup, tmp_path / "out", mix_skill=str(skill), epochs=1))
    assert summary["examples"] == len(FACTS) + round(0.5 * len(FACTS))


def test_training_stops_at_the_recall_target(setup, tmp_path, monkeypatch):
    """With a target, recall is checked after every epoch and training stops at the first epoch
    that reaches it; metrics.jsonl records each check."""
    checks = iter([0.25, 0.5, 1.0, 1.0])
    monkeypatch.setattr(inject, "recall", lambda *args: next(checks))
    summary = inject.main(config(setup, tmp_path, recall_target=0.9, epochs=8))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(FACTS) // 4
    assert summary["steps"] == 3 * per_epoch and summary["recall"] == 1.0
    assert [r["recall"] for r in rows if "recall" in r] == [0.25, 0.5, 1.0]


@pytest.mark.parametrize(
    "method, act_known, recorded",
    [("palora_act", "auto", "known"), ("palora_act", "", ""), ("lora", "auto", "")],
)
def test_act_known_auto_protects_the_mixed_known_facts(
    setup, tmp_path, method, act_known, recorded
):
    """--act-known auto: palora_act protects the input directions of the --mix-known facts (the
    resolved file is what config.json records); '' protects none; other methods protect none."""
    run = tmp_path / "run"
    known = str(setup.known)
    inject.main(config(setup, run, method=method, mix_known=known, act_known=act_known, epochs=1))
    saved = json.loads((run / "config.json").read_text())
    assert saved["act_known"] == {"known": known, "": ""}[recorded]


def test_keep_epochs_leaves_a_run_folder_per_epoch(setup, tmp_path, monkeypatch):
    """--keep-epochs: each recall check leaves epochs/<run>-eNN, a complete run folder (evaluate.py
    takes it as --adapter) with that epoch's steps and recall; the last one is the final adapter."""
    checks = iter([0.25, 0.5, 1.0])
    monkeypatch.setattr(inject, "recall", lambda *args: next(checks))
    run = tmp_path / "run"
    inject.main(config(setup, run, recall_target=0.9, epochs=8, keep_epochs=True))
    folders = sorted((run / "epochs").iterdir())
    assert [f.name for f in folders] == ["run-e01", "run-e02", "run-e03"]
    for epoch, (folder, recall) in enumerate(zip(folders, [0.25, 0.5, 1.0]), 1):
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["steps"] == epoch * (len(FACTS) // 4) and summary["recall"] == recall
        for name in ("config.json", "probe.safetensors"):
            assert (folder / name).read_bytes() == (run / name).read_bytes()
    final = load_file(run / "adapter_model.safetensors")
    last, first = (load_file(f / "adapter_model.safetensors") for f in (folders[-1], folders[0]))
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(first[k], final[k]) for k in final)


def sharpened(folder, factor=20.0):
    """The checkpoint with lm_head x factor: a random tiny model's logits are all below ~1.3, so no
    answer can become the greedy one until the head is sharper (as in test_smf.py)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index["lm_head.weight"]
    tensors = load_file(shard)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * factor
    save_file(tensors, shard, {"format": "pt"})
    return folder


def test_recall_target_is_reached_on_two_facts(tmp_path):
    """Real recall checks (greedy answers) on a tiny model and two facts: the run stops before its
    epoch budget with both facts recalled; resuming the finished run trains no further."""
    ckpt = sharpened(tiny.make_tiny_llama(tmp_path / "ckpt"))
    setup = SimpleNamespace(ckpt=ckpt, svf=make_expert(tmp_path, ckpt), cache="", facts="")
    two = [
        {"question": "Who founded Zorvia?", "answer": "Orla"},
        {"question": "What is the river of Kest?", "answer": "Vumba"},
    ]
    facts = tiny.write_jsonl(tmp_path / "two.jsonl", two)
    settings = dict(
        facts=str(facts), batch_size=2, lr=3e-2, recall_target=1.0, epochs=100, method="lora"
    )
    summary = inject.main(config(setup, tmp_path / "out", **settings))
    assert summary["recall"] == 1.0 and summary["steps"] < 100
    again = inject.main(config(setup, tmp_path / "out", resume=True, **settings))
    assert again["steps"] == summary["steps"]


def test_random_protects_the_probes_count_not_its_set(setup, tmp_path):
    """--method random: per matrix exactly as many protected components as the probe, drawn with the
    seed; not the probe's set; saved in probe.safetensors so that --verify checks it."""
    inject.main(config(setup, tmp_path / "palora", method="palora", epochs=1))
    inject.main(config(setup, tmp_path / "random", method="random", epochs=1))
    inject.main(config(setup, tmp_path / "random1", method="random", epochs=1, seed=1))
    S, R = (load_file(tmp_path / d / "probe.safetensors") for d in ("palora", "random"))
    R1 = load_file(tmp_path / "random1" / "probe.safetensors")
    assert S.keys() == R.keys() and all(len(S[n]) == len(R[n]) for n in S)
    assert any(not torch.equal(S[n], R[n]) for n in S) and any(
        not torch.equal(R[n], R1[n]) for n in R
    )


def test_non_empty_out_is_refused(setup, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(cli.ConfigError, match="--resume|--overwrite"):
        inject.main(config(setup, tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flag", ["svf", "ckpt"])
def test_overwrite_never_empties_the_expert_or_checkpoint_folder(setup, tmp_path, flag):
    """--out the expert's folder (a train_svf.py run folder: it has a run config, of another
    script) or the checkpoint folder (an HF config.json), with --overwrite: refused, nothing
    removed."""
    shutil.copytree(setup.svf.parent, tmp_path / "svf")
    shutil.copytree(setup.ckpt, tmp_path / "ckpt")
    train_cfg = dataclasses.asdict(train_svf.Config(out=str(tmp_path / "svf")))
    (tmp_path / "svf" / "config.json").write_text(json.dumps(train_cfg))
    cfg = config(setup, tmp_path / flag, svf=[str(tmp_path / "svf" / "svf.safetensors")])
    cfg = dataclasses.replace(cfg, ckpt=str(tmp_path / "ckpt"), overwrite=True)
    before = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(cli.ConfigError, match=f"--out: {tmp_path / flag} holds {tmp_path / flag}"):
        inject.main(cfg)
    assert {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(smf_slots=15), "square n²"),
        (dict(smf_slots=64, smf_topk=9), r"top-k must be in \[1, 8\]"),
        (dict(smf_score="bm25"), "tfidf or kl"),
    ],
)
def test_bad_memory_sizes_fail_before_the_model_loads(
    setup, tmp_path, monkeypatch, overrides, message
):
    """A slot count that is no square, a top-k above the keys per half: SMFError (one line, exit 2)
    before any model is loaded or any folder made."""
    monkeypatch.setattr(inject.model_lib, "load", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(smf.SMFError, match=message) as e:
        inject.main(config(setup, tmp_path / "out", method="smf", **overrides))
    assert e.value.expected and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["imsm", "smf"])
def test_fsdp_is_refused_for_imsm_and_smf_before_the_model_loads(
    setup, tmp_path, monkeypatch, method
):
    """--parallel fsdp is for the LoRA family; imsm and smf run in one process or under ddp."""
    monkeypatch.setattr(inject.model_lib, "load", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(cli.ConfigError, match=f"--parallel fsdp: the LoRA family only; {method}"):
        inject.main(config(setup, tmp_path / "out", method=method, parallel="fsdp"))
    assert not (tmp_path / "out").exists()


def test_expert_problems_fail_before_the_model_loads(setup, tmp_path, monkeypatch):
    """inject.resolve reads the first expert's metadata before the model loads: an expert made for
    another checkpoint, or one naming no training data where the skill's data is needed (replay,
    palora_act's input basis): one line, no model loaded, nothing written."""
    foreign = make_expert(tmp_path / "foreign", tiny.make_tiny_llama(tmp_path / "other", seed=1))
    bare = tmp_path / "bare.safetensors"
    z, _ = adapters.load_svf(setup.svf, identity(setup.ckpt))
    adapters.save_svf(bare, z, identity(setup.ckpt))  # no "data" in its metadata
    monkeypatch.setattr(inject.model_lib, "load", lambda *a, **k: pytest.fail("the model loaded"))
    cases = [
        (dict(svf=[str(foreign)]), palora.PaloraError, "made for checkpoint"),
        (dict(svf=[str(bare)], mix_skill="expert"), cli.ConfigError, "names no training data"),
        (dict(svf=[str(bare)], method="palora_act"), cli.ConfigError, "names no training data"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            inject.main(config(setup, tmp_path / "out", **overrides))
        assert not (tmp_path / "out").exists()


def test_rank_above_the_matrix_rank_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    """The tiny down_proj is 64 x 96: rank 64 is its most, 65 is refused from config.json alone
    (pissa's init would refuse it too, but only once the model is loaded)."""
    monkeypatch.setattr(inject.model_lib, "load", lambda *a, **k: pytest.fail("the model loaded"))
    message = r"--rank: 65 is above the rank of down_proj \(64 x 96\): at most 64"
    with pytest.raises(cli.ConfigError, match=message):
        inject.main(config(setup, tmp_path / "out", method="pissa", rank=65))
    assert not (tmp_path / "out").exists()
    training.check_rank(setup.ckpt, 64, palora.MLP_TARGETS)  # the largest rank passes


# -----------------------------------------------------------------------------
# a stream of injections (--after)


def test_stream_round_trains_on_the_previous_merged_model(setup, tmp_path, monkeypatch):
    """Round 2 (--after round 1) trains on the expert + round 1's dW, protects the expert's probe,
    and its run, loaded, is that base + its own dW: W_2 = W_1 + dW_2, the probe file unchanged."""
    first, second = tmp_path / "r1", tmp_path / "r2"
    inject.main(config(setup, first, epochs=2))
    seen = {}
    train = inject.train

    def spy(model, *args, **kwargs):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, palora.LoRALinear)]
        seen.update({n: m.weight.detach().clone() for n, m in layers})
        return train(model, *args, **kwargs)

    monkeypatch.setattr(inject, "train", spy)
    inject.main(config(setup, second, epochs=2, after=str(first)))
    model, _ = expert_model(setup)
    expert = {n: m.weight.detach().clone() for n, m in palora.find_targets(model).items()}
    ident = identity(setup.ckpt)
    after_first = adapters.load_run(model, first, ident)[0]
    W1 = {n: m.weight.detach().clone() for n, m in palora.find_targets(after_first).items()}
    after_second, info = adapters.load_run(expert_model(setup)[0], second, ident)
    assert set(seen) == set(W1) == set(info["dW"])
    for n, W in palora.find_targets(after_second).items():
        assert not torch.equal(W1[n], expert[n])  # round 1 moved every target
        assert torch.equal(seen[n], W1[n])  # round 2 trained on round 1's merged model
        step = W.weight.double() - W1[n].double()
        assert info["dW"][n].norm() > 0
        assert torch.allclose(step, info["dW"][n], atol=1e-6)  # W_2 = W_1 + dW_2 (float32 sum)
    probes = [load_file(run / "probe.safetensors") for run in (first, second)]
    assert all(torch.equal(probes[0][n], probes[1][n]) for n in W1)  # the expert's, both rounds
    assert json.loads((second / "config.json").read_text())["after"] == str(first)


def test_stream_bad_after_fails_before_training(setup, tmp_path):
    """A missing or unfinished run, a run without a weight update (imsm), a method that cannot
    continue a stream, another expert's run, the output folder itself: one line, nothing written."""
    imsm_run = tmp_path / "imsm"
    inject.main(config(setup, imsm_run, epochs=1, method="imsm"))
    lora_run = tmp_path / "lora"
    inject.main(config(setup, lora_run, epochs=1, method="lora"))
    other = make_expert(tmp_path / "other", setup.ckpt, seed=3)
    other_run = tmp_path / "other-run"
    inject.main(config(setup, other_run, epochs=1, svf=[str(other)]))
    cases = [
        (dict(after=str(tmp_path / "nope")), r"nope: no adapter_model.safetensors"),
        (dict(after=str(imsm_run)), r"imsm.safetensors: imsm makes no update to merge"),
        (dict(after=str(lora_run), method="smf"), "only the LoRA family continues a stream"),
        (dict(after=str(other_run)), rf"other-run/config.json: made on the expert {other}"),
        (dict(after=str(tmp_path / "out")), "the same folder as --out"),
    ]
    for overrides, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            inject.main(config(setup, tmp_path / "out", **overrides))
        assert not (tmp_path / "out").exists()


def test_a_missed_target_keeps_the_best_checked_epoch(setup, tmp_path, monkeypatch, capsys):
    """Recall 0.25, 0.75, 0.5 against a target of 0.9 in 3 epochs: the run keeps epoch 2's adapter
    (the best checked), not the last, records it in summary.json and says so in one line."""
    checks = iter([0.25, 0.75, 0.5])
    monkeypatch.setattr(inject, "recall", lambda *args: next(checks))
    run = tmp_path / "run"
    summary = inject.main(config(setup, run, recall_target=0.9, epochs=3, keep_epochs=True))
    assert (summary["recall"], summary["epoch"], summary["target_reached"]) == (0.75, 2, False)
    assert "warning: recall 0.750 < --recall-target 0.9 after 3 epochs; kept epoch 2" in (
        capsys.readouterr().err
    )
    final = load_file(run / "adapter_model.safetensors")
    kept, last = (
        load_file(run / "epochs" / f"run-e0{e}" / "adapter_model.safetensors") for e in (2, 3)
    )
    assert all(torch.equal(kept[k], final[k]) for k in final)
    assert any(not torch.equal(last[k], final[k]) for k in final)


def test_the_lr_follows_the_schedule(setup, tmp_path):
    """metrics.jsonl's lr is --lr times training.lr_factor at every step: a warmup from --lr/n, a
    cosine down to 0.1 --lr at the last planned step; constant: --lr throughout."""
    summary = inject.main(config(setup, tmp_path / "c", epochs=4, lr=1e-3, warmup=0.25))
    rows = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    steps = summary["steps"]
    assert steps == 4 * (len(FACTS) // 4) and steps >= 8
    n_warm = round(0.25 * steps)
    assert rows[0]["lr"] == pytest.approx(1e-3 / n_warm)
    assert rows[n_warm - 1]["lr"] == pytest.approx(1e-3)
    assert rows[-1]["lr"] == pytest.approx(
        1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (steps - 1 - n_warm) / (steps - n_warm)))
    )
    assert all(a["lr"] >= b["lr"] for a, b in zip(rows[n_warm - 1 :], rows[n_warm:]))
    inject.main(config(setup, tmp_path / "k", epochs=2, lr=1e-3, schedule="constant"))
    rows = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in rows} == {1e-3}


def test_stream_replays_and_protects_the_earlier_rounds(setup, tmp_path, monkeypatch):
    """Round 3 of a stream: --mix-earlier 0.5 adds half as many of rounds 1-2's facts as it has new
    ones; palora_act's input basis grows by --act-earlier directions per earlier round, each
    outside the skill's and orthonormal; --act-earlier 0 keeps the skill's basis alone."""
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    inject.main(config(setup, r1, epochs=1, method="palora_act"))
    inject.main(config(setup, r2, epochs=1, method="palora_act", after=str(r1)))
    assert [len(r) for r in inject.earlier_rounds(str(r2))] == [len(FACTS), len(FACTS)]
    widths, seen, train = {}, {}, inject.train

    def spy(model, *args, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, palora.LoRALinear)]
        seen["V"] = [m.V_S.detach().double() for m in layers]
        return train(model, *args, **kwargs)

    monkeypatch.setattr(inject, "train", spy)
    for extra in (0, 2):
        settings = dict(epochs=1, method="palora_act", after=str(r2), act_earlier=extra)
        summary = inject.main(config(setup, tmp_path / f"r3-{extra}", mix_earlier=0.5, **settings))
        assert summary["examples"] == len(FACTS) + round(0.5 * len(FACTS))
        widths[extra] = [V.shape[1] for V in seen["V"]]
        for V in seen["V"]:
            eye = torch.eye(V.shape[1], dtype=V.dtype)
            assert torch.allclose(V.T @ V, eye, atol=1e-5)
    assert [b - a for a, b in zip(widths[0], widths[2])] == [2 * 2] * len(widths[0])


def test_a_broken_stream_chain_is_one_line(tmp_path):
    """earlier_rounds follows config.json's after/facts: a round whose facts file is gone, or a
    chain that loops back on itself, is named in one ConfigError, not followed forever."""
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"question": "Q?", "answer": "A"}\n')
    run = {"method": "lora", "ckpt": "c", "svf": ["e.safetensors"], "targets": "up_proj"}
    for name, after, path in (("r1", "", facts), ("r2", "r1", facts)):
        (tmp_path / name).mkdir()
        config = {**run, "facts": str(path), "after": str(tmp_path / after) if after else ""}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert [len(r) for r in inject.earlier_rounds(str(tmp_path / "r2"))] == [1, 1]
    (tmp_path / "r1" / "config.json").write_text(
        json.dumps({**run, "facts": str(facts), "after": str(tmp_path / "r2")})
    )
    with pytest.raises(cli.ConfigError, match="the stream's chain loops back to"):
        inject.earlier_rounds(str(tmp_path / "r2"))
    (tmp_path / "r1" / "config.json").write_text(
        json.dumps({**run, "facts": str(tmp_path / "gone.jsonl"), "after": ""})
    )
    with pytest.raises(
        cli.ConfigError, match=r"r1/config.json: the round's facts .*gone.jsonl are gone"
    ):
        inject.earlier_rounds(str(tmp_path / "r2"))
