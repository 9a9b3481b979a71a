"""Tests for palora.py: every docstring claim as a property (hypothesis, float64 and float32), interop with peft
and transformers on a tiny random Llama, and a clear error for each bad input. CPU, seconds.

Expected values are derived, never pasted: orthogonality is 0 (float64: below 1e-10 of ||dW||; float32: below
the rounding bound `float32_bound`), reconstructions are compared with the dense formula they factor.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

import model as model_lib
import palora
from palora import LoRALinear, PaloraError

FAST = settings(max_examples=15, deadline=None)
TOL64 = 1e-10  # float64: the bound on ||U_S^T dW|| / ||dW||


def make_case(out, inp, k, r, seed, dtype=torch.float64):
    """A random W (out, in), its SVD, a random expert z, a random protected set S of size k < R, a PALoRA layer
    on W' with random (nonzero) A and B: the guarantee must hold for ANY factors, not only at B = 0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False) if dtype == torch.float64 else palora.svd(W)
    R = len(s)
    z = (torch.rand(R, generator=g, dtype=torch.float64) * 2 + 0.25).to(s.dtype)  # multipliers far from 1
    S = torch.randperm(R, generator=g)[:k].sort().values
    U_S, V_S = palora.protected_bases((U, s, Vh), S)
    W1 = palora.svf_weight(U, s, Vh, z)
    A, B = torch.randn(r, inp, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype)
    layer = LoRALinear(W1.to(dtype), A, B, alpha=2.0 * r, U_S=U_S.to(dtype), V_S=V_S.to(dtype))
    return layer, (U, s, Vh), z, S


def float32_bound(layer):
    """What rounding allows in float32, relative to scale ||B||_F ||A||_F (not to ||dW||, which can be as small
    as the cancellation of B A makes it). Derivation: fl(U_S^T B) errs by γ_out √k ||B||, fl(B - U_S t) by
    γ_{k+1}(1 + √k) ||B||, U_S's own non-orthonormality η = ||U_S^T U_S - I||_2 leaks η ||B||, and the product
    B_p A_p adds γ_r; with γ_n ≈ n u and n = max(out, in), all of it is at most η + 2u (2n + r + 1)(1 + √k).
    The input side is the same with V_S and A."""
    n, k = max(layer.weight.shape), layer.U_S.shape[1]
    eye = torch.eye(k, dtype=torch.float64)
    eta = max((Q.double().T @ Q.double() - eye).norm(p=2).item() for Q in (layer.U_S, layer.V_S)) if k else 0.0
    return eta + 2 * palora.U32 * (2 * n + layer.r + 1) * (1 + math.sqrt(k))


def leak(layer):
    return palora.leakage(palora.delta_weight(layer).double(), layer.U_S.double(), layer.V_S.double())


shapes = dict(out=st.integers(2, 10), inp=st.integers(2, 10), k=st.integers(0, 9), r=st.integers(1, 3), seed=st.integers(0, 2**16))


# -----------------------------------------------------------------------------
# the structural guarantee


