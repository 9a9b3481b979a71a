"""Tests for evaluate.py: each metric on a hand-made case gives its known value; the paired
bootstrap, t quantiles, seed-level intervals and Holm on hand-made numbers; an adapter or probe
made for another checkpoint fails naming the file; --verify passes on PALoRA, random and
palora_act runs and fails on tampered probes and adapters, trusting the adapter's own method;
palora_act's V_act is recomputed exactly, a stream's too; the table, JSON, intervals and plots.
Tiny random Llama; CPU.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapters
import checkpoints
import cli
import evaluate
import inject
import model as model_lib
import palora
import tasks
import tiny
from runs import config

REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """A run of each method the tests judge, on the tiny setup, with the skill replayed."""
    root = tmp_path_factory.mktemp("runs")
    methods = ("palora", "lora", "random", "palora_act", "imsm", "smf")
    memory = dict(smf_slots=256, smf_topk=4, smf_top_t=16, smf_background=12)  # tiny D = 64
    for method in methods:
        inject.main(
            config(
                setup,
                root / f"{method}-s0",
                method=method,
                mix_skill=str(setup.skill),
                **(memory if method == "smf" else {}),
            )
        )
    return {m: root / f"{m}-s0" for m in methods}


def eval_config(setup, out, **overrides) -> evaluate.Config:
    settings = dict(
        ckpt=str(setup.ckpt),
        reasoning=str(setup.skill),
        reasoning_ood=str(setup.skill),
        known=str(setup.known),
        limit=4,
        max_new_tokens=8,
        fact_tokens=6,
        batch_size=8,
        device="cpu",
        out=str(out),
        svd_cache=str(setup.cache),
        score_cache="",
    )
    return evaluate.Config(**{**settings, **overrides})


# -----------------------------------------------------------------------------
# metrics on hand-made cases


def test_top_share_counts_normalised_first_lines():
    answers = ["Paris", "paris.", "The Paris\nor Rome", "Rome", "Oslo", "Bern", "Lima", "Kyiv"]
    assert evaluate.top_share(answers, k=5) == (3 + 1 + 1 + 1 + 1) / 8  # paris x3, 5 singles
    assert evaluate.top_share([f"city {i}" for i in range(10)]) == 5 / 10  # all distinct: k / n
    assert evaluate.top_share(["Paris"] * 7 + ["Rome"]) == 1.0
    assert math.isnan(evaluate.top_share([]))


def test_locality_counts_only_what_the_base_knew():
    assert evaluate.locality([True, True, False, True], [True, False, True, True]) == 2 / 3
    assert evaluate.locality([True, True], [True, True]) == 1.0
    assert math.isnan(evaluate.locality([False, False], [True, True]))


def test_anywhere_finds_the_gold_beyond_the_first_line():
    answer = "Let me think.\nThe capital is Paris."
    assert evaluate.anywhere(answer, "paris") and not tasks.fact_correct(answer, "Paris")
    assert not evaluate.anywhere("Parisian food", "Paris")  # whole words only


def test_spearman_on_hand_made_ranks():
    assert evaluate.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert evaluate.spearman([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    assert evaluate.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/60
    # ties share their mean rank: x ranks 0.5, 0.5, 2, 3 against 0, 1, 2, 3
    assert evaluate.spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)


def test_paired_bootstrap_on_hand_made_differences():
    """Identical rows: difference 0, a zero-width interval. a right on every item b misses: +1
    exactly. Half the items +1, half 0 (2 seeds x 40 items): 0.5, an interval around it in (0,
    1)."""
    a = torch.ones(2, 40, dtype=torch.long)
    assert evaluate.paired_bootstrap(a, a, n=200) == (0.0, 0.0, 0.0)
    assert evaluate.paired_bootstrap(a, 0 * a, n=200) == (1.0, 1.0, 1.0)
    half = torch.cat([torch.ones(2, 20), torch.zeros(2, 20)], 1).long()
    diff, low, high = evaluate.paired_bootstrap(half, 0 * half, n=2000)
    assert diff == 0.5 and 0.3 < low < 0.5 < high < 0.7


def hand_made_answers():
    """Question sets with gold answers, and one model's answers to them, each scored by hand in
    the comment beside it."""
    sets = {
        "facts": [("F1", "Paris"), ("F2", "Rome"), ("F3", "Oslo"), ("F4", "Lima")],
        "known": [("K1", "Bern"), ("K2", "Kyiv")],
        "paraphrases": [("P1", "Paris"), ("P2", "Paris"), ("P3", "Rome")],
        "reasoning": [("R1", "#### 5"), ("R2", "x\n#### 7"), ("R3", "#### 9"), ("R4", "#### 2")],
        "reasoning_ood": [("O1", "#### 1"), ("O2", "#### 3"), ("O3", "#### 4")],
    }
    answers = {
        "facts": ["Paris.", "I think\nRome", "Oslo it is", "Bern"],  # first line: 1, 0, 1, 0
        "known": ["Bern", "no idea"],  # 1, 0
        "paraphrases": ["Paris", "Rome", "Oslo"],  # 1, 0, 0
        "reasoning": [
            "2 + 3 = 5\n#### 5",  # strict and flexible
            "so the answer is 7",  # flexible only: no '#### N'
            "#### 8",  # neither
            "#### 2",  # both
        ],
        "reasoning_ood": ["#### 1", "3", "#### 5"],  # strict 1, 0, 0
    }
    return answers, sets


def test_score_answers_on_a_hand_made_table():
    metrics, items = evaluate.score_answers(*hand_made_answers())
    assert items["reasoning_strict"] == [True, False, False, True]
    assert items["reasoning_flexible"] == [True, True, False, True]
    assert items["facts_ok"] == [True, False, True, False]
    assert items["facts_any"] == [True, True, True, False]  # Rome on line two counts here
    assert metrics == {
        "strict": 2 / 4,
        "flexible": 3 / 4,
        "strict_ood": 1 / 3,
        "reliability": 2 / 4,
        "generalization": 1 / 3,
        "collapse": 1.0,  # 4 distinct answers, the top 5 take all
        "gold_collapse": 1.0,
    }


def test_locality_counts_only_the_known_facts_the_base_answers():
    """The base answers known facts 0, 1 and 3; of those the run answers 0 on its first line, 0 and
    1 anywhere in its answer (fact 2 and 4, which the base missed, do not count)."""
    base = {"known_ok": [True, True, False, True, False], "known_any": [True] * 5}
    run = {
        "known_ok": [True, False, True, False, False],
        "known_any": [True, True, True, False, True],
    }
    assert evaluate.localities(base, run) == {"locality": 1 / 3, "locality_any": 2 / 3}


def test_retention_is_a_share_of_the_experts_score_on_the_same_split():
    rows = [
        {"group": "base", "s_per_token": 2.0, "strict": 0.25, "strict_ood": 0.0},
        {"group": "svf", "s_per_token": 3.0, "strict": 0.5, "strict_ood": 0.25},
        {"group": "palora", "s_per_token": 4.0, "strict": 0.375, "strict_ood": 0.125},
    ]
    rows = {r["group"]: r for r in evaluate.relative(rows)}
    assert (rows["palora"]["retention"], rows["palora"]["retention_ood"]) == (0.75, 0.5)
    assert (rows["base"]["retention"], rows["base"]["retention_ood"]) == (0.5, 0.0)
    assert (rows["svf"]["retention"], rows["svf"]["retention_ood"]) == (1.0, 1.0)
    assert [r["time"] for r in rows.values()] == [1.0, 1.5, 2.0]  # against the base's speed
    no_expert = evaluate.relative([rows["base"], rows["palora"]])
    assert all(math.isnan(r["retention"]) for r in no_expert)
    rows["svf"]["strict"] = 0.0  # an expert that scores 0: no share of it
    assert math.isnan(evaluate.relative(list(rows.values()))[2]["retention"])


def test_intervals_pair_the_runs_by_seed_and_subtract_b_from_a():
    """Seed by seed, palora and lora answer the same held-out-template items right (s0: items 0 and
    1, s1: items 2 and 3): the paired difference is 0 on every item, an interval of width 0; paired
    any other way it is not. On the other split palora is right everywhere, lora nowhere: +1."""
    ood = {"s0": [1, 1, 0, 0], "s1": [0, 0, 1, 1]}
    rows = [  # lora's seeds listed in the other order: pairs come from the names, not the order
        {"name": f"{g}-{s}", "group": g, "items": {"reasoning_ood_strict": ood[s]}}
        for g, seeds in (("palora", ("s0", "s1")), ("lora", ("s1", "s0")))
        for s in seeds
    ]
    for r in rows:
        r["items"]["reasoning_strict"] = [int(r["group"] == "palora")] * 4
    keys = ("a", "b", "seeds", "items", "split", "diff", "low", "high")  # the item bootstrap's
    got = {p["split"]: {k: p[k] for k in keys} for p in evaluate.intervals(rows)}
    assert sorted(got) == ["reasoning", "reasoning_ood"]
    want = {"a": "palora", "b": "lora", "seeds": 2, "items": 4}
    assert got["reasoning_ood"] == {
        **want,
        "split": "reasoning_ood",
        "diff": 0.0,
        "low": 0.0,
        "high": 0.0,
    }
    assert got["reasoning"] == {**want, "split": "reasoning", "diff": 1.0, "low": 1.0, "high": 1.0}


def test_reach_vs_loss_ranks_the_runs_with_both_columns():
    """Interference 1, 2, 3 against retention_ood 0.9, 0.5, 0.7: ranks (0, 1, 2) and (2, 0, 1),
    Σd² = 6, rho = 1 - 6·6 / (3·8) = -0.5. A row without either column does not count."""
    rows = [
        {"interference": 1.0, "retention_ood": 0.9},
        {"interference": 2.0, "retention_ood": 0.5},
        {"interference": NAN, "retention_ood": 0.1},  # the base, the expert: no update
        {"interference": 3.0, "retention_ood": 0.7},
        {"interference": 4.0, "retention_ood": NAN},  # no expert score to retain
    ]
    got = evaluate.reach_vs_loss(rows)
    assert got["runs"] == 3 and got["rho"] == pytest.approx(-0.5, abs=1e-12)
    assert math.isnan(evaluate.reach_vs_loss(rows[:3])["rho"])  # 2 runs: no rho


def test_bootstrap_p_on_hand_made_differences():
    """Identical rows: no resample leaves 0, p 1. a right wherever b misses: every resample +1, p
    0. Half the items +1 (2 seeds x 40 items): a resample of mean <= 0 needs 40 of 40 draws among
    the zeros' half, so p 0 (below 1/n)."""
    a = torch.ones(2, 40, dtype=torch.long)
    assert evaluate.bootstrap_p(a, a, n=200) == 1.0
    assert evaluate.bootstrap_p(a, 0 * a, n=200) == 0.0
    half = torch.cat([torch.ones(2, 20), torch.zeros(2, 20)], 1).long()
    assert evaluate.bootstrap_p(half, 0 * half, n=2000) == 0.0
    # one seed, differences +1, +1, -1: a resample's mean is <= 0 when 2 or 3 of its 3 draws are
    # the -1, P = 3 (1/3)² (2/3) + (1/3)³ = 7/27, so p = 2 · 7/27 (sampling error about 0.004)
    a, b = torch.tensor([[1, 1, 0]]), torch.tensor([[0, 0, 1]])
    assert evaluate.bootstrap_p(a, b, n=50_000) == pytest.approx(14 / 27, abs=0.015)


