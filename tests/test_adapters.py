"""Tests for adapters.py: every file a method writes or reads, against the libraries that read them
too (peft loads our adapter, transformers our merged folder), each refusal (another checkpoint, a
corrupted or foreign file), and the --method dispatch (attach, optimizer, step, save_run, load_run,
run_method, expected_probe against inject.make_base), imsm and smf runs included. A tiny random
Llama (tests/tiny.py); CPU, seconds.
"""

import dataclasses
import json
import re
import shutil

import pytest
import torch
import torch.nn as nn

import adapters
import checkpoints
import evaluate
import inject
import model as model_lib
import palora
import smf
import tiny
from palora import PaloraError

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(folder, identity) of a tiny random Llama written by transformers (sharded safetensors)."""
    folder = tiny.make_tiny_llama(tmp_path_factory.mktemp("tiny"))
    return folder, checkpoints.identity(folder)


def random_expert(svds: dict, seed: int) -> dict:
    """z = 1 + 0.5 N(0, 1) per component: multipliers far from 1, as a trained expert's can be."""
    g = seeded(seed)
    return {n: 1 + 0.5 * torch.randn(len(s), generator=g) for n, (_, s, _) in svds.items()}


def perturb(params: dict, seed: int):
    """A "trained" adapter: every A and B moved by 0.1 N(0, 1)."""
    g = seeded(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tokens(seed=0):
    return torch.randint(0, tiny.VOCAB_SIZE, (2, 7), generator=seeded(seed))


def hf_logits(folder, ids, adapter=None):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter)
    with torch.no_grad():
        return hf(ids).logits


def lora_run(ckpt, out, method="palora", seed=0, metadata=None):
    """A model with `method` attached through the dispatch (probe of a random expert, a quarter of
    each matrix), perturbed, saved by save_run into `out`; returns the model."""
    folder, identity = ckpt
    model, _ = model_lib.load(folder)
    svds = palora.svds(model)
    S = palora.probe(svds, [random_expert(svds, seed)], ("fraction", 0.25))
    protected = palora.same_count(method, S, svds, seed)
    _, params = adapters.attach(model, method, 4, 8.0, seed, svds, protected)
    perturb(params, seed + 1)
    meta = {"svf": "[]"} if metadata is None else metadata
    adapters.save_run(model, method, out, identity, str(folder), meta)
    return model


# -----------------------------------------------------------------------------
# the SVD cache


def down_proj(seed: int) -> nn.ModuleDict:
    W = torch.randn(4, 6, generator=seeded(seed))
    return nn.ModuleDict({"down_proj": palora.frozen_linear(W)})


def test_svd_cache(tmp_path, monkeypatch, capsys):
    """Computed once, with a progress bar (stderr); read back silently from the file."""
    W = torch.randn(4, 6, generator=seeded(0))
    model = nn.ModuleDict({"down_proj": palora.frozen_linear(W)})
    first = adapters.svds(model, ("down_proj",), "ck", tmp_path)
    assert "SVD: 100%" in capsys.readouterr().err
    path = tmp_path / "ck" / "down_proj.safetensors"
    assert path.exists()
    assert all(torch.equal(a, b) for a, b in zip(first["down_proj"], palora.svd(W)))
    with monkeypatch.context() as m:  # read back from the file, not recomputed
        m.setattr(palora, "svd", lambda W: pytest.fail("the cached SVD was recomputed"))
        again = adapters.svds(model, ("down_proj",), "ck", tmp_path)
    assert "SVD" not in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(first["down_proj"], again["down_proj"]))
    assert adapters.svds(model, ("down_proj",), "ck", "").keys() == first.keys()  # "": no cache


def test_svd_cache_stale_is_recomputed(tmp_path):
    """The weight changed under the same identity (another checkpoint's factors): a warning and
    the new weight's SVD, written back."""
    model = down_proj(seed=0)
    first = adapters.svds(model, ("down_proj",), "ck", tmp_path)
    with torch.no_grad():
        model["down_proj"].weight.mul_(2)
    with pytest.warns(UserWarning, match="stale SVD cache .*weight_sha256"):
        fresh = adapters.svds(model, ("down_proj",), "ck", tmp_path)
    assert torch.allclose(fresh["down_proj"][1], 2 * first["down_proj"][1])
    _, meta = adapters.read_tensors(tmp_path / "ck" / "down_proj.safetensors")
    assert meta["weight_sha256"] == adapters.digest(model["down_proj"].weight)


