"""Tests for smf.py on a tiny random Llama written by transformers (tests/tiny.py). CPU, seconds.

Expected values are derived: the product-key lookup equals the brute-force top-k over all n² slots;
with V = 0 the retrofitted model is the original bit for bit; after SMF steps every tensor but the
chosen rows of V is bit-identical; a saved run (adapters.save_smf / load_smf) reloads exactly.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
import checkpoints
import model as model_lib
import palora
import smf
from tiny import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def background_run(model, seed=0, n=6, length=12):
    """Forward passes on n unpadded random sequences (the background corpus), one row each."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 300, (1, length), generator=g) for _ in range(n)]
    return lambda: [model(s) for s in seqs]


def facts(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (5,), generator=g).tolist() for _ in range(n)]
    answers = [torch.randint(3, 300, (3,), generator=g).tolist() for _ in range(n)]
    tokens = torch.tensor([p + a for p, a in zip(prompts, answers)])  # (n, 8)
    labels = torch.tensor([[-100] * 5 + a for a in answers])
    return tokens, labels, torch.ones_like(tokens)


def retrofitted(folder, n_slots=64, k=4):
    model, _ = model_lib.load(folder)
    with torch.no_grad():  # see test_imsm: the random head bounds every logit by ~1.3
        model.lm_head.weight.mul_(20.0)
    smf.add_memory(model, [0, 1], n_slots, k, keys_from=background_run(model))
    background = smf.accesses(model, background_run(model, seed=1))
    return model, background


# -----------------------------------------------------------------------------
# math


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 9), k=st.integers(1, 9), half=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_lookup_equals_brute_force(n, k, half, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2 * half, generator=g, dtype=torch.float64)
    W_q = torch.eye(2 * half, dtype=torch.float64)
    K = torch.randn(2, n, half, generator=g, dtype=torch.float64)
    weights, slots = smf.lookup(x, W_q, K, k)
    q1, q2 = x.chunk(2, -1)
    s = ((q1 @ K[0].T)[:, :, None] + (q2 @ K[1].T)[:, None, :]).flatten(1)  # (3, n²): i·n + j
    best, want = s.topk(k, -1)
    assert torch.equal(slots.sort(-1).values, want.sort(-1).values)
    assert torch.allclose(weights, best.softmax(-1), atol=1e-12)


def test_slot_scores_formulas():
    """tfidf = (c_i/Σc) log((|B|+1)/(df_i+1)); kl = p_b log(p_b/p_bg), p_bg add-one smoothed."""
    batch = smf.Access(torch.tensor([2, 2, 0, 4]), torch.tensor([1, 1, 0, 1]), 1)
    bg = smf.Access(torch.tensor([9, 0, 3, 0]), torch.tensor([9, 0, 3, 0]), 9)
    tfidf = smf.slot_scores(batch, bg, "tfidf")
    want = torch.tensor([2 / 8 * math.log(10 / 10), 2 / 8 * math.log(10), 0, 4 / 8 * math.log(10)])
    assert torch.allclose(tfidf, want.double())
    p_bg = torch.tensor([10, 1, 4, 1]) / 16
    kl = smf.slot_scores(batch, bg, "kl")
    assert torch.allclose(
        kl[[0, 1, 3]],
        (want.new_tensor([2, 2, 4]) / 8).double()
        * torch.log(torch.tensor([2, 2, 4]).double() / 8 / p_bg[[0, 1, 3]].double()),
    )
    assert kl[2] == 0  # unused in the batch
    assert smf.top_slots(tfidf, batch.counts, 2).tolist() == [3, 1]  # used everywhere: ranked last


# -----------------------------------------------------------------------------
# the retrofit on a tiny Llama


def test_retrofit_keeps_logits_and_keys(folder):
    model, _ = model_lib.load(folder)
    tokens = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    keys = set(model.state_dict())
    with torch.no_grad():
        want = model(tokens, attention_mask=mask)
        smf.add_memory(model, [1], 16, 2, keys_from=background_run(model))
        got = model(tokens, attention_mask=mask)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert set(model.state_dict()) - keys == {
        f"model.layers.1.mlp.memory.{p}" for p in ("W_q", "K", "V")
    }
    assert list(smf.trainable(model)) == ["model.layers.1.mlp.memory.V"]
    assert smf.added_parameters(model) == 16 * 64 + 64 * 64 + 2 * 4 * 32