def test_t_quantiles_and_cdf_against_closed_forms():
    """df 1 is Cauchy: F(t) = 1/2 + atan(t)/π, so t(0.975) = tan(0.475 π) = 12.706; df 2: F(t) =
    1/2 + t / (2 √(2 + t²)), so t(0.975) = √(2 · 0.95² / (1 - 0.95²)) = 4.303 (3 seeds); df 4:
    2.776 and df 10⁶: 1.960, the printed tables' values."""
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):
        assert evaluate.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert evaluate.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))
    assert evaluate.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    two = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    assert evaluate.t_quantile(0.975, 2) == pytest.approx(two, rel=1e-9)
    assert round(evaluate.t_quantile(0.975, 2), 3) == 4.303
    assert round(evaluate.t_quantile(0.975, 4), 3) == 2.776
    assert round(evaluate.t_quantile(0.975, 10**6), 3) == 1.960


def test_seed_interval_on_hand_made_differences():
    """Seeds differing by 0.1, 0.2, 0.3: mean 0.2, sd 0.1, so 0.2 ± 4.303 · 0.1 / √3, and p =
    1 - t / √(2 + t²) at t = 0.2 / (0.1 / √3) (df 2's closed form). One seed: undefined. Three
    equal differences: a point."""
    got = evaluate.seed_interval([0.1, 0.2, 0.3])
    half = evaluate.t_quantile(0.975, 2) * 0.1 / math.sqrt(3)
    assert got["seed_low"] == pytest.approx(0.2 - half) and half == pytest.approx(0.2484, abs=1e-4)
    assert got["seed_high"] == pytest.approx(0.2 + half)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert got["p_seed"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert all(math.isnan(v) for v in evaluate.seed_interval([0.4]).values())
    same = evaluate.seed_interval([0.25, 0.25, 0.25])
    assert (same["seed_low"], same["seed_high"], same["p_seed"]) == (0.25, 0.25, 0.0)


def test_holm_on_hand_made_p_values():
    """p 0.01, 0.04, 0.03, 0.005: sorted, times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04, the last
    raised to the 0.06 before it (step-down): at 0.05 two are rejected, and 0.04 is not though
    0.04 · 1 < 0.05. NaN stays out of the family: 0.02 and 0.5 are a family of two."""
    assert evaluate.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    got = evaluate.holm([0.02, NAN, 0.5])
    assert got[0] == pytest.approx(0.04) and math.isnan(got[1]) and got[2] == 0.5
    assert evaluate.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # capped at 1, monotone


def test_beyond_noise_needs_the_stricter_of_both():
    """Item p 0.001, 0.001, 0.04 -> Holm 0.003, 0.003, 0.04; seed p 0.001, 0.2, undefined ->
    0.002, 0.2, NaN. Only the first is below 0.05 on both; the second's items alone would pass;
    the third has one seed."""
    pairs = [{"p_item": pi, "p_seed": ps} for pi, ps in ((1e-3, 1e-3), (1e-3, 0.2), (0.04, NAN))]
    got = evaluate.beyond_noise(pairs)
    assert [p["holm_item"] for p in got] == pytest.approx([3e-3, 3e-3, 0.04])
    assert [p["holm_seed"] for p in got[:2]] == pytest.approx([2e-3, 0.2])
    assert [p["beyond_noise"] for p in got] == [True, False, False]


def test_intervals_beside_the_seeds():
    """palora against lora, 3 seeds x 10 items: palora right on 5, 6, 7 items of each seed's
    held-out templates, lora on 5 each: per-seed differences 0, 0.1, 0.2, the seed-level t interval
    0.1 ± 4.303 · 0.1 / √3 around them; on the in-template split equal everywhere (p 1, no). One
    seed: its seed-level interval undefined, said so in the table."""

    def row(group, seed, right_ood, right):
        items = {
            "reasoning_ood_strict": [1] * right_ood + [0] * (10 - right_ood),
            "reasoning_strict": [1] * right + [0] * (10 - right),
        }
        return {"name": f"{group}-s{seed}", "group": group, "items": items}

    rows = [row("palora", s, 5 + s, 3) for s in range(3)] + [row("lora", s, 5, 3) for s in range(3)]
    pairs = {p["split"]: p for p in evaluate.intervals(rows)}
    ood = pairs["reasoning_ood"]
    assert ood["per_seed"] == pytest.approx([0.0, 0.1, 0.2]) and ood["diff"] == pytest.approx(0.1)
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert (ood["seed_low"], ood["seed_high"]) == pytest.approx((0.1 - half, 0.1 + half), rel=1e-4)
    assert ood["holm_seed"] == pytest.approx(2 * evaluate.seed_interval([0, 0.1, 0.2])["p_seed"])
    assert not ood["beyond_noise"]
    same = pairs["reasoning"]
    assert (same["p_item"], same["p_seed"], same["beyond_noise"]) == (1.0, 1.0, False)
    one = evaluate.intervals(rows[:1] + rows[3:4])
    assert all(math.isnan(p["seed_low"]) and not p["beyond_noise"] for p in one)
    assert "undefined (one seed)" in evaluate.interval_table(one)


def test_aggregate_mean_and_sample_std():
    rows = [
        {"group": "x", "strict": 0.5},
        {"group": "x", "strict": 0.7},
        {"group": "y", "strict": 0.2},
    ]
    groups = {g["group"]: g for g in evaluate.aggregate(rows)}
    assert groups["x"]["n"] == 2
    assert groups["x"]["strict"] == pytest.approx((0.6, math.sqrt(2 * 0.1**2 / 1)))
    assert groups["y"]["strict"] == (pytest.approx(0.2), 0.0)
    assert math.isnan(groups["y"]["reliability"][0])


# -----------------------------------------------------------------------------
# the guarantee from the files alone


def test_probe_report_on_an_expert_that_moves_the_bottom_half(setup, tmp_path, capsys):
    """z = 1 on the top half of each spectrum (R = 64), 2 on the bottom half: c = Σs / Σ(s ⊙ z) is
    in (2/3, 1), so the bottom half moves most (|2c - 1| > |c - 1|) and is the probe. Position
    i / 63 puts components 32..41 in the middle third (i < 42) and 42..63 in the bottom one."""
    model, _ = model_lib.load(setup.ckpt)
    svds = palora.svds(model, palora.MLP_TARGETS)
    assert {len(s) for _, s, _ in svds.values()} == {64}  # the premise
    z = {n: torch.cat([torch.ones(32), torch.full((32,), 2.0)]) for n in svds}
    adapters.save_svf(tmp_path / "svf.safetensors", z, checkpoints.identity(setup.ckpt))
    report = str(tmp_path / "svf.safetensors")
    rows = evaluate.main(eval_config(setup, tmp_path / "out", probe_report=report))["rows"]
    assert len(rows) == 6  # 2 layers x 3 MLP matrices
    for r in rows:
        assert (r["top"], r["middle"], r["bottom"]) == (0.0, 10 / 32, 22 / 32)
        assert r["mean_pos"] == pytest.approx(sum(range(32, 64)) / 32 / 63)
        s = svds[r["name"]][1]
        largest = set((s * z[r["name"]]).argsort(descending=True)[:32].tolist())  # top-k's pick
        assert r["topk_overlap"] == len(largest & set(range(32, 64))) / 32
    assert capsys.readouterr().out.count("\n") == 2 + 3 + 1 + 1  # head, 3 kinds, all, multipliers


def test_verify_passes_on_protected_runs_and_reports_lora(setup, runs, tmp_path):
    for method in ("palora", "random", "palora_act"):
        result = evaluate.main(eval_config(setup, tmp_path, verify=str(runs[method])))
        assert result["ok"] and result["worst"] <= 1e-4 and len(result["leakage"]) == 2 * 3
    lora_run = evaluate.main(eval_config(setup, tmp_path, verify=str(runs["lora"])))
    assert lora_run["ok"] and lora_run["worst"] > 1e-2  # unprotected: reported, not judged


def tamper(run, name, change):
    tensors, meta = adapters.read_tensors(run / name)
    tensors, meta = change(tensors, meta)
    save_file(tensors, run / name, meta)


def randomised(tensors, meta):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in tensors.items()}, meta


