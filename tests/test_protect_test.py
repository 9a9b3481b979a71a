"""experiments/protect_test.py on a tiny random model: revert and shield change the expert as
stated (nothing for an empty set or eps 0; the update's size and its orthogonality to each
method's own LoRA bases), the first-order scores are the hand-computed gradient's, the NLL is the
training loss's, bad flags fail before any model loads, and a whole run writes its table."""

import json
import sys
from pathlib import Path

import pytest
import torch

import cli
import palora
import tiny
from runs import SKILL
from training import answer_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import protect_test as pt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def config(setup, tmp_path, **overrides) -> pt.Config:
    confirm = tiny.write_jsonl(tmp_path / "confirm.jsonl", SKILL[:4])
    ood = tiny.write_jsonl(tmp_path / "confirm_ood.jsonl", SKILL[4:7])
    settings = dict(
        ckpt=str(setup.ckpt),
        svf=str(setup.svf),
        reasoning=str(confirm),
        reasoning_ood=str(ood),
        svd_cache=setup.cache,
        score_cache="",
        out=str(tmp_path / "out"),
        act_known=str(setup.known),
        eps="0.2",
        draws=2,
        probe_examples=8,
        probe_batch=4,
        max_new_tokens=4,
        device="cpu",
    )
    return pt.Config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    plan = pt.check(config(setup, tmp_path_factory.mktemp("protect")))
    return plan, *pt.prepare(plan)  # plan, model, tokenizer, lab


# -----------------------------------------------------------------------------
# revert


def test_revert_of_no_component_is_the_expert_exactly(built):
    lab = built[-1]
    none = torch.zeros(0, dtype=torch.long)
    for n, W in lab.expert.items():
        assert torch.equal(pt.revert_weight(lab.svds[n], lab.z[n], none).to(W), W)


def test_revert_sets_m_to_one_on_the_set_and_keeps_the_rest(built):
    lab = built[-1]
    for n, S in lab.sets["probe"][0].items():
        U, s, Vh = lab.svds[n]
        sm = s * palora.multiplier(s, lab.z[n])  # the expert's s ⊙ m
        got = (U.T @ pt.revert_weight(lab.svds[n], lab.z[n], S) @ Vh.T).diagonal()
        want = sm.clone()
        want[S] = s[S]
        assert torch.allclose(got, want, atol=1e-4 * s.max().item())
        assert not torch.allclose(got[S], sm[S], atol=1e-2)  # the set did change


# -----------------------------------------------------------------------------
# shield


@pytest.mark.parametrize("name", pt.SHIELDED)
def test_shield_of_size_zero_is_the_expert_exactly(built, name):
    lab = built[-1]
    new = pt.weights(lab, pt.Case("shield", name, 0.0, 1))
    assert all(torch.equal(new[n].to(W), W) for n, W in lab.expert.items())


@pytest.mark.parametrize("name", pt.SHIELDED)
def test_shield_update_has_size_eps_and_misses_the_protected_bases(built, name):
    lab, eps = built[-1], 0.2
    case = pt.Case("shield", name, eps, 1)
    new = pt.weights(lab, case)
    for n, W in lab.expert.items():
        dW = (new[n] - W).double()
        assert dW.norm() / W.double().norm() == pytest.approx(eps, rel=1e-5)
        U_S, V_S = pt.sides(n, lab.svds[n], lab.sets, lab.inputs, case)
        if U_S is not None:
            assert (U_S.double().T @ dW).norm() / dW.norm() < 1e-5
        if V_S is not None:
            assert (dW @ V_S.double()).norm() / dW.norm() < 1e-5
        if name == "none":  # G itself, rescaled
            G = pt.random_update(W.shape, 0, 1, n).double()
            assert torch.allclose(dW, G * (dW.norm() / G.norm()), atol=1e-6)


@pytest.mark.parametrize(
    "method, name", [("palora", "probe"), ("topk", "topk"), ("random", "random")]
)
def test_sides_are_the_bases_the_methods_lora_holds(built, method, name):
    """inject.py's make_base: same_count(method, S, expert SVDs, seed) and palora.METHODS'
    init; draw d of the random set is seed d's."""
    lab = built[-1]
    _assert_same_bases(lab, method, name, palora.same_count)


def test_palora_act_sides_are_the_probe_output_side_and_v_act(built):
    lab = built[-1]
    _assert_same_bases(lab, "palora_act", "palora_act", lambda m, S, e, seed: S)