def test_svd_cache_corrupted_is_an_error(tmp_path):
    model = down_proj(seed=0)
    adapters.svds(model, ("down_proj",), "ck", tmp_path)
    path = tmp_path / "ck" / "down_proj.safetensors"
    good = path.read_bytes()
    tensors, meta = adapters.read_tensors(path)
    del tensors["Vh"]  # the right metadata, a factor missing
    adapters.save_tensors(tensors, path, meta)
    with pytest.raises(PaloraError, match=r"corrupted SVD cache \(not U, s, Vh\)"):
        adapters.svds(model, ("down_proj",), "ck", tmp_path)
    data = bytearray(good)
    data[-5] ^= 0xFF  # flip bits inside the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(PaloraError, match=r"corrupted SVD cache \(checksum\)"):
        adapters.svds(model, ("down_proj",), "ck", tmp_path)
    path.write_bytes(good[:40])  # truncated
    with pytest.raises(PaloraError, match="unreadable"):
        adapters.svds(model, ("down_proj",), "ck", tmp_path)


# -----------------------------------------------------------------------------
# z files and probe files


def test_z_files(tmp_path, ckpt):
    folder, identity = ckpt
    model, _ = model_lib.load(folder)
    z = random_expert(palora.svds(model), seed=0)
    adapters.save_svf(tmp_path / "z.safetensors", z, identity, {"steps": 3})
    loaded, meta = adapters.load_svf(tmp_path / "z.safetensors", identity, model)
    assert loaded.keys() == z.keys() and all(torch.equal(loaded[n], z[n]) for n in z)
    assert meta["checkpoint"] == identity and meta["steps"] == "3"
    assert meta["format"] == "palora-svf" and meta["targets"] == "down_proj,gate_proj,up_proj"
    with pytest.raises(PaloraError, match="made for checkpoint .*'another-checkpoint'"):
        adapters.load_svf(tmp_path / "z.safetensors", "another-checkpoint")
    bad = {n: torch.ones(len(t) + 1) for n, t in z.items()}
    adapters.save_svf(tmp_path / "bad.safetensors", bad, identity)
    with pytest.raises(PaloraError, match="has shape .*R = "):
        adapters.load_svf(tmp_path / "bad.safetensors", identity, model)
    adapters.load_svf(tmp_path / "bad.safetensors", identity)  # no model: shapes unchecked


RANKS = {"a.up_proj": 6, "b.up_proj": 4}


def probe_file(path, protected, identity="ck"):
    adapters.save_probe(path, protected, identity, {"method": "palora"})
    return path


def test_load_probe_reads_back(tmp_path):
    S = {"a.up_proj": torch.tensor([0, 5, 2]), "b.up_proj": torch.tensor([], dtype=torch.int64)}
    loaded, meta = adapters.load_probe(probe_file(tmp_path / "p.safetensors", S), "ck", RANKS)
    assert all(torch.equal(loaded[n], S[n]) for n in S)  # an empty set is a valid selection
    assert meta["format"] == "palora-probe" and meta["method"] == "palora"
    with pytest.raises(PaloraError, match="made for checkpoint 'ck'"):
        adapters.load_probe(tmp_path / "p.safetensors", "other", RANKS)


GOOD = torch.tensor([0, 1])


def good_but(name, S):
    """A well-formed probe of RANKS with one matrix's indices replaced by S."""
    return {**{n: GOOD.clone() for n in RANKS}, name: S}  # safetensors refuses shared memory


NOT_DISTINCT = "does not hold distinct int64 indices in"
BAD_PROBES = {
    "emptied": ({}, "a.up_proj is missing"),
    "missing matrix": ({"a.up_proj": GOOD}, "b.up_proj is missing"),
    # (an empty set per matrix is well formed: a threshold rule can select nothing)
    "not a target": (good_but("c.up_proj", GOOD), "c.up_proj is not a target"),
    "out of range": (good_but("b.up_proj", torch.tensor([1, 4])), f"b.up_proj {NOT_DISTINCT}.*4"),
    "negative": (good_but("a.up_proj", torch.tensor([-1, 2])), f"a.up_proj {NOT_DISTINCT} .0, 6"),
    "float": (good_but("a.up_proj", GOOD.float()), f"a.up_proj {NOT_DISTINCT}"),
    "int32": (good_but("a.up_proj", GOOD.int()), f"a.up_proj {NOT_DISTINCT}"),
    "repeated": (good_but("a.up_proj", torch.tensor([1, 3, 1])), f"a.up_proj {NOT_DISTINCT}"),
    "2-D": (good_but("a.up_proj", GOOD[None]), f"a.up_proj {NOT_DISTINCT}"),
}