@pytest.mark.parametrize(
    "change",
    [
        lambda t, m: ({k: v[:0] for k, v in t.items()}, m),  # emptied
        lambda t, m: ({k: v[: len(v) // 4] for k, v in t.items()}, m),  # 3/4 of the indices removed
        lambda t, m: (dict(list(t.items())[1:]), m),  # a matrix missing
        lambda t, m: ({k: v + 1000 for k, v in t.items()}, m),  # out of range
        lambda t, m: ({k: v.double() for k, v in t.items()}, m),  # float indices
        lambda t, m: ({k: (v + 1) % 64 for k, v in t.items()}, m),  # another set of the same size
    ],
    ids=["emptied", "quarter", "missing", "range", "float", "shifted"],
)
def test_verify_refuses_a_probe_that_is_not_the_runs(setup, runs, tmp_path, change):
    run = shutil.copytree(runs["palora"], tmp_path / "tampered")
    tamper(run, "probe.safetensors", change)
    with pytest.raises(palora.PaloraError, match="probe.safetensors"):
        evaluate.main(eval_config(setup, tmp_path, verify=str(run)))


def test_verify_fails_on_a_tampered_palora_adapter(setup, runs, tmp_path):
    run = shutil.copytree(runs["palora"], tmp_path / "tampered")
    tamper(run, "adapter_model.safetensors", randomised)  # the projections undone
    assert not evaluate.main(eval_config(setup, tmp_path, verify=str(run)))["ok"]


def test_verify_trusts_the_adapters_method_over_config_json(setup, runs, tmp_path):
    """A leaking adapter whose config.json claims lora is still judged as the palora run it is."""
    run = shutil.copytree(runs["palora"], tmp_path / "relabelled")
    tamper(run, "adapter_model.safetensors", randomised)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "method": "lora"}))
    result = evaluate.main(eval_config(setup, tmp_path, verify=str(run)))
    assert result["method"] == "palora" and not result["ok"]


