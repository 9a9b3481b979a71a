"""Tests for palora.py, the method alone (no disk: file formats are tests/test_adapters.py's).

Every docstring claim as a property (hypothesis, float64 and float32), each selection rule and
baseline initialisation, and a clear error for each bad input. CPU, seconds, every RNG seeded.

Expected values are derived, never pasted: orthogonality is 0 (float64: below TOL64 of ||dW||;
float32: below the rounding bound `float32_bound`), reconstructions are compared with the dense
formula they factor, selections with the components the test itself moved.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

import palora
from palora import LoRALinear, PaloraError

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=15, deadline=None)
# float64: ||U_Sᵀ dW|| / ||dW|| stays within a few hundred unit roundoffs (2^-53 ≈ 1.1e-16) for
# these sizes; 1e-10 is ~10^6 u, loose enough for any shape here and far below any real leak.
TOL64 = 1e-10


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def holder(kind: str, out: int, inp: int, seed: int, dtype=torch.float32) -> nn.ModuleDict:
    """{kind: a frozen bias-free linear (out, in)} with a seeded N(0, 1/in) weight."""
    W = torch.randn(out, inp, generator=seeded(seed), dtype=dtype) / math.sqrt(inp)
    return nn.ModuleDict({kind: palora.frozen_linear(W)})


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) with orthonormal columns, float64."""
    return torch.linalg.qr(torch.randn(n, k, generator=seeded(seed), dtype=torch.float64))[0]