def test_keys_come_from_the_checkpoint(folder):
    """k-means keys: every key half is a mean of the background's own queries, so the lookups spread
    over many slots; far more than k (what one query picks)."""
    model, _ = model_lib.load(folder)
    smf.add_memory(model, [0], 64, 4, keys_from=background_run(model))
    used = smf.accesses(model, background_run(model, seed=1))["model.layers.0.mlp.memory"]
    assert int((used.counts > 0).sum()) > 16
    assert used.docs == 6 and int(used.counts.sum()) == 6 * 12 * 4


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    x = (centers[:, None] + 0.1 * torch.randn(3, 40, 2, generator=g)).flatten(0, 1)  # (120, 2)
    C = smf.kmeans(x, 3, g)
    assert torch.cdist(C, centers).min(-1).values.max() < 0.1
    assert torch.cdist(C, centers).argmin(-1).sort().values.tolist() == [0, 1, 2]


def test_keys_are_centroids_of_the_queries(folder):
    """With keys_from, each key half is the mean of the background queries nearest to it (Lloyd's
    fixed point: 72 token states, 8 keys, 20 iterations converge), not the random init. (A bound
    |K_i| > 2.5 stood here and failed: centroids of ~9 queries of norm ~3.2 average to ~1.9.)"""
    model, _ = model_lib.load(folder)
    g = torch.Generator().manual_seed(0)
    x = smf.mlp_inputs(model, [0], background_run(model), 10**6, g)[0]  # every token state
    smf.add_memory(model, [0], 64, 4, keys_from=background_run(model))
    memory = smf.memories(model)["model.layers.0.mlp.memory"]
    queries = torch.nn.functional.linear(x, memory.W_q).chunk(2, dim=-1)  # 2 x (72, Dq/2)
    for q, K in zip(queries, memory.K):
        nearest = torch.cdist(q, K).argmin(-1)  # (72,)
        assert len(nearest.unique()) > 1
        for j in nearest.unique():
            assert torch.allclose(K[j], q[nearest == j].mean(0), atol=1e-5)


def test_steps_change_only_the_chosen_rows(folder):
    model, background = retrofitted(folder)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tokens, labels, mask = facts()
    opt = smf.optimizer(model, lr=0.1)
    chosen = {}
    for _ in range(3):
        _, rows = smf.train_step(model, tokens, labels, mask, background, opt, top_t=8)
        for n, r in rows.items():
            assert 0 < len(r) <= 8
            chosen[n] = torch.cat([chosen.get(n, r[:0]), r])
    for name, t in model.state_dict().items():
        memory = name.removesuffix(".V")
        if memory not in chosen:
            assert torch.equal(t, before[name]), name
            continue
        moved = (t != before[name]).any(-1)  # (N,) rows that changed
        assert moved.any()
        assert set(torch.nonzero(moved).flatten().tolist()) <= set(chosen[memory].tolist())


def test_training_reduces_loss_on_facts(folder):
    model, background = retrofitted(folder)
    tokens, labels, mask = facts()
    opt = smf.optimizer(model, lr=0.1)
    losses = [smf.train_step(model, tokens, labels, mask, background, opt, top_t=16)[0]]
    for _ in range(30):
        losses.append(smf.train_step(model, tokens, labels, mask, background, opt, top_t=16)[0])
    assert losses[-1] < losses[0] / 2


def test_save_load_same_logits(folder, tmp_path):
    model, background = retrofitted(folder)
    tokens, labels, mask = facts()
    opt = smf.optimizer(model, lr=0.1)
    for _ in range(3):
        smf.train_step(model, tokens, labels, mask, background, opt, top_t=8)
    path, identity = tmp_path / "smf.safetensors", checkpoints.identity(folder)
    adapters.save_smf(model, path, identity, {"method": "smf"})
    fresh, _ = model_lib.load(folder)
    with torch.no_grad():
        fresh.lm_head.weight.mul_(20.0)
    adapters.load_smf(fresh, path, identity)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))
    other_folder = make_tiny_llama(tmp_path / "other", seed=1)
    other, _ = model_lib.load(other_folder)
    with pytest.raises(palora.PaloraError, match="smf.safetensors: made for checkpoint"):
        adapters.load_smf(other, path, checkpoints.identity(other_folder))


@pytest.mark.parametrize(
    "n_slots, k, layers, match",
    [
        (15, 2, [0], "square"),
        (1, 1, [0], "square"),
        (16, 0, [0], "top-k"),
        (16, 5, [0], "top-k"),
        (16, 2, [2], "outside"),
    ],
)
def test_bad_sizes_fail_before_allocation(folder, n_slots, k, layers, match):
    model, _ = model_lib.load(folder)
    with pytest.raises(smf.SMFError, match=match) as e:
        smf.add_memory(model, layers, n_slots, k)
    assert e.value.expected and not smf.memories(model)