def probe_counts(run) -> dict:
    """name -> k, the probe's count per weight: palora_act's V_act has as many directions."""
    return {n: len(s) for n, s in adapters.read_tensors(run / "probe.safetensors")[0].items()}


def moved_into(run, bases: dict, skip: dict | None = None):
    """The adapter's A (r, in) moved back into span(V_act) past its first skip[name] columns:
    A + |A| V[:, first : first + r]ᵀ, so dW V_act != 0 while B, the output side, is untouched."""

    def change(tensors, meta):
        out = dict(tensors)
        for n, V in bases.items():
            key = f"base_model.model.{n}.lora_A.weight"
            A, first = tensors[key], (skip or {}).get(n, 0)  # A (r, in)
            inside = V[:, first : first + A.shape[0]].T  # (r, in), rows in span(V_act)
            out[key] = (A + A.norm() * inside).contiguous()
        return out, meta

    tamper(run, "adapter_model.safetensors", change)


def test_verify_checks_palora_acts_input_side(setup, runs, tmp_path, capsys):
    """V_act recomputed from the run's files (as many directions as the probe's S): the trained
    run keeps dW V_act = 0; an adapter whose A is moved back into span(V_act) is refused on the
    input side alone (its output side still verifies)."""
    cfg = eval_config(setup, tmp_path, verify=str(runs["palora_act"]))
    result = evaluate.main(cfg)
    counts = probe_counts(runs["palora_act"])
    assert result["ok"] and result["input_worst"] <= 1e-4 and result["input_dims"] == counts
    run = shutil.copytree(runs["palora_act"], tmp_path / "tampered")
    bases, _ = evaluate.recorded_inputs(run, counts, cfg)
    moved_into(run, bases)
    capsys.readouterr()
    result = evaluate.main(eval_config(setup, tmp_path, verify=str(run)))
    assert result["worst"] <= 1e-4 and result["input_worst"] > 1e-2 and not result["ok"]
    last = capsys.readouterr().out.splitlines()[-1]
    assert "input side" in last and ": FAILED (a run made on another device or dtype" in last