def make_case(out, inp, k, r, seed, dtype=torch.float64):
    """A random W (out, in), its SVD, a random expert z, a random protected set S of size k < R, a
    PALoRA layer on W' with random (nonzero) A and B: the guarantee must hold for ANY factors, not
    only at B = 0."""
    g = seeded(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    if dtype == torch.float64:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        U, s, Vh = palora.svd(W.float())
    R = len(s)
    z = (torch.rand(R, generator=g, dtype=torch.float64) * 2 + 0.25).to(s.dtype)  # far from 1
    S = torch.randperm(R, generator=g)[:k].sort().values
    U_S, V_S = palora.protected_bases((U, s, Vh), S)
    W1 = palora.svf_weight(U, s, Vh, z)
    A = torch.randn(r, inp, generator=g, dtype=dtype)
    B = torch.randn(out, r, generator=g, dtype=dtype)
    layer = LoRALinear(W1.to(dtype), A, B, alpha=2.0 * r, U_S=U_S.to(dtype), V_S=V_S.to(dtype))
    return layer, (U, s, Vh), z, S


def float32_bound(layer):
    """What rounding allows in float32, relative to scale ||B||_F ||A||_F (not to ||dW||, which can
    be as small as the cancellation of B A makes it). Derivation: fl(U_Sᵀ B) errs by γ_out √k ||B||,
    fl(B - U_S t) by γ_{k+1}(1 + √k) ||B||, U_S's own non-orthonormality η = ||U_SᵀU_S - I||_2
    leaks η ||B||, and the product B_p A_p adds γ_r; with γ_n ≈ n u and n = max(out, in), all of
    it is at most η + 2u (2n + r + 1)(1 + √k). The input side is the same with V_S and A."""
    n, k = max(layer.weight.shape), layer.U_S.shape[1]
    eye = torch.eye(k, dtype=torch.float64)
    eta = 0.0
    if k:
        eta = max(
            (Q.double().T @ Q.double() - eye).norm(p=2).item() for Q in (layer.U_S, layer.V_S)
        )
    return eta + 2 * palora.U32 * (2 * n + layer.r + 1) * (1 + math.sqrt(k))


def leak(layer):
    dW = palora.delta_weight(layer).double()
    return palora.leakage(dW, layer.U_S.double(), layer.V_S.double())


shapes = dict(
    out=st.integers(2, 10),
    inp=st.integers(2, 10),
    k=st.integers(0, 9),
    r=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)


# -----------------------------------------------------------------------------
# the structural guarantee


@FAST
@given(**shapes)
@example(out=3, inp=9, k=2, r=2, seed=0)  # out < in
@example(out=9, inp=3, k=2, r=2, seed=1)  # out > in
def test_orthogonality_float64(out, inp, k, r, seed):
    k = min(k, min(out, inp) - 1)  # k = R protects a whole side: dW = 0, nothing to measure
    layer, *_ = make_case(out, inp, k, r, seed)
    lo, li = leak(layer)
    assert lo <= TOL64 and li <= TOL64


@FAST
@given(**shapes)
@example(out=4, inp=10, k=3, r=3, seed=2)
@example(out=10, inp=4, k=3, r=3, seed=3)
def test_orthogonality_float32_bound(out, inp, k, r, seed):
    k = min(k, min(out, inp) - 1)
    layer, *_ = make_case(out, inp, k, r, seed, dtype=torch.float32)
    dW = palora.delta_weight(layer).double()
    raw = layer.scale * layer.B.detach().double().norm() * layer.A.detach().double().norm()
    bound = float32_bound(layer) * raw
    assert (layer.U_S.double().T @ dW).norm() <= bound
    assert (dW @ layer.V_S.double()).norm() <= bound


@settings(max_examples=5, deadline=None)
@given(**shapes)
@example(out=3, inp=8, k=2, r=2, seed=4)
@example(out=8, inp=3, k=2, r=2, seed=5)
def test_guarantee_survives_training(out, inp, k, r, seed):
    """50 AdamW steps on a random regression loss; then orthogonality, protected triplets and the
    forward."""
    k = min(k, min(out, inp) - 1)
    layer, (U, s, Vh), z, S = make_case(out, inp, k, r, seed)
    g = seeded(seed + 1)
    x = torch.randn(16, inp, generator=g, dtype=torch.float64)
    y = torch.randn(16, out, generator=g, dtype=torch.float64)
    opt = torch.optim.AdamW([layer.A, layer.B], lr=1e-2, weight_decay=0.1)
    for _ in range(50):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        opt.step()
    lo, li = leak(layer)
    assert lo <= TOL64 and li <= TOL64
    M = layer.weight + palora.delta_weight(layer).detach()  # merged W' + dW, (out, in)
    sigma = s * palora.multiplier(s, z)  # the expert's singular values s_i m_i
    for i in S.tolist():  # (u_i, s_i m_i, v_i) is still a triplet: M v_i = σ u_i, Mᵀ u_i = σ v_i
        assert torch.allclose(M @ Vh[i], sigma[i] * U[:, i], atol=TOL64 * M.norm())
        assert torch.allclose(M.T @ U[:, i], sigma[i] * Vh[i], atol=TOL64 * M.norm())
    assert torch.allclose(layer(x), x @ M.T, atol=1e-12)


def test_merge_lora_equals_forward():
    layer, *_ = make_case(5, 7, 2, 2, seed=6)
    model = nn.Sequential(layer)
    x = torch.randn(3, 7, generator=seeded(6), dtype=torch.float64)
    y = layer(x)
    palora.merge_lora(model)
    assert isinstance(model[0], nn.Linear)
    assert torch.allclose(model[0](x), y, atol=1e-12)


# -----------------------------------------------------------------------------
# SVF


@FAST
@given(
    out=st.integers(1, 9), inp=st.integers(1, 9), seed=st.integers(0, 2**16), a=st.floats(0.01, 100)
)
def test_svf_identities(out, inp, seed, a):
    g = seeded(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    ones = torch.ones_like(s)
    z = torch.rand(len(s), generator=g, dtype=torch.float64) + 0.1
    assert torch.allclose(palora.svf_weight(U, s, Vh, ones), W, atol=1e-12)  # z = 1 gives W
    W_az, W_z = palora.svf_weight(U, s, Vh, a * z), palora.svf_weight(U, s, Vh, z)
    assert torch.allclose(W_az, W_z, atol=1e-12)  # scale-free: z ~ a·z
    m = palora.multiplier(s, z)
    assert torch.allclose((s * m).sum(), s.sum())  # c keeps the spectrum's mass
    layer = palora.SVFLinear(U, s, Vh, z)
    x = torch.randn(4, inp, generator=g, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ W_z.T, atol=1e-12)  # factored = dense


def test_svf_replaces_weight_and_merges():
    model = holder("down_proj", 4, 6, seed=0)
    W = model["down_proj"].weight.clone()
    x = torch.randn(3, 6, generator=seeded(1))
    y = model["down_proj"](x)
    svds = palora.svds(model, ("down_proj",))
    z = palora.add_svf(model, svds)
    assert list(z) == ["down_proj"] and z["down_proj"].dtype == torch.float32
    names = [n for n, p in model.named_parameters()]  # W is gone: its factors, frozen, and z
    assert names == ["down_proj.U", "down_proj.s", "down_proj.Vh", "down_proj.z"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["down_proj.z"]
    assert torch.allclose(model["down_proj"](x), y, atol=1e-5)
    palora.merge_svf(model)
    assert isinstance(model["down_proj"], nn.Linear)
    assert torch.allclose(model["down_proj"].weight, W, atol=1e-5)


def test_add_svf_refuses_a_z_of_another_rank():
    model = holder("up_proj", 4, 6, seed=0)
    svds = palora.svds(model, ("up_proj",))
    with pytest.raises(PaloraError, match=r"up_proj: z has shape \(5,\), the weight has R = 4"):
        palora.add_svf(model, svds, {"up_proj": torch.ones(5)})
    with pytest.raises(PaloraError, match="no nn.Linear, SVD or z for gate_proj"):
        palora.add_svf(model, svds, {"up_proj": torch.ones(4), "gate_proj": torch.ones(4)})


def test_svf_mixed_precision():
    """bfloat16 U, Vh under autocast; s and z stay float32 and z gets a float32 gradient."""
    g = seeded(0)
    U, s, Vh = palora.svd(torch.randn(8, 5, generator=g))
    layer = palora.SVFLinear(U.bfloat16(), s, Vh.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 5, generator=g))
    y.float().sum().backward()
    assert layer.z.dtype == layer.s.dtype == layer.z.grad.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_expert_svds_changes_only_s():
    """The merged expert's SVD is (U, s ⊙ m, Vh) in the base's order; weights without z stay."""
    U, s, Vh = palora.svd(torch.randn(5, 7, generator=seeded(0), dtype=torch.float64))
    z = torch.rand(5, generator=seeded(1), dtype=torch.float64) + 0.5
    out = palora.expert_svds({"a": (U, s, Vh), "b": (U, s, Vh)}, {"a": z})
    U2, s2, Vh2 = out["a"]
    assert U2 is U and Vh2 is Vh and torch.equal(s2, s * palora.multiplier(s, z))
    assert torch.allclose((U2 * s2) @ Vh2, palora.svf_weight(U, s, Vh, z), atol=1e-12)
    assert out["b"] == (U, s, Vh)


# -----------------------------------------------------------------------------
# the probe


def test_probe_selection_and_union():
    s = torch.linspace(3, 1, 10)
    z1 = torch.ones(10)
    z1[1], z1[7] = 3.0, 3.05  # moved components 1 and 7, 7 a little further
    z2 = torch.ones(10)
    z2[4] = 0.1
    svds = {"w": (torch.eye(10), s, torch.eye(10))}
    chosen = palora.probe(svds, [{"w": z1}], ("k", 2))["w"]
    assert chosen.dtype == torch.int64 and chosen.tolist() == [1, 7]
    assert palora.probe(svds, [{"w": z1}], ("k", 1))["w"].tolist() == [7]
    assert palora.probe(svds, [{"w": z1}, {"w": z2}], ("k", 1))["w"].tolist() == [4, 7]  # union
    assert palora.probe(svds, [{"w": z1}], ("fraction", 0.2))["w"].tolist() == [1, 7]
    assert len(palora.probe(svds, [{"w": z1}], ("fraction", 0.29))["w"]) == 3  # round, not floor


def test_probe_energy_weights_by_s():
    """|m - 1| is a little larger at 7, s ⊙ |m - 1| at 1 (s_1 ≈ 1.9 s_7): the two scores differ."""
    s = torch.linspace(3, 1, 10)
    z = torch.ones(10)
    z[1], z[7] = 3.0, 3.05
    svds = {"w": (torch.eye(10), s, torch.eye(10))}
    delta = (palora.multiplier(s, z) - 1).abs()
    assert delta[7] > delta[1] and s[1] * delta[1] > s[7] * delta[7]  # the premise
    assert palora.probe(svds, [{"w": z}], ("k", 1), "delta")["w"].tolist() == [7]
    assert palora.probe(svds, [{"w": z}], ("k", 1), "energy")["w"].tolist() == [1]
    with pytest.raises(PaloraError, match="unknown probe score 'size'"):
        palora.probe(svds, [{"w": z}], ("k", 1), "size")


def test_probe_global_threshold_adapts_rank():
    svds = {"a": (None, torch.ones(8), None), "b": (None, torch.ones(8), None)}
    za, zb = torch.ones(8), torch.ones(8)
    za[:3] = 2.0  # a's skill is in three components, b's in none
    chosen = palora.probe(svds, [{"a": za, "b": zb}], ("global_fraction", 3 / 16))
    assert chosen["a"].tolist() == [0, 1, 2] and chosen["b"].tolist() == []


def test_probe_scores_the_multiplier_not_z():
    """The probe scores |m - 1|, m = z · c with c = Σs / Σ(s ⊙ z), not |z - 1|. Equal s, z = 2 on 6
    of 8 components: c = 8/14, so the six move to m = 8/7 (|m - 1| = 1/7) and the two z left at 1
    shrink to m = 4/7 (|m - 1| = 3/7): the probe takes those two; |z - 1| would take the six."""
    svds = {"a": (None, torch.ones(8), None), "b": (None, torch.ones(8), None)}
    za, zb = torch.ones(8), torch.ones(8)
    za[:6] = 2.0
    m = palora.multiplier(torch.ones(8), za)
    assert torch.allclose(m, torch.tensor([8 / 7] * 6 + [4 / 7] * 2))  # the premise
    for rule in [("threshold", 2 / 7), ("global_fraction", 2 / 16)]:  # over both matrices
        chosen = palora.probe(svds, [{"a": za, "b": zb}], rule)
        assert chosen["a"].tolist() == [6, 7] and chosen["b"].tolist() == [], rule
    for rule in [("k", 2), ("fraction", 0.25)]:  # per matrix
        assert palora.probe(svds, [{"a": za}], rule)["a"].tolist() == [6, 7], rule


def test_probe_rule():
    assert palora.probe_rule() == ("fraction", 0.5)
    assert palora.probe_rule(0.3) == ("fraction", 0.3)
    assert palora.probe_rule(0.3, threshold=0.2) == ("threshold", 0.2)
    assert palora.probe_rule(0.3, global_fraction=0.1) == ("global_fraction", 0.1)
    with pytest.raises(PaloraError, match="not both"):
        palora.probe_rule(0.3, 0.2, 0.1)


@pytest.mark.parametrize(
    "rule", [("fraction", 0.0), ("fraction", 1.0), ("fraction", 1.5), ("global_fraction", -0.1)]
)
def test_probe_fraction_outside_unit_interval(rule):
    svds = {"w": (None, torch.ones(4), None)}
    with pytest.raises(PaloraError, match=r"must be in \(0, 1\)"):
        palora.probe(svds, [{"w": torch.ones(4)}], rule)


def test_probe_bad_rule_and_shapes():
    svds = {"w": (None, torch.ones(4), None)}
    z = torch.linspace(0.5, 2, 4)
    with pytest.raises(PaloraError, match="selects 5 components of w, which has rank 4"):
        palora.probe(svds, [{"w": z}], ("k", 5))
    with pytest.raises(PaloraError, match="does not match"):
        palora.probe(svds, [{"w": torch.ones(5)}], ("k", 1))
    with pytest.raises(PaloraError, match="does not match"):
        palora.probe(svds, [{"v": z}], ("k", 1))
    with pytest.raises(PaloraError, match="unknown probe rule 'top'"):
        palora.probe(svds, [{"w": z}], ("top", 1))


def test_activation_bases_kill_skill_inputs():
    """palora_act: V_S spans the skill's inputs, so dW x = 0 on them; the output side is still
    the probe's."""
    g = seeded(0)
    X = torch.randn(50, 3, generator=g) @ torch.randn(3, 8, generator=g)  # a 3-dim input subspace
    model = holder("up_proj", 6, 8, seed=1)
    covs = palora.activation_covariances(model, ["up_proj"], lambda: model["up_proj"](X))
    bases = palora.activation_bases(covs, {"up_proj": 3})
    svds = palora.svds(model, ("up_proj",))
    palora.add_lora(model, "palora_act", 2, 4.0, svds, {"up_proj": torch.tensor([0])}, bases)
    layer = model["up_proj"]
    with torch.no_grad():
        layer.B.normal_(generator=g)
    dW = palora.delta_weight(layer)
    assert (X @ dW.T).norm() <= 1e-5 * X.norm() * dW.norm()
    assert max(palora.leakage(dW, layer.U_S, layer.V_S)) <= 1e-5
    assert torch.allclose(layer.U_S.abs(), svds["up_proj"][0][:, :1].abs())


@FAST
@given(out=st.integers(1, 8), inp=st.integers(2, 10), d=st.integers(1, 9), seed=shapes["seed"])
def test_interference_is_zero_off_the_inputs_and_the_sample_ratio_on_them(out, inp, d, seed):
    """E||dW x||² / E||W x||²: zero for an update whose rows are orthogonal to every input, the
    ratio of the samples' sums otherwise, whatever C's scale (number of samples)."""
    d = min(d, inp - 1)
    g = seeded(seed)
    basis = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))[0]
    X = torch.randn(40, d, generator=g, dtype=torch.float64) @ basis[:, :d].T  # a d-dim span
    C = X.T @ X
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    off = torch.randn(out, inp - d, generator=g, dtype=torch.float64) @ basis[:, d:].T
    assert palora.interference(off, W, C) <= TOL64
    dW = torch.randn(out, inp, generator=g, dtype=torch.float64)
    ratio = ((X @ dW.T).pow(2).sum() / (X @ W.T).pow(2).sum()).item()
    assert palora.interference(dW, W, C) == pytest.approx(ratio, rel=1e-9)
    assert palora.interference(dW, W, 7 * C) == pytest.approx(ratio, rel=1e-9)
    assert palora.interference(dW + off, W, C) == pytest.approx(ratio, rel=1e-6)