@pytest.mark.parametrize("case", list(BAD_PROBES))
def test_load_probe_refuses(tmp_path, case):
    """A probe file that cannot be the run's. (One with some indices removed is well formed: it is
    evaluate.verify's to compare with what the run's record gives.)"""
    protected, message = BAD_PROBES[case]
    path = probe_file(tmp_path / "p.safetensors", protected)
    with pytest.raises(PaloraError, match=f"p.safetensors: {message}"):
        adapters.load_probe(path, "ck", RANKS)


# -----------------------------------------------------------------------------
# PEFT adapters and merged folders, read by peft and transformers


@pytest.mark.parametrize("method", ["palora", "pissa"])
def test_peft_loads_our_adapter(tmp_path, ckpt, method):
    folder, identity = ckpt
    ours = lora_run(ckpt, tmp_path / "adapter", method)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    assert config["r"] == (8 if method == "pissa" else 4)  # PiSSA exports [B | -B0] [A ; A0]
    assert config["lora_alpha"] == (16.0 if method == "pissa" else 8.0)
    assert config["base_model_name_or_path"] == str(folder)
    ids = tokens()
    with torch.no_grad():
        expected = ours(ids)
    assert torch.allclose(hf_logits(folder, ids, tmp_path / "adapter"), expected, atol=1e-5)
    fresh, _ = model_lib.load(folder)  # and back: our load_peft on an untouched model
    layers, meta = adapters.load_peft(fresh, tmp_path / "adapter", identity)
    assert len(layers) == 6 and meta["method"] == method and meta["checkpoint"] == identity
    # x Wᵀ still through the model's own linear (its CPU fast path), as before the adapter
    assert all(type(layer.base) is model_lib.Linear for layer in layers.values())
    with torch.no_grad():
        assert torch.allclose(fresh(ids), expected, atol=1e-5)
    with pytest.raises(PaloraError, match="made for checkpoint"):
        adapters.load_peft(model_lib.load(folder)[0], tmp_path / "adapter", "another-checkpoint")


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    lora_run(ckpt, out, "lora")
    return out


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_dora", True),
        ("use_rslora", True),
        ("fan_in_fan_out", True),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("peft_type", "LOHA"),
        ("rank_pattern", {"model.layers.0.mlp.up_proj": 2}),
        ("alpha_pattern", {"model.layers.0.mlp.up_proj": 2}),
    ],
)
def test_load_peft_refuses_what_it_would_misread(tmp_path, ckpt, adapter, key, value):
    """A plain LoRALinear would give another dW than peft for each of these settings."""
    folder, identity = ckpt
    shutil.copytree(adapter, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(PaloraError, match=f"{key} = .* is not supported"):
        adapters.load_peft(model_lib.load(folder)[0], tmp_path / "a", identity)


def test_load_peft_refuses_an_adapter_that_does_not_fit(tmp_path, ckpt, adapter):
    folder, identity = ckpt
    shutil.copytree(adapter, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(PaloraError, match="the adapter does not fit the model"):
        adapters.load_peft(model_lib.load(folder)[0], tmp_path / "a", identity)
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(PaloraError, match="adapter_config.json: unreadable"):
        adapters.load_peft(model_lib.load(folder)[0], tmp_path / "a", identity)


def test_save_merged_never_writes_through_a_symlink(tmp_path, ckpt):
    """A symlink planted in merged-<sha>/ is replaced, not written through; a merged folder that
    is itself a symlink is refused before anything is written."""
    folder, _ = ckpt
    victim = tmp_path / "victim.json"
    victim.write_text("mine")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "tokenizer.json").symlink_to(victim)
    (tmp_path / "merged" / "model.safetensors").symlink_to(victim)
    ours, _ = model_lib.load(folder)
    adapters.save_merged(ours, folder, tmp_path / "merged")
    assert victim.read_text() == "mine"
    for name in ("tokenizer.json", "model.safetensors"):
        assert not (tmp_path / "merged" / name).is_symlink()
    tokenizer = (tmp_path / "merged" / "tokenizer.json").read_bytes()
    assert tokenizer == (folder / "tokenizer.json").read_bytes()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PaloraError, match="linked: a symlink"):
        adapters.save_merged(ours, folder, tmp_path / "linked")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_transformers_loads_merged_svf(tmp_path, ckpt):
    folder, identity = ckpt
    ours, _ = model_lib.load(folder)
    z = palora.add_svf(ours, palora.svds(ours), random_expert(palora.svds(ours), seed=0))
    ids = tokens()
    with torch.no_grad():
        expected = ours(ids)
    with pytest.raises(PaloraError, match="merge the model first"):
        adapters.save_merged(ours, folder, tmp_path / "merged")
    assert len(z) == 6
    palora.merge_svf(ours)
    adapters.save_merged(ours, folder, tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    assert not list((tmp_path / "merged").glob("*.index.json"))  # one file, not the shards' index
    assert torch.allclose(hf_logits(tmp_path / "merged", ids), expected, atol=1e-5)
    reloaded, _ = model_lib.load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids), expected, atol=1e-5)