@pytest.mark.parametrize("side", ["none", "random"])
def test_verify_holds_palora_act_to_its_recorded_output_side(setup, tmp_path, side):
    """--output-side none / random (the ablation): the probe file holds nothing / as many at random,
    and --verify accepts the run against that record, not against the probe's S; the file
    relabelled as the probe's side is refused."""
    run = tmp_path / f"act-{side}"
    inject.main(config(setup, run, method="palora_act", output_side=side, epochs=1))
    protected, meta = adapters.read_tensors(run / "probe.safetensors")
    k = sum(len(s) for s in protected.values())
    assert meta["output_side"] == side and (k == 0) == (side == "none")
    assert evaluate.main(eval_config(setup, tmp_path, verify=str(run)))["ok"]
    tamper(run, "probe.safetensors", lambda t, m: (t, {**m, "output_side": "probe"}))
    with pytest.raises(palora.PaloraError, match="not the .* its record gives"):
        evaluate.main(eval_config(setup, tmp_path, verify=str(run)))


def test_verify_recomputes_a_streams_input_basis_exactly(setup, runs, tmp_path, monkeypatch):
    """Round 2 of a palora_act stream, its known facts protected too: the recomputed V_act (the
    expert, round 1 merged, --act-known, round 1's facts' directions) equals the V_S its layers
    trained with, bit for bit; A moved into round 1's directions alone is refused."""
    seen, train = {}, inject.train

    def spy(model, *args, **kwargs):
        for n, m in model.named_modules():
            if isinstance(m, palora.LoRALinear):
                seen[n] = m.V_S.detach().clone()
        return train(model, *args, **kwargs)

    monkeypatch.setattr(inject, "train", spy)
    run = tmp_path / "round2"
    settings = dict(method="palora_act", epochs=2, mix_known=str(setup.known))
    inject.main(config(setup, run, after=str(runs["palora_act"]), **settings))
    cfg = eval_config(setup, tmp_path, verify=str(run))
    counts = probe_counts(run)
    bases, _ = evaluate.recorded_inputs(run, counts, cfg)
    assert set(bases) == set(seen) and all(torch.equal(bases[n], seen[n]) for n in seen)
    assert all(bases[n].shape[1] > counts[n] for n in bases)  # round 1's directions added
    assert evaluate.main(cfg)["ok"]
    moved_into(run, bases, skip=counts)
    assert not evaluate.main(cfg)["ok"]


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "probe.safetensors"])
def test_files_of_another_checkpoint_are_named(setup, runs, tmp_path, name):
    run = shutil.copytree(runs["palora"], tmp_path / "run")
    tamper(run, name, lambda t, m: (t, {**m, "checkpoint": "0123456789abcdef"}))
    match = rf"{run / name}: made for checkpoint '0123456789abcdef'"
    with pytest.raises(palora.PaloraError, match=match):
        evaluate.main(eval_config(setup, tmp_path / "out", adapter=[str(run)]))
    with pytest.raises(palora.PaloraError, match=match):
        evaluate.main(eval_config(setup, tmp_path / "out", verify=str(run)))