# -----------------------------------------------------------------------------
# what each method protects: same_count


def test_matrix_kind_and_largest():
    assert palora.matrix_kind("model.layers.0.mlp.down_proj") == "down_proj"
    assert palora.matrix_kind("up_proj") == "up_proj"
    assert palora.largest(torch.tensor([1.0, -5.0, 3.0, 0.5]), 2).tolist() == [1, 2]


def spectra(seed=0):
    """Three matrices' merged-expert SVDs (ranks 8, 8, 6) and a probe S of 2, 4 and 3 each."""
    svds = {}
    for i, (out, inp) in enumerate([(8, 10), (12, 8), (6, 9)]):
        W = torch.randn(out, inp, generator=seeded(seed + i), dtype=torch.float64)
        svds[f"model.layers.{i}.mlp.up_proj"] = palora.svd(W)
    counts = [2, 4, 3]
    S = {n: torch.arange(k) * 2 for n, k in zip(svds, counts)}  # 0, 2, 4, ...: not the top k
    return svds, S


def test_same_count_random_is_the_probes_count_not_its_set():
    svds, S = spectra()
    chosen = palora.same_count("random", S, svds, seed=0)
    assert list(chosen) == list(S)
    for n, s in S.items():
        R = len(svds[n][1])
        c = chosen[n]
        assert c.dtype == torch.int64 and len(c) == len(s)  # exactly the probe's count
        assert c.tolist() == sorted(set(c.tolist())) and 0 <= c.min() and c.max() < R
    assert any(not torch.equal(chosen[n], S[n]) for n in S)  # not the probe's set
    again = palora.same_count("random", S, svds, seed=0)
    assert all(torch.equal(again[n], chosen[n]) for n in S)  # deterministic in the seed
    other = palora.same_count("random", S, svds, seed=1)
    assert any(not torch.equal(other[n], chosen[n]) for n in S)  # and depends on it


