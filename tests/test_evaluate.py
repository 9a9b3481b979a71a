"""Tests for evaluate.py: each metric on a hand-made case gives its known value; an adapter or probe made for another
checkpoint fails naming the file; --verify passes on a PALoRA run, fails on a tampered one and reports nonzero leakage
for plain LoRA; the whole evaluation and the --reproduce pipeline write their table and JSON. Tiny random Llama
(tests/tiny.py) with the fixtures of test_inject.py; CPU, seconds.
"""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

import evaluate
import inject
import palora
import tiny
from test_inject import config, setup  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """A PALoRA run and a plain LoRA run on the tiny setup."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("palora", "lora"):
        inject.main(config(setup, root / f"{method}-s0", method=method))
    return {m: root / f"{m}-s0" for m in ("palora", "lora")}


def eval_config(setup, out, **overrides) -> evaluate.Config:
    settings = dict(ckpt=str(setup.ckpt), reasoning=str(setup.skill), known=str(setup.known), limit=4, max_new_tokens=8,
                    fact_tokens=6, batch_size=8, device="cpu", out=str(out), svd_cache=str(setup.cache))
    return evaluate.Config(**{**settings, **overrides})


# -----------------------------------------------------------------------------
# metrics on hand-made cases


def test_top_share_counts_normalised_first_lines():
    answers = ["Paris", "paris.", "The Paris\nor Rome", "Rome", "Oslo", "Bern", "Lima", "Kyiv"]  # paris x3, 5 singles
    assert evaluate.top_share(answers, k=5) == (3 + 1 + 1 + 1 + 1) / 8
    assert evaluate.top_share([f"city {i}" for i in range(10)]) == 5 / 10  # all distinct: k / n
    assert evaluate.top_share(["Paris"] * 7 + ["Rome"]) == 1.0
    assert math.isnan(evaluate.top_share([]))


def test_locality_counts_only_what_the_base_knew():
    assert evaluate.locality([True, True, False, True], [True, False, True, True]) == 2 / 3
    assert evaluate.locality([True, True], [True, True]) == 1.0
    assert math.isnan(evaluate.locality([False, False], [True, True]))


def test_retention_is_relative_to_the_expert():
    rows = evaluate.add_retention([{"group": "base", "strict": 0.1}, {"group": "svf", "strict": 0.8},
                                   {"group": "palora", "strict": 0.6}])
    assert [r["retention"] for r in rows] == [0.1 / 0.8, 1.0, 0.6 / 0.8]
    assert math.isnan(evaluate.add_retention([{"group": "base", "strict": 0.5}])[0]["retention"])


def test_leakage_of_hand_made_updates():
    """W = diag(4, 3, 2): U = V = I, S = {0}. dW = e0 e1ᵀ lies on u_0 (output side, 1) and off v_0 (input side, 0);
    dW = (e0 + e2) e0ᵀ has half its norm² on u_0 (1/√2) and all of it on v_0 (1)."""
    e, W = torch.eye(3), torch.diag(torch.tensor([4.0, 3.0, 2.0]))
    svds = {n: (e, torch.tensor([4.0, 3.0, 2.0]), e) for n in "ab"}
    layers = {"a": palora.LoRALinear(W, e[1:2], e[:, :1], alpha=1.0),  # A (1, 3) = e1ᵀ, B (3, 1) = e0
              "b": palora.LoRALinear(W, e[0:1], (e[:, 0] + e[:, 2])[:, None], alpha=1.0)}
    table = evaluate.leakage_table(layers, svds, {"a": torch.tensor([0]), "b": torch.tensor([0])})
    assert table["a"] == pytest.approx((1.0, 0.0)) and table["b"] == pytest.approx((1 / math.sqrt(2), 1.0))


def test_aggregate_mean_and_sample_std():
    rows = [{"group": "x", "strict": 0.5}, {"group": "x", "strict": 0.7}, {"group": "y", "strict": 0.2}]
    groups = {g["group"]: g for g in evaluate.aggregate(rows)}
    assert groups["x"]["n"] == 2 and groups["x"]["strict"] == pytest.approx((0.6, math.sqrt(2 * 0.1 ** 2 / 1)))
    assert groups["y"]["strict"] == (pytest.approx(0.2), 0.0) and math.isnan(groups["y"]["reliability"][0])


# -----------------------------------------------------------------------------
# the guarantee from the files alone


def test_probe_report_shares(setup, capsys):
    """Each matrix's protected components are split over the spectrum's thirds (shares sum to 1), half of each
    matrix is protected, and the overlap with top-k's choice is a share; one table row per matrix kind plus all."""
    rows = evaluate.main(eval_config(setup, setup.root / "report", probe_report=str(setup.svf)))["rows"]
    assert len(rows) == 6  # 2 layers x 3 MLP matrices
    for r in rows:
        assert r["top"] + r["middle"] + r["bottom"] == pytest.approx(1.0)
        assert r["count"] == r["rank"] // 2 and 0 <= r["topk_overlap"] <= 1
    assert capsys.readouterr().out.count("\n") == 2 + 3 + 1 + 1  # header, 3 kinds, all, multipliers