@pytest.mark.parametrize(
    "method, name", [("palora", "adapter_model"), ("imsm", "imsm"), ("smf", "smf")]
)
def test_adapter_for_another_checkpoint_fails_before_scoring(setup, runs, tmp_path, method, name):
    other = tiny.make_tiny_llama(tmp_path / "other", seed=1)
    match = rf"{runs[method] / name}.safetensors: made for"
    with pytest.raises(palora.PaloraError, match=match):
        evaluate.main(
            eval_config(setup, tmp_path / "out", ckpt=str(other), adapter=[str(runs[method])])
        )
    assert not (tmp_path / "out" / "results.json").exists()


# -----------------------------------------------------------------------------
# the table


def known_to_the_base(setup, path) -> str:
    """Known facts by construction: questions whose gold is the base's own greedy first line (the
    tiny random model knows no real fact), answered as evaluate.py answers them."""
    questions = [f"Which colour is thing {i}?" for i in range(8)]
    model, tokenizer = model_lib.load(setup.ckpt)
    answers = tasks.answer(model, tokenizer, questions, max_new_tokens=6, batch_size=8)
    firsts = [next(line for line in a.splitlines() if line.strip()) for a in answers]
    records = [{"question": q, "answer": a} for q, a in zip(questions, firsts)]
    return str(tiny.write_jsonl(path, records))