def test_same_count_topk_is_the_merged_experts_largest():
    """z makes base component 5 the largest and 6 the largest negative: top-k takes the merged
    expert's |s ⊙ m| order, not the base's (0, 1, ...)."""
    U, s, Vh = palora.svd(torch.randn(8, 8, generator=seeded(0), dtype=torch.float64))
    z = torch.ones(8, dtype=torch.float64)
    z[5], z[6] = 40.0, -30.0
    expert = palora.expert_svds({"w": (U, s, Vh)}, {"w": z})
    sm = expert["w"][1]
    rest = sm.abs()[[0, 1, 2, 3, 4, 7]].max()
    assert sm[5] > rest and sm[6] < -rest  # the premise
    want = [5, 6] if sm[5].abs() > sm[6].abs() else [6, 5]  # largest first
    chosen = palora.same_count("topk", {"w": torch.tensor([2, 3])}, expert, seed=0)
    assert chosen["w"].tolist() == want
    S = {"w": torch.tensor([2, 3])}
    assert palora.same_count("palora", S, expert, seed=0) is S  # the probe's own set
    assert palora.same_count("probe", S, expert, seed=0) is S  # palora_act's default side
    none = palora.same_count("none", S, expert, seed=0)["w"]
    assert none.dtype == S["w"].dtype and none.shape == (0,)  # the ablation: nothing protected