def test_act_other_is_palora_act_with_another_input_basis(built):
    """The control keeps palora_act's output side and swaps the input basis for one from other
    text, as many directions per weight."""
    lab = built[-1]
    for n in lab.expert:
        act = pt.sides(
            n, lab.svds[n], lab.sets, lab.inputs, pt.Case("shield", "palora_act", 0.1, 0)
        )
        other = pt.sides(
            n, lab.svds[n], lab.sets, lab.inputs, pt.Case("shield", "act_other", 0.1, 0)
        )
        assert torch.equal(act[0], other[0]) and act[1].shape == other[1].shape
        assert torch.equal(other[1], lab.inputs["act_other"][n])
        assert not torch.allclose(act[1].abs(), other[1].abs(), atol=1e-3)


def _assert_same_bases(lab, method, name, protected_of):
    S = lab.sets["probe"][0]
    expert = palora.expert_svds(lab.svds, lab.z)
    protected = protected_of(method, S, expert, 1)
    g = torch.Generator().manual_seed(0)
    for n, W in lab.expert.items():
        V_act = lab.inputs["palora_act"][n] if name == "palora_act" else None
        target = palora.Target(W, expert[n], protected[n], V_act)
        layer = palora.METHODS[method](target, 2, 4.0, g)
        U_S, V_S = pt.sides(n, lab.svds[n], lab.sets, lab.inputs, pt.Case("shield", name, 0.1, 1))
        assert torch.equal(U_S, layer.U_S) and torch.equal(V_S, layer.V_S)


def test_shield_draws_differ_and_repeat(built):
    lab = built[-1]
    n, W = next(iter(lab.expert.items()))
    assert torch.equal(pt.random_update(W.shape, 0, 1, n), pt.random_update(W.shape, 0, 1, n))
    assert not torch.equal(pt.random_update(W.shape, 0, 1, n), pt.random_update(W.shape, 0, 2, n))
    assert torch.linalg.matrix_rank(pt.random_update(W.shape, 3, 0, n)) == 3


# -----------------------------------------------------------------------------
# first-order probes