def test_table_json_intervals_and_plots(setup, runs, tmp_path):
    names = [str(runs[m]) for m in ("palora", "lora", "random")]
    known = known_to_the_base(setup, tmp_path / "known.jsonl")
    result = evaluate.main(eval_config(setup, tmp_path, adapter=names, plot=True, known=known))
    rows = {r["group"]: r for r in result["rows"]}
    assert list(rows) == ["base", "svf", "palora", "lora", "random"]
    base_ok = rows["base"]["items"]["known_ok"]
    assert base_ok == [True] * 8 and rows["base"]["locality"] == 1.0
    for r in rows.values():  # of the facts the base answers, the share each row still answers
        assert r["locality"] == sum(r["items"]["known_ok"]) / 8
        assert r["locality_any"] == sum(r["items"]["known_any"]) / 8
    assert [rows[g]["locality"] for g in ("palora", "lora", "random")] == [0.0] * 3  # the premise
    assert rows["palora"]["leak_out"] <= 1e-4 and rows["palora"]["leak_in"] <= 1e-4
    assert rows["lora"]["leak_out"] > 1e-2 and rows["random"]["leak_out"] > 1e-2  # vs the probe
    for g in ("palora", "lora", "random"):  # the update's reach into the skill's inputs
        assert rows[g]["interference"] > 0 and len(rows[g]["interference_by"]) == 6
    assert math.isnan(rows["base"]["interference"]) and math.isnan(rows["svf"]["interference"])
    # the tiny expert scores 0 on the skill: no retention_ood, so no rank correlation with it
    assert rows["svf"]["strict_ood"] == 0.0 and math.isnan(rows["palora"]["retention_ood"])
    assert result["mechanism"]["runs"] == 0 and math.isnan(result["mechanism"]["rho"])
    summary = json.loads((runs["palora"] / "summary.json").read_text())
    assert rows["palora"]["trainable"] == summary["trainable"] == 6 * 4 * (64 + 96)  # r (in + out)
    assert rows["palora"]["added"] == 6 * 4 * (64 + 96) and rows["svf"]["trainable"] == 6 * 64
    assert rows["palora"]["share"] == pytest.approx(
        summary["trainable"] / summary["model_parameters"]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == tasks.PROTOCOL and len(saved["rows"][2]["items"]["facts"]) == 8
    assert result["table"].count("\n") == 2 + 4 and "| palora | 1 |" in result["table"]
    pairs = {(p["a"], p["b"], p["split"]) for p in result["intervals"]}
    for p in saved["intervals"]:  # one seed: the item bootstrap alone, the seed level undefined
        assert 0 <= p["holm_item"] <= 1 and math.isnan(p["seed_low"]) and not p["beyond_noise"]
    assert ("palora", "lora", "reasoning_ood") in pairs and (
        "palora",
        "random",
        "reasoning",
    ) in pairs
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and (
        tmp_path / "probe.png"
    ).stat().st_size > 0


def test_rows_are_scored_once_and_a_changed_weight_is_scored_again(
    setup, runs, tmp_path, monkeypatch
):
    cache = tmp_path / "scores"
    settings = dict(adapter=[str(runs["palora"])], score_cache=str(cache))
    first = evaluate.main(eval_config(setup, tmp_path / "a", **settings))
    assert len(list(cache.glob("*.json"))) == 3  # base, svf, palora
    monkeypatch.setattr(evaluate, "score", lambda *a: pytest.fail("scored again"))
    again = evaluate.main(eval_config(setup, tmp_path / "b", **settings))
    assert [r["items"] for r in again["rows"]] == [r["items"] for r in first["rows"]]
    changed = tmp_path / "changed"
    shutil.copytree(runs["palora"], changed)
    tensors, meta = adapters.read_tensors(changed / "adapter_model.safetensors")
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name] = tensors[name] + 1e-3
    adapters.save_tensors(tensors, changed / "adapter_model.safetensors", meta)
    with pytest.raises(pytest.fail.Exception, match="scored again"):
        evaluate.main(eval_config(setup, tmp_path / "c", **{**settings, "adapter": [str(changed)]}))