@FAST
@given(**shapes)
@example(out=3, inp=9, k=2, r=2, seed=0)  # out < in
@example(out=9, inp=3, k=2, r=2, seed=1)  # out > in
def test_orthogonality_float64(out, inp, k, r, seed):
    k = min(k, min(out, inp) - 1)  # k = R protects a whole side: dW = 0 identically, nothing to measure
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
    """50 AdamW steps on a random regression loss; then orthogonality, protected triplets and the forward."""
    k = min(k, min(out, inp) - 1)
    layer, (U, s, Vh), z, S = make_case(out, inp, k, r, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(16, inp, generator=g, dtype=torch.float64), torch.randn(16, out, generator=g, dtype=torch.float64)
    opt = torch.optim.AdamW([layer.A, layer.B], lr=1e-2, weight_decay=0.1)
    for _ in range(50):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        opt.step()
    lo, li = leak(layer)
    assert lo <= TOL64 and li <= TOL64
    M = layer.weight + palora.delta_weight(layer).detach()  # merged W' + dW, (out, in)
    sigma = s * palora.multiplier(s, z)  # the expert's singular values s_i m_i
    for i in S.tolist():  # (u_i, s_i m_i, v_i) is still a singular triplet: M v_i = σ u_i and M^T u_i = σ v_i
        assert torch.allclose(M @ Vh[i], sigma[i] * U[:, i], atol=TOL64 * M.norm())
        assert torch.allclose(M.T @ U[:, i], sigma[i] * Vh[i], atol=TOL64 * M.norm())
    assert torch.allclose(layer(x), x @ M.T, atol=1e-12)


def test_merge_lora_equals_forward():
    layer, *_ = make_case(5, 7, 2, 2, seed=6)
    holder = nn.Sequential(layer)
    x = torch.randn(3, 7, dtype=torch.float64)
    y = layer(x)
    palora.merge_lora(holder)
    assert isinstance(holder[0], nn.Linear) and torch.allclose(holder[0](x), y, atol=1e-12)


# -----------------------------------------------------------------------------
# SVF


@FAST
@given(out=st.integers(1, 9), inp=st.integers(1, 9), seed=st.integers(0, 2**16), a=st.floats(0.01, 100))
def test_svf_identities(out, inp, seed, a):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    ones, z = torch.ones_like(s), torch.rand(len(s), generator=g, dtype=torch.float64) + 0.1
    assert torch.allclose(palora.svf_weight(U, s, Vh, ones), W, atol=1e-12)  # z = 1 reproduces W
    assert torch.allclose(palora.svf_weight(U, s, Vh, a * z), palora.svf_weight(U, s, Vh, z), atol=1e-12)  # scale-free
    m = palora.multiplier(s, z)
    assert torch.allclose((s * m).sum(), s.sum())  # c keeps the spectrum's mass
    layer = palora.SVFLinear(U, s, Vh, z)
    x = torch.randn(4, inp, generator=g, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ palora.svf_weight(U, s, Vh, z).T, atol=1e-12)  # factored = dense


def test_svf_replaces_weight_and_merges():
    lin = nn.Linear(6, 4, bias=False)
    holder = nn.ModuleDict({"down_proj": lin})
    x = torch.randn(3, 6)
    y = lin(x)
    svds = palora.compute_svds(holder, ("down_proj",), cache_dir=None)
    z = palora.add_svf(holder, svds)
    assert list(z) == ["down_proj"] and z["down_proj"].dtype == torch.float32
    assert [n for n, _ in holder.named_parameters()] == ["down_proj.z"]  # W is gone: only z is a parameter
    assert torch.allclose(holder["down_proj"](x), y, atol=1e-5)
    palora.merge_svf(holder)
    assert torch.allclose(holder["down_proj"].weight, lin.weight, atol=1e-5)


def test_svf_mixed_precision():
    """bfloat16 U, Vh under autocast; s and z stay float32 and z gets a float32 gradient."""
    W = torch.randn(8, 5)
    U, s, Vh = palora.svd(W)
    layer = palora.SVFLinear(U.bfloat16(), s, Vh.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 5))
    y.float().sum().backward()
    assert layer.z.dtype == layer.s.dtype == layer.z.grad.dtype == torch.float32 and y.dtype == torch.bfloat16


