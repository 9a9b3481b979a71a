"""Tests for inject.py on a tiny random Llama (tests/tiny.py) and a random SVF expert: every method trains and changes
the answers to the injected facts; PALoRA's merged model keeps every protected singular triplet of every target
matrix; --resume ends with the same adapter; bad inputs fail before training, naming the file (and line). CPU, seconds.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import inject
import model as model_lib
import palora
import tasks
import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = [{"question": f"What is the capital of Zorvia {i}?", "answer": f"Kalmar {i}", "paraphrases": [f"Zorvia {i}: capital?"]}
         for i in range(8)]
SKILL = [{"question": f"What is {i} + {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"} for i in range(12)]



def make_expert(root, ckpt, seed=0):
    """A random SVF expert (z = 1 + 0.5 N(0, 1): multipliers far from 1) saved as train_svf.py saves one."""
    model, _ = model_lib.load(ckpt)
    g = torch.Generator().manual_seed(seed)
    z = {n: 1 + 0.5 * torch.randn(len(s), generator=g) for n, (_, s, _) in palora.compute_svds(model, cache_dir=None).items()}
    (root / "svf").mkdir(parents=True, exist_ok=True)
    palora.save_svf(root / "svf" / "svf.safetensors", z, {"checkpoint": model.identity, "data": str(root / "skill.jsonl")})
    return root / "svf" / "svf.safetensors"



@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A tiny checkpoint with an SVF expert, facts, skill examples and known facts; shared by test_evaluate.py."""
    root = tmp_path_factory.mktemp("inject")
    ckpt = tiny.make_tiny_llama(root / "ckpt")
    return SimpleNamespace(root=root, ckpt=ckpt, svf=make_expert(root, ckpt), cache=root / "cache",
                           facts=tiny.write_jsonl(root / "facts.jsonl", FACTS), skill=tiny.write_jsonl(root / "skill.jsonl", SKILL),
                           known=tiny.write_jsonl(root / "known.jsonl", FACTS[:4]))


def config(setup, out, **overrides) -> inject.Config:
    """Strong enough to move greedy answers of a random model in a few steps: lr 1e-2, 8 epochs of 2 steps."""
    settings = dict(ckpt=str(setup.ckpt), svf=[str(setup.svf)], facts=str(setup.facts), rank=4, alpha=8.0, epochs=8,
                    lr=1e-2, batch_size=4, out=str(out), svd_cache=str(setup.cache), save_every=3, device="cpu", mix_skill="none")
    return inject.Config(**{**settings, **overrides})


def expert_model(setup):
    """The base checkpoint with the SVF expert merged: the model every adapter is trained on."""
    model, tokenizer = model_lib.load(setup.ckpt)
    z, _ = palora.load_svf(setup.svf, model=model)
    palora.add_svf(model, {n: svd for n, svd in palora.compute_svds(model, cache_dir=setup.cache).items() if n in z}, z)
    return palora.merge_svf(model), tokenizer


def answers(setup, run=None):
    model, tokenizer = expert_model(setup)
    if run is not None:
        palora.load_peft(model, run)
        palora.merge_lora(model)
    return tasks.answer(model, tokenizer, [f["question"] for f in FACTS], max_new_tokens=6, batch_size=8)


# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize("method", list(palora.METHODS))
def test_each_method_learns_and_changes_answers(setup, tmp_path, method):
    summary = inject.main(config(setup, tmp_path, method=method))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == summary["steps"] == 8 * len(FACTS) // 4
    assert sum(losses[-2:]) < sum(losses[:2])  # the last epoch's loss below the first's
    assert answers(setup, tmp_path) != answers(setup)
    for name in ("adapter_config.json", "adapter_model.safetensors", "probe.safetensors", "config.json", "summary.json"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "config.json").read_text())["svf"] == [str(setup.svf)]  # resolved and saved


def test_default_replay_mixes_in_the_experts_training_data(setup, tmp_path):
    """mix_skill="expert" reads the expert's metadata "data" (the skill set it was trained on): 0.5 per fact."""
    summary = inject.main(config(setup, tmp_path, mix_skill="expert", epochs=1))
    assert summary["examples"] == len(FACTS) + round(0.5 * len(FACTS))
    assert json.loads((tmp_path / "config.json").read_text())["mix_skill"] == str(setup.skill)