def test_topk_layer_protects_the_expert_spectrum():
    U, s, Vh = torch.linalg.svd(torch.randn(6, 6, generator=seeded(0), dtype=torch.float64))
    z = torch.ones(6, dtype=torch.float64)
    z[4] = 100.0  # component 4 becomes W''s largest
    svds = palora.expert_svds({"up_proj": (U, s, Vh)}, {"up_proj": z})
    model = nn.ModuleDict({"up_proj": palora.frozen_linear(palora.svf_weight(U, s, Vh, z))})
    protected = palora.same_count("topk", {"up_proj": torch.tensor([0])}, svds, seed=0)
    palora.add_lora(model, "topk", 2, 4.0, svds, protected)
    assert torch.allclose(model["up_proj"].U_S[:, 0], U[:, 4])


# -----------------------------------------------------------------------------
# methods and export


@pytest.mark.parametrize("method", list(palora.METHODS))
def test_methods_start_at_the_base(method):
    """Every initialisation leaves the layer's output unchanged at step 0 (B = 0, or
    W_res + scale B0 A0 = W)."""
    model = holder("gate_proj", 8, 12, seed=0)
    x = torch.randn(5, 12, generator=seeded(1))
    y = model["gate_proj"](x)
    svds = palora.svds(model, ("gate_proj",))
    S = {"gate_proj": torch.tensor([1, 5])}
    protected = palora.same_count(method, S, svds, seed=0)
    bases = {"gate_proj": orthonormal(12, 2, seed=2).float()}
    params = palora.add_lora(model, method, 3, 6.0, svds, protected, bases, seed=0)
    assert sorted(params) == ["gate_proj.A", "gate_proj.B"]
    assert params == palora.lora_params(model)
    layer = model["gate_proj"]
    assert torch.allclose(layer(x), y, atol=1e-5)
    if method == "topk":  # the 2 largest components of the adapted weight, not the probe's [1, 5]
        assert torch.allclose(layer.U_S.abs(), svds["gate_proj"][0][:, :2].abs())