def test_topk_uses_the_expert_spectrum():
    """top-k protects the largest components of the adapted weight W', whose order z can change."""
    W = torch.randn(6, 6, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(W)
    z = torch.ones(6, dtype=torch.float64)
    z[4] = 100.0  # component 4 becomes W''s largest
    svds = palora.expert_svds({"up_proj": (U, s, Vh)}, {"up_proj": z})
    holder = nn.ModuleDict({"up_proj": palora.frozen_linear(palora.svf_weight(U, s, Vh, z))})
    palora.add_lora(holder, "topk", 2, 4.0, svds, {"up_proj": torch.tensor([0])}, ("up_proj",))
    assert torch.allclose(holder["up_proj"].U_S[:, 0], U[:, 4])


# -----------------------------------------------------------------------------
# the probe


def test_probe_selection_and_union():
    s = torch.linspace(3, 1, 10)
    z1 = torch.ones(10); z1[[1, 7]] = 3.0  # moved components 1 and 7 (c shrinks the others a little)
    z2 = torch.ones(10); z2[4] = 0.1
    svds = {"w": (torch.eye(10), s, torch.eye(10))}
    assert palora.probe(svds, {"w": z1}, k=2)["w"].tolist() == [1, 7]
    union = palora.probe(svds, [{"w": z1}, {"w": z2}], k=1)["w"]
    assert union.dtype == torch.int64 and set(union.tolist()) == {palora.probe(svds, {"w": z1}, k=1)["w"].item(), 4}
    assert len(palora.probe(svds, {"w": z1}, fraction=0.2)["w"]) == 2
    # energy weights by s: component 1 (s larger) now beats 7
    assert palora.probe(svds, {"w": z1}, k=1, score="energy")["w"].tolist() == [1]


def test_probe_global_threshold_adapts_rank():
    svds = {"a": (None, torch.ones(8), None), "b": (None, torch.ones(8), None)}
    za, zb = torch.ones(8), torch.ones(8)
    za[:3] = 2.0  # a's skill is in three components, b's in none
    chosen = palora.probe(svds, {"a": za, "b": zb}, global_fraction=3 / 16)
    assert chosen["a"].tolist() == [0, 1, 2] and chosen["b"].tolist() == []
    m = palora.multiplier(torch.ones(8), za)
    # c = 8/11 shrinks the unmoved components too (|m - 1| = 3/11 against 5/11): the threshold goes between
    chosen = palora.probe(svds, {"a": za, "b": zb}, threshold=float((m[0] - 1).abs() + (m[3] - 1).abs()) / 2)
    assert chosen["a"].tolist() == [0, 1, 2] and chosen["b"].tolist() == []


def test_probe_report():
    svds = {"model.layers.3.mlp.up_proj": (None, torch.ones(9), None)}
    (row,) = palora.probe_report({"model.layers.3.mlp.up_proj": torch.tensor([0, 1, 8])}, svds)
    assert row["layer"] == 3 and row["matrix"] == "up_proj" and row["count"] == 3 and row["fraction"] == 3 / 9
    assert row["top"] == 2 / 3 and row["middle"] == 0 and row["bottom"] == 1 / 3
    assert math.isclose(row["mean_pos"], (0 + 1 / 8 + 1) / 3) and row["median_pos"] == 1 / 8


def test_activation_bases_kill_skill_inputs():
    """palora_act: V_S spans the skill's inputs, so dW x = 0 on them; the structural guarantee is unchanged."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=g) @ torch.randn(3, 8, generator=g)  # the skill uses a 3-dim input subspace
    lin = nn.Linear(8, 6, bias=False)
    holder = nn.ModuleDict({"up_proj": lin})
    covs = palora.activation_covariances(holder, ["up_proj"], lambda: holder["up_proj"](X))
    bases = palora.activation_bases(covs, {"up_proj": 3})
    svds = palora.compute_svds(holder, ("up_proj",), cache_dir=None)
    palora.add_lora(holder, "palora_act", 2, 4.0, svds, {"up_proj": torch.tensor([0])}, ("up_proj",), bases)
    layer = holder["up_proj"]
    with torch.no_grad():
        layer.B.normal_(generator=g)
    dW = palora.delta_weight(layer)
    assert (X @ dW.T).norm() <= 1e-5 * X.norm() * dW.norm()
    assert max(palora.leakage(dW, layer.U_S, layer.V_S)) <= 1e-5


# -----------------------------------------------------------------------------
# methods and export


@pytest.mark.parametrize("method", ["lora", "palora", "topk", "pissa", "milora"])
def test_methods_start_at_the_base(method):
    """Every initialisation leaves the layer's output unchanged at step 0 (B = 0, or W_res + scale B0 A0 = W)."""
    lin = nn.Linear(12, 8, bias=False)
    holder = nn.ModuleDict({"gate_proj": lin})
    x = torch.randn(5, 12)
    y = lin(x)
    svds = palora.compute_svds(holder, ("gate_proj",), cache_dir=None)
    palora.add_lora(holder, method, 3, 6.0, svds, {"gate_proj": torch.tensor([1, 5])}, ("gate_proj",))
    layer = holder["gate_proj"]
    assert torch.allclose(layer(x), y, atol=1e-5)
    if method == "topk":  # the 2 largest components of the adapted weight, not the probe's [1, 5]
        assert torch.allclose(layer.U_S.abs(), svds["gate_proj"][0][:, :2].abs())


@settings(max_examples=10, deadline=None)
@given(**shapes)
def test_folded_export_same_dw(out, inp, k, r, seed):
    k = min(k, min(out, inp) - 1)
    layer, *_ = make_case(out, inp, k, r, seed)
    A, B, alpha = palora.export_factors(layer)
    assert A.shape == (r, inp) and B.shape == (out, r)
    assert torch.equal((alpha / A.shape[0]) * (B @ A), palora.delta_weight(layer))  # exactly, not approximately


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_spectral_export_on_untouched_base(method):
    """PiSSA/MiLoRA train against the residual; the rank-2r export on the untouched W gives the same output."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(6, 9, generator=g, dtype=torch.float64)
    holder = nn.ModuleDict({"up_proj": palora.frozen_linear(W.clone())})
    svds = {"up_proj": torch.linalg.svd(W, full_matrices=False)}
    palora.add_lora(holder, method, 2, 4.0, svds, targets=("up_proj",))
    layer = holder["up_proj"]
    with torch.no_grad():  # "trained": any new A, B
        layer.A.add_(torch.randn(layer.A.shape, generator=g, dtype=torch.float64))
        layer.B.add_(torch.randn(layer.B.shape, generator=g, dtype=torch.float64))
    A, B, alpha = palora.export_factors(layer)
    assert A.shape == (4, 9) and alpha == 8.0
    x = torch.randn(3, 9, generator=g, dtype=torch.float64)
    assert torch.allclose(x @ W.T + alpha / A.shape[0] * (x @ A.T) @ B.T, layer(x), atol=1e-10)


# -----------------------------------------------------------------------------
# interop: peft and transformers on a tiny random Llama, our model from model.load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama saved by transformers, plus a word-level tokenizer (model.load needs tokenizer.json)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(64)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))
    return folder


def hf_logits(folder, tokens, adapter=None):
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        hf = PeftModel.from_pretrained(hf, adapter)
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("method", ["palora", "pissa"])
def test_peft_loads_our_adapter(tmp_path, tiny, method):
    folder = tiny
    ours, _ = model_lib.load(folder)
    svds = palora.compute_svds(ours, cache_dir=tmp_path / "svd")
    protected = palora.probe(svds, {n: torch.rand(len(s)) + 0.5 for n, (_, s, _) in svds.items()}, fraction=0.25)
    palora.add_lora(ours, method, 4, 8.0, svds, protected)
    with torch.no_grad():  # a "trained" adapter: random A and B
        for p in palora.lora_state(ours).values():
            p.add_(torch.randn_like(p) * 0.1)
    palora.save_peft(ours, tmp_path / "adapter", str(folder), {"method": method})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "up_proj"] and config["r"] == (8 if method == "pissa" else 4)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), hf_logits(folder, tokens, tmp_path / "adapter"), atol=1e-5)
    fresh, _ = model_lib.load(folder)  # and back: our load_peft on an untouched model gives the same logits
    palora.load_peft(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(tokens), ours(tokens), atol=1e-5)


def test_transformers_loads_merged_svf(tmp_path, tiny):
    folder = tiny
    ours, _ = model_lib.load(folder)
    svds = palora.compute_svds(ours, cache_dir=tmp_path / "svd")
    z = palora.add_svf(ours, svds)
    with torch.no_grad():
        for t in z.values():
            t.mul_(torch.rand_like(t) + 0.5)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = ours(tokens)
    palora.save_merged_checkpoint(ours, folder, tmp_path / "merged")
    assert torch.allclose(hf_logits(tmp_path / "merged", tokens), expected, atol=1e-5)
    reloaded, _ = model_lib.load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(tokens), expected, atol=1e-5)


# -----------------------------------------------------------------------------
# bad input: each a clear error before any training


def test_z_file_errors(tmp_path, tiny):
    folder = tiny
    ours, _ = model_lib.load(folder)
    svds = palora.compute_svds(ours, cache_dir=None)
    z = palora.add_svf(ours, svds)
    palora.save_svf(tmp_path / "z.safetensors", ours, {"steps": 3})
    loaded, meta = palora.load_svf(tmp_path / "z.safetensors", model=ours)
    assert set(loaded) == set(z) and meta["checkpoint"] == ours.identity and meta["steps"] == "3"
    with pytest.raises(PaloraError, match="made for checkpoint"):
        palora.load_svf(tmp_path / "z.safetensors", identity="another-checkpoint")
    bad = {n: torch.ones(len(t) + 1) for n, t in z.items()}
    palora.save_svf(tmp_path / "bad.safetensors", bad, {"checkpoint": ours.identity})
    with pytest.raises(PaloraError, match="has shape"):
        palora.load_svf(tmp_path / "bad.safetensors", model=ours)
    with pytest.raises(PaloraError, match="checkpoint identity"):
        palora.save_svf(tmp_path / "anon.safetensors", bad, {})


@pytest.mark.parametrize("setting", [dict(fraction=0.0), dict(fraction=1.0), dict(fraction=1.5), dict(global_fraction=-0.1)])
def test_probe_fraction_outside_unit_interval(setting):
    svds = {"w": (None, torch.ones(4), None)}
    with pytest.raises(PaloraError, match=r"must be in \(0, 1\)"):
        palora.probe(svds, {"w": torch.ones(4)}, **setting)


def test_probe_more_than_rank():
    svds = {"w": (None, torch.ones(4), None)}
    with pytest.raises(PaloraError, match="selects 5 components of w, which has rank 4"):
        palora.probe(svds, {"w": torch.rand(4)}, k=5)
    with pytest.raises(PaloraError, match="does not match"):
        palora.probe(svds, {"w": torch.rand(5)}, k=1)


def test_svd_cache(tmp_path):
    holder = nn.ModuleDict({"down_proj": nn.Linear(6, 4, bias=False)})
    first = palora.compute_svds(holder, ("down_proj",), tmp_path, identity="ck")
    path = tmp_path / "ck" / "down_proj.safetensors"
    assert path.exists()
    again = palora.compute_svds(holder, ("down_proj",), tmp_path, identity="ck")
    assert all(torch.equal(a, b) for a, b in zip(first["down_proj"], again["down_proj"]))
    with torch.no_grad():  # the weight changed under the same identity: stale, recomputed with a warning
        holder["down_proj"].weight.mul_(2)
    with pytest.warns(UserWarning, match="stale SVD cache .*weight_sha256"):
        fresh = palora.compute_svds(holder, ("down_proj",), tmp_path, identity="ck")
    assert torch.allclose(fresh["down_proj"][1], 2 * first["down_proj"][1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(PaloraError, match="corrupted SVD cache"):
        palora.compute_svds(holder, ("down_proj",), tmp_path, identity="ck")
    path.write_bytes(bytes(data[:40]))  # truncated
    with pytest.raises(PaloraError, match="unreadable"):
        palora.compute_svds(holder, ("down_proj",), tmp_path, identity="ck")


def test_unknown_target_and_method():
    holder = nn.ModuleDict({"up_proj": nn.Linear(3, 3, bias=False), "o_proj": nn.Linear(3, 3)})
    with pytest.raises(PaloraError, match="unknown target 'q_proj'.*up_proj"):
        palora.find_targets(holder, ("q_proj",))
    with pytest.raises(PaloraError, match="o_proj has a bias"):
        palora.find_targets(holder, ("o_proj",))
    with pytest.raises(PaloraError, match="unknown method 'dora'"):
        palora.add_lora(holder, "dora", 2, 4.0, targets=("up_proj",))
    with pytest.raises(PaloraError, match="needs protected"):
        palora.add_lora(holder, "palora", 2, 4.0, {"up_proj": palora.svd(holder["up_proj"].weight)}, targets=("up_proj",))