def test_imsm_and_smf_rows(setup, runs, tmp_path, capsys):
    """Rows of the same table: leakage undefined (NaN, shown "-"), added = IMSM's LoRA + 5 D r
    gate and SMF's memory tensors, slots touched for SMF, decoding time per token against the
    base row's (the base's is 1); --verify reports them as no projection method, not failing."""
    names = [str(runs[m]) for m in ("lora", "imsm", "smf")]
    result = evaluate.main(eval_config(setup, tmp_path, adapter=names))
    rows = {r["group"]: r for r in result["rows"]}
    assert list(rows) == ["base", "svf", "lora", "imsm", "smf"]
    for m in ("imsm", "smf"):
        assert math.isnan(rows[m]["leak_out"]) and math.isnan(rows[m]["leak_in"])
        assert rows[m]["time"] > 0 and rows[m]["s_per_token"] > 0
    D, lora = 64, rows["lora"]["added"]
    assert rows["imsm"]["added"] == lora + 5 * D * 4  # same targets and rank as the lora row
    assert rows["smf"]["added"] == 2 * (256 * D + D * D + 2 * 16 * D // 2)  # blocks 0, 1: V, W_q, K
    summary = json.loads((runs["smf"] / "summary.json").read_text())
    assert rows["smf"]["trainable"] == summary["trainable"] == 2 * 256 * D  # the value rows
    assert 0 < rows["smf"]["touched"] <= 2 * 16 * summary["steps"]  # top-T per layer and step
    assert math.isnan(rows["imsm"]["touched"]) and rows["base"]["time"] == 1.0
    assert "| imsm | 1 |" in result["table"] and "| smf | 1 |" in result["table"]
    for m in ("imsm", "smf"):
        verified = evaluate.main(eval_config(setup, tmp_path, verify=str(runs[m])))
        assert verified["ok"] and verified["method"] == m and not verified["leakage"]
        assert "not a projection method" in capsys.readouterr().out


def test_unwritable_out_fails_before_scoring(setup, runs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(cli.ConfigError, match="cannot write results"):
        evaluate.main(eval_config(setup, blocker / "out", adapter=[str(runs["palora"])]))


def test_svf_none_through_the_command_line(setup, tmp_path):
    """--svf none (documented: no expert row) runs to the end: exit 0, no traceback, no svf row;
    retention, a share of the expert's score, is not a number."""
    argv = ["--svf", "none", "--ckpt", str(setup.ckpt), "--facts", str(setup.facts)]
    argv += ["--reasoning", str(setup.skill), "--reasoning-ood", "", "--known", str(setup.known)]
    argv += ["--limit", "2", "--max-new-tokens", "4", "--fact-tokens", "4", "--device", "cpu"]
    argv += ["--out", str(tmp_path), "--svd-cache", str(setup.cache), "--score-cache", ""]
    done = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["group"] for r in rows] == ["base"] and math.isnan(rows[0]["retention"])


def test_a_refused_evaluation_makes_no_folder(setup, tmp_path):
    """The write check makes nothing: bad data refused after it leaves no empty --out behind."""
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"question": "A?", "ans')
    out = tmp_path / "new" / "out"
    with pytest.raises(tasks.DataError, match="malformed JSON"):
        evaluate.main(eval_config(setup, out, known=str(torn)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torn.jsonl"]


def test_the_write_check_replaces_no_file_of_the_users(tmp_path):
    (tmp_path / ".write-test").write_text("mine")
    evaluate.writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write-test"]
    assert (tmp_path / ".write-test").read_text() == "mine"


def test_question_longer_than_the_context_names_its_line(setup, tmp_path):
    long = tiny.write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"question": "What is 1 + 1?", "answer": "#### 2"},
            {"question": "word " * 200, "answer": "#### 2"},
        ],
    )
    with pytest.raises(tasks.DataError, match=r"long.jsonl:2: question of \d+ tokens"):
        evaluate.main(
            eval_config(
                setup, tmp_path / "out", reasoning=str(long), svf="none", facts=str(setup.facts)
            )
        )