class Counted(nn.Linear):
    """A model's own linear class (as model.Linear, whose forward is a CPU fast path): counts its
    forward calls, so a test sees whether a layer palora built still runs through it."""

    calls = 0

    def forward(self, x):
        Counted.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("method", list(palora.METHODS))
def test_layers_palora_builds_keep_the_models_linear_class(method):
    """The expert merge, every method's LoRALinear base and the merged layer are of the replaced
    layer's class, and x Wᵀ runs through its forward: a model's fast path survives every stage."""
    W = torch.randn(8, 12, generator=seeded(0))
    model = nn.ModuleDict({"gate_proj": palora.frozen_linear(W, Counted)})
    svds = palora.svds(model, ("gate_proj",))
    palora.merge_expert(model, svds, {"gate_proj": torch.linspace(0.5, 1.5, 8)})
    assert type(model["gate_proj"]) is Counted
    svds = palora.svds(model, ("gate_proj",))
    protected = palora.same_count(method, {"gate_proj": torch.tensor([1, 5])}, svds, seed=0)
    bases = {"gate_proj": orthonormal(12, 2, seed=2).float()}
    palora.add_lora(model, method, 3, 6.0, svds, protected, bases, seed=0)
    assert type(model["gate_proj"].base) is Counted
    calls = Counted.calls
    model["gate_proj"](torch.randn(2, 12, generator=seeded(1)))
    assert Counted.calls == calls + 1
    palora.merge_lora(model)
    assert type(model["gate_proj"]) is Counted