def test_palora_keeps_every_protected_triplet(setup, tmp_path):
    """On the whole merged model: for every target matrix W'' = W' + dW and every i in S, W'' v_i = s_i m_i u_i and
    u_iᵀ W'' = s_i m_i v_iᵀ, within float32 rounding of a merge (2 (R + in) u ||W||₂, palora.merge_svf's bound)."""
    inject.main(config(setup, tmp_path, method="palora"))
    model, _ = expert_model(setup)
    expert = {n: m.weight.detach().clone() for n, m in palora.find_targets(model).items()}
    palora.load_peft(model, tmp_path)
    palora.merge_lora(model)
    base, _ = model_lib.load(setup.ckpt)
    svds = palora.compute_svds(base, cache_dir=setup.cache)
    z, _ = palora.load_svf(setup.svf, model=base)
    protected = load_file(tmp_path / "probe.safetensors")
    assert set(protected) == set(expert) and len(expert) == 2 * 3  # every layer, every MLP matrix
    moved = 0.0
    for name, S in protected.items():
        assert S.dtype == torch.int64 and len(S) == round(0.5 * len(svds[name][1])) and torch.all(S[1:] > S[:-1])
        U, s, Vh = (t.double() for t in svds[name])
        sm = (s * palora.multiplier(s, z[name].double()))[S]  # the expert's singular values on S
        W = model.get_submodule(name).weight.double()
        bound = 2 * (len(s) + W.shape[1]) * palora.U32 * torch.linalg.matrix_norm(W, 2)
        assert (W @ Vh[S].T - U[:, S] * sm).norm() <= bound  # W'' v_i = s_i m_i u_i, (out, in) @ (in, k)
        assert (U[:, S].T @ W - sm[:, None] * Vh[S]).norm() <= bound  # u_iᵀ W'' = s_i m_i v_iᵀ, (k, out) @ (out, in)
        moved = max(moved, ((W - expert[name].double()).norm() / expert[name].double().norm()).item())
    assert moved > 1e-3  # the adapter did change the weights, off the protected subspace


def test_resume_gives_the_same_adapter(setup, tmp_path, monkeypatch):
    inject.main(config(setup, tmp_path / "whole", epochs=4))

    def crash(loss, step):  # an interrupted run: killed at step 5, after the checkpoint at step 3
        if step == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(inject, "check_finite", crash)
    with pytest.raises(KeyboardInterrupt):
        inject.main(config(setup, tmp_path / "cut", epochs=4))
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    inject.main(config(setup, tmp_path / "cut", epochs=4, resume=True))
    whole, cut = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_default_svf_is_the_newest_for_this_checkpoint(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(inject, "RUNS", tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="train_svf.py"):
        inject.main(config(setup, tmp_path / "out", svf=[]))
    (tmp_path / "runs" / "svf-mine").mkdir(parents=True)
    (tmp_path / "runs" / "svf-mine" / "svf.safetensors").write_bytes(setup.svf.read_bytes())
    make_expert(tmp_path / "runs" / "other", tiny.make_tiny_llama(tmp_path / "other", seed=1))
    (tmp_path / "runs" / "other" / "svf").rename(tmp_path / "runs" / "svf-other")  # newer, for another checkpoint
    assert inject.latest_svf(model_lib.load(setup.ckpt)[0].identity, "tiny") == tmp_path / "runs" / "svf-mine" / "svf.safetensors"


# -----------------------------------------------------------------------------
# bad input: a clear error naming the file (and line), before training starts


@pytest.mark.parametrize("lines, message", [
    (['{"question": "A?", "answer": "x"}', '{"question": "B?", "answer": '], r"facts.jsonl:2: malformed JSON"),
    (['{"question": "A?", "answer": "x"}', '{"question": "B?", "answer": "  "}'], r"facts.jsonl:2: empty field 'answer'"),
    (['{"question": "A?", "answer": "x"}', '{"question": "B?", "answer": "The."}'], r"facts.jsonl:2: answer 'The.' is empty"),
    (['{"question": "A?", "answer": "x"}', '{"question": "a? ", "answer": "y"}'], r"facts.jsonl:2: duplicate question \(same as line 1\)"),
])
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


@pytest.mark.parametrize("overrides, message", [
    (dict(rank=0), "--rank must be positive"), (dict(lr=-1.0), "--lr must be positive"),
    (dict(probe_fraction=1.0), "probe-fraction"), (dict(probe_threshold=0.1, probe_global_fraction=0.5), "not both"),
    (dict(mix_known="missing.jsonl"), "missing.jsonl: no such file"), (dict(targets="nope"), "unknown target 'nope'"),
])
def test_bad_settings_fail_before_training(setup, tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        inject.main(config(setup, tmp_path / "out", **overrides))
    assert not (tmp_path / "out" / "state.safetensors").exists()