def test_verify_passes_on_palora_and_measures_lora(setup, runs, tmp_path):
    palora_run = evaluate.main(eval_config(setup, tmp_path, verify=str(runs["palora"])))
    assert palora_run["ok"] and palora_run["worst"] <= 1e-4 and len(palora_run["leakage"]) == 2 * 3
    lora_run = evaluate.main(eval_config(setup, tmp_path, verify=str(runs["lora"])))
    assert lora_run["ok"] and lora_run["worst"] > 1e-2  # not a palora run: measured, not judged


def test_verify_fails_on_a_tampered_palora_adapter(setup, runs, tmp_path):
    run = shutil.copytree(runs["palora"], tmp_path / "tampered")
    path = run / "adapter_model.safetensors"
    tensors, meta = palora.read_tensors(path)
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=g) for k, v in tensors.items()}, path, meta)  # projections undone
    assert not evaluate.main(eval_config(setup, tmp_path, verify=str(run)))["ok"]


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "probe.safetensors"])
def test_files_of_another_checkpoint_are_named(setup, runs, tmp_path, name):
    run = shutil.copytree(runs["palora"], tmp_path / "run")
    tensors, meta = palora.read_tensors(run / name)
    save_file(tensors, run / name, {**meta, "checkpoint": "0123456789abcdef"})
    with pytest.raises(palora.PaloraError, match=rf"{run / name}: made for checkpoint '0123456789abcdef'"):
        evaluate.main(eval_config(setup, tmp_path / "out", adapter=[str(run)]))
    with pytest.raises(palora.PaloraError, match=rf"{run / name}: made for checkpoint"):
        evaluate.main(eval_config(setup, tmp_path / "out", verify=str(run)))


def test_adapter_for_another_checkpoint_fails_before_scoring(setup, runs, tmp_path):
    other = tiny.make_tiny_llama(tmp_path / "other", seed=1)
    with pytest.raises(palora.PaloraError, match=rf"{runs['palora'] / 'adapter_model.safetensors'}: made for"):
        evaluate.main(eval_config(setup, tmp_path / "out", ckpt=str(other), adapter=[str(runs["palora"])]))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# the table


def test_table_json_and_plots(setup, runs, tmp_path):
    pytest.importorskip("matplotlib")
    result = evaluate.main(eval_config(setup, tmp_path, adapter=[str(runs["palora"]), str(runs["lora"])], plot=True))
    rows = {r["group"]: r for r in result["rows"]}
    assert list(rows) == ["base", "svf", "palora", "lora"]
    assert rows["base"]["locality"] in (1.0,) or math.isnan(rows["base"]["locality"])  # the base keeps what it knows
    assert rows["palora"]["leak_out"] <= 1e-4 and rows["palora"]["leak_in"] <= 1e-4 < rows["lora"]["leak_out"]
    summary = json.loads((runs["palora"] / "summary.json").read_text())
    assert rows["palora"]["trainable"] == summary["trainable"] == 6 * 4 * (64 + 96)  # 6 matrices, r (in + out)
    assert rows["palora"]["added"] == 6 * 4 * (64 + 96) and rows["svf"]["trainable"] == 6 * 64  # R = 64 per matrix
    assert rows["palora"]["share"] == pytest.approx(summary["trainable"] / summary["model_parameters"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == evaluate.tasks.PROTOCOL and len(saved["rows"][2]["predictions"]["facts"]) == 8
    assert result["table"].count("\n") == 2 + 3 and "| palora | 1 |" in result["table"]
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and (tmp_path / "probe.png").stat().st_size > 0


def test_reproduce_pipeline_runs_every_method(setup, tmp_path):
    result = evaluate.main(eval_config(setup, tmp_path, reproduce=True, svf=str(setup.svf), facts=str(setup.facts),
                                       seeds="0", epochs=1))
    assert [r["group"] for r in result["rows"]] == ["base", "svf", *evaluate.METHODS]
    assert all((tmp_path / f"{m}-s0" / "adapter_model.safetensors").is_file() for m in evaluate.METHODS)
    again = evaluate.main(eval_config(setup, tmp_path, reproduce=True, svf=str(setup.svf), facts=str(setup.facts),
                                      seeds="0", epochs=1))  # done runs are reused, not retrained
    assert [r["reliability"] for r in again["rows"]] == [r["reliability"] for r in result["rows"]]