# -----------------------------------------------------------------------------
# the dispatch


def test_attach_unknown_method(ckpt):
    model, _ = model_lib.load(ckpt[0])
    with pytest.raises(PaloraError, match="unknown method 'dora'"):
        adapters.attach(model, "dora", 2, 4.0, 0, palora.svds(model))
    with pytest.raises(PaloraError, match="unknown method 'dora'"):
        adapters.save_run(model, "dora", "unused", ckpt[1], "base", {})


def test_the_method_lists_agree():
    """The methods are listed in three places: the dispatch, --method's help, the evaluator's
    comparisons. The help names each method the dispatch knows; each compared one is known."""
    field = next(f for f in dataclasses.fields(inject.Config) if f.name == "method")
    unnamed = [m for m in adapters.METHODS if not re.search(rf"\b{m}\b", field.metadata["help"])]
    assert unnamed == []
    assert {m for pair in evaluate.COMPARE for m in pair} - set(adapters.METHODS) == set()


@pytest.mark.parametrize("method", [m for m, r in adapters.RECORDS.items() if r.weight_update])
def test_a_records_protected_sides_are_those_its_update_leaves_alone(ckpt, method):
    """Method.protects (what evaluate.py --verify checks) against the update itself, trained
    factors perturbed: on each side the record names, dW's share on the protected set is zero up
    to rounding; on a side it does not name, it is not, so the record neither overstates nor
    understates the guarantee. palora_act's input side is its own basis V_act, not V_S."""
    model, _ = model_lib.load(ckpt[0])
    svds = palora.svds(model)
    S = palora.probe(svds, [random_expert(svds, 0)], ("fraction", 0.25))
    protected = palora.same_count(method, S, svds, 0)
    record = adapters.record(method)
    bases = None
    if record.input_bases:  # any orthonormal (in, 3) basis: only its complement is trained
        g = seeded(1)
        shapes = {n: svd[2].shape[1] for n, svd in svds.items()}
        bases = {n: torch.linalg.qr(torch.randn(d, 3, generator=g))[0] for n, d in shapes.items()}
    _, params = adapters.attach(model, method, 4, 8.0, 0, svds, protected, bases)
    perturb(params, 2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, palora.LoRALinear)}
    assert layers.keys() == svds.keys()
    for name, layer in layers.items():
        U_S, V_S = palora.protected_bases(svds[name], protected[name])
        dW = palora.delta_weight(layer).double()  # (out, in)
        leak = palora.leakage(dW, U_S.double(), V_S.double())
        for side in (0, 1):
            if side in record.protects:
                assert leak[side] < 1e-5, (name, side)
            else:
                assert leak[side] > 1e-3, (name, side)