def test_import_palora_loads_no_project_module():
    """palora.py is the method in torch alone: importing it loads none of the repository's
    modules (model.py would bring checkpoints, cli, tokenizer, jinja2, tokenizers)."""
    code = "import palora, sys; print(sorted(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    project = {p.stem for p in REPO.glob("*.py")}
    assert len(project) > 10  # the repository's top-level modules were found
    assert project & set(done.stdout.split("'")) == {"palora"}


def test_add_lora_is_seeded():
    A = []
    for seed in (0, 0, 1):
        model = holder("up_proj", 4, 6, seed=0)
        A.append(
            palora.add_lora(model, "lora", 2, 4.0, palora.svds(model, ("up_proj",)), seed=seed)[
                "up_proj.A"
            ].detach()
        )
    assert torch.equal(A[0], A[1]) and not torch.equal(A[0], A[2])


def negative_expert(out=6, inp=9):
    """A merged expert W' (float64) whose spectrum s ⊙ m has negative entries at the top (0) and
    the bottom (5) of |s ⊙ m|, and its SVDs (the base's, the expert's)."""
    U, Vh = orthonormal(out, 6, seed=0), orthonormal(inp, 6, seed=1).T
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.5, 1.0], dtype=torch.float64)
    z = torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    expert = palora.expert_svds({"up_proj": (U, s, Vh)}, {"up_proj": z})
    sm = expert["up_proj"][1]
    assert sm[0] < 0 and sm[5] < 0  # c = 16.5 / 4.5 > 0: the signs are z's
    assert palora.largest(sm, 2).tolist() == [0, 1]
    assert palora.largest(-1 / sm, 2).tolist() == [5, 4]  # the two smallest |s ⊙ m|
    return palora.svf_weight(U, s, Vh, z), expert


@pytest.mark.parametrize("method, moved", [("pissa", [0, 1]), ("milora", [5, 4])])
def test_spectral_init_with_a_negative_spectrum(method, moved):
    """PiSSA/MiLoRA on an expert whose s ⊙ m is negative somewhere: scale B A is exactly the
    chosen components U[:, idx] diag(s ⊙ m) Vh[idx], signs included, so the residual W0 holds the
    others only; and the layer's output is W''s at init."""
    W, expert = negative_expert()
    model = nn.ModuleDict({"up_proj": palora.frozen_linear(W.clone())})
    palora.add_lora(model, method, 2, 4.0, expert)
    layer = model["up_proj"]
    U, sm, Vh = expert["up_proj"]
    chosen = (U[:, moved] * sm[moved]) @ Vh[moved]
    assert torch.allclose(layer.scale * layer.B @ layer.A, chosen, atol=1e-12)
    assert torch.allclose(layer.weight, W - chosen, atol=1e-12)
    x = torch.randn(3, 9, generator=seeded(2), dtype=torch.float64)
    assert torch.allclose(layer(x), x @ W.T, atol=1e-12)


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_spectral_init_refuses_rank_above_matrix_rank(method):
    model = holder("up_proj", 4, 6, seed=0)
    svds = palora.svds(model, ("up_proj",))
    with pytest.raises(PaloraError, match="rank 5 is above the matrix rank 4"):
        palora.add_lora(model, method, 5, 10.0, svds)
    palora.add_lora(model, method, 4, 8.0, svds)  # r = R is allowed