def test_taylor_and_fisher_are_the_hand_computed_gradients():
    """L_b = Σ y ⊙ t_b, y = ((x Vhᵀ) ⊙ (s ⊙ m)) Uᵀ: dL/dm_i = s_i Σ_rows (x Vhᵀ)_i (t U)_i, and with
    m = z c, c = Σs / Σ(s ⊙ z): dL/dz_j = c a_j - c s_j (a · z) / Σ(s ⊙ z)."""
    g = torch.Generator().manual_seed(0)
    U, s, Vh = palora.svd(torch.randn(5, 4, generator=g, dtype=torch.float64))
    z0 = 1 + 0.3 * torch.randn(4, generator=g, dtype=torch.float64)
    layer = palora.SVFLinear(U, s, Vh, z0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    batches = [(rand(3, 4), rand(3, 5)), (rand(2, 4), rand(2, 5))]  # (x, t): 3 rows, then 2
    losses = [lambda x=x, t=t: (layer(x) * t).sum() for x, t in batches]
    grads = pt.z_gradients({"w": layer.z}, losses)
    c = s.sum() / (s * z0).sum()
    hand = []
    for x, t in batches:
        a = s * ((x @ Vh.T) * (t @ U)).sum(0)
        hand.append(c * a - c * s * (a @ z0) / (s * z0).sum())
    for got, want in zip(grads, hand):
        assert torch.allclose(got["w"], want, atol=1e-12)
    taylor = pt.taylor_scores(grads, {"w": layer.z})["w"]
    assert torch.allclose(taylor, ((hand[0] + hand[1]) / 2 * (z0 - 1)).abs(), atol=1e-12)
    fisher = pt.fisher_scores(grads)["w"]
    assert torch.allclose(fisher, (hand[0] ** 2 + hand[1] ** 2) / 2, atol=1e-12)


def test_first_order_sets_are_the_top_scores_of_the_probes_count(built):
    lab = built[-1]
    for name in ("taylor", "fisher"):
        for n, S in lab.sets["probe"][0].items():
            got = lab.sets[name][0][n]
            assert len(got) == len(S) and torch.equal(got, got.sort().values)
    scores = {"w": torch.tensor([0.1, 0.9, 0.5, 0.7])}
    assert pt.top_count(scores, {"w": torch.arange(2)})["w"].tolist() == [1, 3]


# -----------------------------------------------------------------------------
# the skill measure, the flags, a whole run


def test_answer_nll_is_each_items_training_loss(built):
    plan, model, tokenizer, _ = built
    records = plan.data["reasoning"]
    got = pt.answer_nll(model, tokenizer, records, batch_size=3)  # a padded batch, then one
    for r, nll in zip(records, got):
        ids, labels = pt.tasks.encode_example(tokenizer, r["question"], r["answer"], 128)
        with torch.no_grad():
            want = answer_loss(model, torch.tensor([ids]), torch.tensor([labels]), None)
        assert nll == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"eps": "0.1,-1"}, "--eps: each must be in (0, 10], got -1.0"),
        ({"eps": "a"}, "--eps: not a comma-separated list of numbers: 'a'"),
        ({"sets": "probe,nope"}, "--sets: unknown set 'nope'"),
        ({"sets": "none", "eps": ""}, "--sets and --eps leave nothing to test"),
        ({"reasoning": "missing.jsonl"}, "missing.jsonl: no such file"),
    ],
)
def test_bad_flags_fail_in_one_line_before_loading(setup, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.run(pt.check, config(setup, tmp_path, **flags))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_cases_count_each_evaluation():
    got = pt.cases(("probe", "random", "palora_act", "none"), [0.1, 0.3], 3)
    tests = [(c.test, c.set) for c in got]
    assert tests.count(("revert", "random")) == 3 and ("revert", "palora_act") not in tests
    assert len(got) == 1 + 1 + 3 + 2 * 4 * 3


def fake(strict: list, nll: float = 0.0) -> dict:
    return {s: {"strict": strict, "nll": [nll] * len(strict)} for s in pt.SPLITS}


def test_rows_compare_with_the_expert_and_random_draw_by_draw():
    done = [
        (pt.Case("expert", "expert", 0.0, 0), fake([1, 1, 0, 0], 1.0)),
        (pt.Case("shield", "random", 0.1, 0), fake([1, 1, 0, 0])),
        (pt.Case("shield", "random", 0.1, 1), fake([0, 0, 0, 0])),
        (pt.Case("shield", "probe", 0.1, 0), fake([1, 0, 0, 0], 2.0)),
        (pt.Case("shield", "probe", 0.1, 1), fake([0, 0, 0, 0], 3.0)),
    ]
    expert, random, probe = pt.rows(done)
    assert expert["reasoning"] == {"strict": 0.5, "nll": 1.0}
    assert probe["set"] == "probe" and probe["reasoning"]["strict"] == 0.125
    assert probe["reasoning"]["d_strict"]["per_draw"] == [-0.25, -0.5]
    assert probe["reasoning"]["d_nll"]["diff"] == pytest.approx(1.5)
    (pair,) = pt.against_random(done)
    assert pair["reasoning"]["d_strict"]["per_draw"] == [-0.25, 0.0]  # draw 0 with draw 0


def test_a_whole_run_writes_its_rows_and_table(setup, tmp_path):
    cfg = config(setup, tmp_path, sets="probe,random,none,all", draws=2, limit=2)
    result = pt.main(cfg)
    saved = json.loads((tmp_path / "out" / "protect_test.json").read_text())
    keys = [(r["test"], r["set"], r["draws"]) for r in saved["rows"]]
    assert keys == [
        ("expert", "expert", 1),
        ("revert", "probe", 1),
        ("revert", "random", 2),
        ("revert", "all", 1),
        ("shield", "probe", 2),
        ("shield", "random", 2),
        ("shield", "none", 2),
    ]
    assert len(saved["evaluations"]) == len(pt.cases(pt.parse_sets(cfg.sets), [0.2], 2))
    assert saved["sizes"]["probe"] == saved["sizes"]["random"] == saved["sizes"]["all"] / 2
    d = result["rows"][1]["reasoning"]["d_strict"]
    assert d["low"] <= d["diff"] <= d["high"]
    assert [(p["set"], p["eps"], p["draws"]) for p in saved["against_random"]] == [
        ("probe", 0.2, 2),
        ("none", 0.2, 2),
    ]
    first, second = (tmp_path / "out" / "protect_test.md").read_text().split("\n\n")
    assert first.count("\n") == 1 + len(keys) and "shield eps 0.2" in first
    assert second.count("\n") == 2 + 2 and "vs random" in second  # the file ends in one