def test_run_method_trusts_the_adapter_file(tmp_path, ckpt):
    """config.json is easy to edit; the adapter file's metadata says what the run trained."""
    lora_run(ckpt, tmp_path, "palora")
    config = {"method": "lora", "ckpt": "x", "svf": ["e.safetensors"], "targets": "up_proj"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert adapters.run_config(tmp_path)["method"] == "lora"
    assert adapters.run_method(tmp_path) == "palora"
    adapters.save_peft(lora_run(ckpt, tmp_path / "b"), tmp_path / "b", ckpt[1], "base", {})
    with pytest.raises(PaloraError, match="no known method in its metadata"):
        adapters.run_method(tmp_path / "b")


def test_run_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        adapters.run_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(PaloraError, match="config.json: unreadable"):
        adapters.run_config(tmp_path)
    good = {"method": "lora", "ckpt": "c", "svf": ["e.safetensors"], "targets": "up_proj"}
    (tmp_path / "config.json").write_text(json.dumps(good))
    assert adapters.run_config(tmp_path) == good
    for bad, why in [
        ([1], "not a JSON object"),
        ({**good, "ckpt": None}, "no str 'ckpt'"),
        ({k: v for k, v in good.items() if k != "targets"}, "no str 'targets'"),
        ({**good, "svf": []}, "'svf' names no expert file"),
        ({**good, "svf": [3]}, "'svf' names no expert file"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(PaloraError, match=f"not an inject.py run's config \\({why}"):
            adapters.run_config(tmp_path)


def test_load_run(tmp_path, ckpt):
    """The run's adapter on the untouched model, merged; dW per weight is the trained layer's."""
    folder, identity = ckpt
    ours = lora_run(ckpt, tmp_path, "palora")
    trained = {n: m for n, m in ours.named_modules() if isinstance(m, palora.LoRALinear)}
    model, _ = model_lib.load(folder)
    merged, info = adapters.load_run(model, tmp_path, identity)
    assert info["method"] == "palora"
    assert info["added"] == sum(m.A.numel() + m.B.numel() for m in trained.values())
    assert info["dW"].keys() == trained.keys()
    for n, layer in trained.items():
        want = palora.delta_weight(layer).double()
        assert torch.allclose(info["dW"][n], want, atol=1e-6 * want.norm().item())
    assert not any(isinstance(m, palora.LoRALinear) for m in merged.modules())
    ids = tokens()
    with torch.no_grad():
        assert torch.allclose(merged(ids), ours(ids), atol=1e-5)


def memory() -> adapters.Memory:
    """SMF at a tiny model's scale: 64 slots (8 keys per half), top-k 4, a background corpus of 6
    random sequences of 12 tokens (72 token states for 8 k-means keys)."""
    g = seeded(3)
    corpus = [torch.randint(3, tiny.VOCAB_SIZE, (12,), generator=g).tolist() for _ in range(6)]
    return adapters.Memory(slots=64, top_k=4, top_t=8, corpus=corpus)


def other_run(ckpt, out, method):
    """imsm or smf attached through the dispatch, trained tensors perturbed (smf: the first 5 value
    rows of each layer), saved by save_run -> (the module, its params)."""
    folder, identity = ckpt
    model, _ = model_lib.load(folder)
    module, params = adapters.attach(model, method, 4, 8.0, 0, palora.svds(model), memory=memory())
    if method == "smf":
        params = {n: p[:5] for n, p in params.items()}  # views: the rows perturb moves
    perturb(params, 1)
    adapters.save_run(module, method, out, identity, str(folder), {"svf": "[]"})
    return module, params


@pytest.mark.parametrize("method", ["imsm", "smf"])
def test_imsm_and_smf_runs_reload_with_the_same_logits(tmp_path, ckpt, method):
    """save_run -> load_run gives the same logits; added = IMSM's LoRA + 5 D r gate, SMF's memory
    tensors (V, W_q, K); slots touched = the rows moved; no dW (leakage undefined); on another
    checkpoint the run's file is named."""
    folder, identity = ckpt
    module, _ = other_run(ckpt, tmp_path, method)
    assert adapters.run_file(tmp_path) == tmp_path / f"{method}.safetensors"
    assert adapters.run_method(tmp_path) == method
    model, _ = model_lib.load(folder)
    D, L = model.args.hidden_size, len(model.model.layers)
    lora = sum(4 * (m.in_features + m.out_features) for m in palora.find_targets(model).values())
    loaded, info = adapters.load_run(model, tmp_path, identity)
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), module(tokens()))
    assert info["method"] == method and info["dW"] == {}
    if method == "imsm":
        assert info["added"] == lora + 5 * D * 4
    else:
        layers = len(smf.default_layers(L))
        assert info["added"] == layers * (64 * D + D * D + 2 * 8 * D // 2)  # V, W_q, K
        assert info["touched"] == 5 * layers
    other = tiny.make_tiny_llama(tmp_path / "other", seed=1)
    match = rf"{tmp_path / method}.safetensors: made for checkpoint"
    with pytest.raises(PaloraError, match=match):
        adapters.load_run(model_lib.load(other)[0], tmp_path, checkpoints.identity(other))


def test_optimizer_and_step_per_method(ckpt):
    """IMSM: the gate at its own stated lr; SMF: SparseAdam, one step moves at most top-T value
    rows per layer and nothing else; the LoRA family: Adam at lr."""
    model, _ = model_lib.load(ckpt[0])
    siamese, params = adapters.attach(model, "imsm", 4, 8.0, 0, palora.svds(model))
    groups = adapters.optimizer("imsm", params, 1e-3, 7e-2).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 7e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(siamese.gate.A), id(siamese.gate.B)}
    model, _ = model_lib.load(ckpt[0])
    _, params = adapters.attach(model, "lora", 4, 8.0, 0, palora.svds(model))
    assert type(adapters.optimizer("lora", params, 1e-3, 7e-2)) is torch.optim.Adam
    model, _ = model_lib.load(ckpt[0])
    mem = memory()
    _, params = adapters.attach(model, "smf", 4, 8.0, 0, {}, memory=mem)
    opt = adapters.optimizer("smf", params, 0.1, 7e-2)
    assert isinstance(opt, torch.optim.SparseAdam)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ids = tokens()
    labels = torch.cat([torch.full((2, 4), -100), ids[:, 4:]], 1)
    loss = adapters.step("smf", model, opt, ids, labels, torch.ones_like(ids), mem)
    assert loss.dim() == 0 and torch.isfinite(loss)
    for n, t in model.state_dict().items():
        rows = int((t != before[n]).flatten(1).any(-1).sum()) if t.dim() > 1 else 0
        assert rows <= (mem.top_t if n in params else 0), n
    assert sum(int((p != 0).any(-1).sum()) for p in params.values()) > 0


@pytest.mark.parametrize(
    "method, rule, score",
    [
        ("palora", ("fraction", 0.3), "delta"),
        ("topk", ("global_fraction", 0.2), "energy"),
        ("random", ("fraction", 0.5), "delta"),
        ("random", ("threshold", 0.3), "energy"),
    ],
)
def test_expected_probe_is_what_make_base_gives(tmp_path, ckpt, method, rule, score):
    """inject.make_base's (S, protected) with two experts, reproduced from the probe file's record
    alone, after the metadata's round trip through strings."""
    folder, identity = ckpt
    model, _ = model_lib.load(folder)
    svds = palora.svds(model)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"z{i}.safetensors")
        adapters.save_svf(paths[-1], random_expert(svds, seed=10 + i), identity)
    flags = {
        "fraction": "probe_fraction",
        "threshold": "probe_threshold",
        "global_fraction": "probe_global_fraction",
    }
    cfg = inject.Config(
        method=method, seed=3, svd_cache="", probe_score=score, **{flags[rule[0]]: rule[1]}
    )
    assert (
        palora.probe_rule(cfg.probe_fraction, cfg.probe_threshold, cfg.probe_global_fraction)
        == rule
    )
    experts = [adapters.load_svf(p, identity, model)[0] for p in paths]
    _, S, protected = inject.make_base(model, identity, cfg, experts, palora.MLP_TARGETS)
    meta = {
        "method": method,
        "svf": json.dumps([str(p) for p in paths]),
        "score": score,
        "selection": json.dumps(rule),
        "seed": cfg.seed,
    }  # as inject.main writes it
    adapters.save_probe(tmp_path / "probe.safetensors", protected, identity, meta)
    ranks = {n: len(s) for n, (_, s, _) in svds.items()}
    loaded, meta = adapters.load_probe(tmp_path / "probe.safetensors", identity, ranks)
    fresh, _ = model_lib.load(folder)
    S2, want = adapters.expected_probe(meta, palora.svds(fresh), identity, method)
    assert S2.keys() == S.keys() == want.keys() == ranks.keys()
    for n in S:
        assert torch.equal(S2[n], S[n])
        assert torch.equal(want[n], protected[n]) and torch.equal(loaded[n], protected[n])
    if method != "palora":  # the control and top-k protect the probe's count, not its set
        assert [len(want[n]) for n in S] == [len(S[n]) for n in S]
        assert any(not torch.equal(want[n].sort().values, S[n]) for n in S)


def test_load_peft_refuses_modules_to_save(tmp_path, ckpt, adapter):
    folder, identity = ckpt
    shutil.copytree(adapter, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(
        json.dumps({**config, "modules_to_save": ["lm_head"]})
    )
    with pytest.raises(PaloraError, match="modules_to_save"):
        adapters.load_peft(model_lib.load(folder)[0], tmp_path / "a", identity)