@settings(max_examples=10, deadline=None)
@given(**shapes)
def test_folded_export_same_dw(out, inp, k, r, seed):
    k = min(k, min(out, inp) - 1)
    layer, *_ = make_case(out, inp, k, r, seed)
    A, B, alpha = palora.export_factors(layer)
    assert A.shape == (r, inp) and B.shape == (out, r)
    dW = (alpha / A.shape[0]) * (B @ A)
    assert torch.equal(dW, palora.delta_weight(layer))  # exactly, not approximately


@pytest.mark.parametrize("method", ["pissa", "milora"])
@pytest.mark.parametrize("negative", [False, True])
def test_spectral_export_on_untouched_base(method, negative):
    """PiSSA/MiLoRA train against the residual; the rank-2r export on the untouched W gives the
    same output."""
    g = seeded(7)
    if negative:
        W, svds = negative_expert()
    else:
        W = torch.randn(6, 9, generator=g, dtype=torch.float64)
        svds = {"up_proj": torch.linalg.svd(W, full_matrices=False)}
    model = nn.ModuleDict({"up_proj": palora.frozen_linear(W.clone())})
    palora.add_lora(model, method, 2, 4.0, svds)
    layer = model["up_proj"]
    with torch.no_grad():  # "trained": any new A, B
        layer.A.add_(torch.randn(layer.A.shape, generator=g, dtype=torch.float64))
        layer.B.add_(torch.randn(layer.B.shape, generator=g, dtype=torch.float64))
    A, B, alpha = palora.export_factors(layer)
    assert A.shape == (4, 9) and B.shape == (6, 4) and alpha == 8.0
    x = torch.randn(3, 9, generator=g, dtype=torch.float64)
    exported = x @ W.T + alpha / A.shape[0] * (x @ A.T) @ B.T
    assert torch.allclose(exported, layer(x), atol=1e-10)


# -----------------------------------------------------------------------------
# bad input: each a clear error before any training


def test_unknown_target_and_method():
    g = seeded(0)
    model = nn.ModuleDict(
        {"up_proj": palora.frozen_linear(torch.randn(3, 3, generator=g)), "o_proj": nn.Linear(3, 3)}
    )
    with pytest.raises(PaloraError, match="unknown target 'q_proj'.*up_proj"):
        palora.find_targets(model, ("q_proj",))
    with pytest.raises(PaloraError, match="o_proj has a bias"):
        palora.find_targets(model, ("o_proj",))
    svds = palora.svds(model, ("up_proj",))
    with pytest.raises(PaloraError, match="unknown method 'dora'"):
        palora.add_lora(model, "dora", 2, 4.0, svds)
    for method in ("palora", "topk", "random", "palora_act"):
        with pytest.raises(PaloraError, match=f"method {method} needs the protected set S"):
            palora.add_lora(model, method, 2, 4.0, svds)
    with pytest.raises(PaloraError, match="palora_act needs the input basis V_act"):
        palora.add_lora(model, "palora_act", 2, 4.0, svds, {"up_proj": torch.tensor([0])})


def test_extend_bases_adds_the_top_inputs_outside_the_span():
    """V = e0; C weighs e0 most, then e3, then e1: the extension adds e3 then e1 (the top of C
    outside span(V), e0 not twice); the cap leaves `free` directions unprotected."""
    C = torch.diag(torch.tensor([9.0, 2.0, 0.5, 4.0, 0.1], dtype=torch.float64))
    V = torch.eye(5)[:, :1]  # (in, k) = (5, 1)
    out = palora.extend_bases({"w": V}, {"w": C}, {"w": 2}, free=1)["w"]
    assert out.shape == (5, 3)
    assert torch.allclose(out[:, 0], V[:, 0])
    assert torch.allclose(out[:, 1].abs(), torch.eye(5)[:, 3], atol=1e-6)
    assert torch.allclose(out[:, 2].abs(), torch.eye(5)[:, 1], atol=1e-6)
    capped = palora.extend_bases({"w": V}, {"w": C}, {"w": 9}, free=2)["w"]
    assert capped.shape == (5, 3)  # 5 inputs - 1 protected - 2 free = 2 new
    assert torch.allclose(capped.T @ capped, torch.eye(3), atol=1e-6)
