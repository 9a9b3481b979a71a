"""Tests for imsm.py on a tiny random Llama written by transformers (tests/tiny.py). CPU, seconds.

Expected values are derived: the gate's output lies between the two streams (a convex combination,
up to float64 rounding); with B = 0 in the LoRA both streams are the model, so the Siamese gives
the model's logits; cached decoding (model.generate on the Siamese: two KV caches) equals the
uncached two-stream forward; a saved run (adapters.save_imsm / load_imsm) reloads exactly.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
import checkpoints
import imsm
import model as model_lib
import palora
from tiny import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
U64 = 2.0**-53


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def perturbed(folder, seed=0):
    """A Siamese with random LoRA B and gate B: the streams differ and the gate is not 1/2."""
    model, _ = model_lib.load(folder)
    siamese = imsm.Siamese(model, r=4, alpha=8.0, gate_rank=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in imsm.trainable(siamese).items():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * (3.0 if name == "gate.B" else 0.5))
    return siamese


# -----------------------------------------------------------------------------
# the gate


@settings(max_examples=30, deadline=None)
@given(D=st.integers(1, 8), r=st.integers(1, 4), T=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_gate_output_is_convex_combination(D, r, T, seed):
    g = torch.Generator().manual_seed(seed)
    h_f, h_t = (torch.randn(2, T, D, generator=g, dtype=torch.float64) * 10 for _ in range(2))
    mean_f, mean_t = h_f.mean(1), h_t.mean(1)
    A = torch.randn(r, 4 * D, generator=g, dtype=torch.float64)
    B = torch.randn(D, r, generator=g, dtype=torch.float64)
    gate = imsm.gate_values(h_f, h_t, mean_f, mean_t, A, B)
    h = imsm.interweave(h_f, h_t, gate)
    slack = 4 * U64 * torch.maximum(h_f.abs(), h_t.abs())  # a*b + c*d rounds within 2u of each term
    assert (gate >= 0).all() and (gate <= 1).all()
    assert (h >= torch.minimum(h_f, h_t) - slack).all()
    assert (h <= torch.maximum(h_f, h_t) + slack).all()
    # the weight is the gate: h - h_t = g (h_f - h_t)
    assert torch.allclose(h - h_t, gate * (h_f - h_t), atol=1e-12 * (1 + h_f.abs().max()))


# -----------------------------------------------------------------------------
# the siamese model on a tiny Llama


def test_starts_as_the_model(folder):
    """LoRA B = 0: both streams are the model, and any g mixes a with a: the model's logits."""
    model, _ = model_lib.load(folder)
    tokens = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        want = model(tokens, attention_mask=mask)
        siamese = imsm.Siamese(model, r=4, alpha=8.0, gate_rank=4)
        got = siamese(tokens, attention_mask=mask)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    layers = imsm.lora_layers(model)  # x Wᵀ still through the model's own linear (fast path)
    assert layers and all(type(layer.base) is model_lib.Linear for layer in layers)
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if n[-2:] not in (".A", ".B")
    )


def test_frozen_stream_is_the_model(folder):
    """adapters_off gives the model without its LoRA; the scales come back after it."""
    model, _ = model_lib.load(folder)
    tokens = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(tokens)
        siamese = perturbed(folder)
        with imsm.adapters_off(siamese.model):
            frozen = siamese.model(tokens)
        tuned = siamese.model(tokens)
    assert torch.equal(frozen, want)
    assert not torch.allclose(tuned, want, atol=1e-3)


def test_loss_means_over_the_prompt_only(folder):
    """An answer cannot be seen at prefill: the loss's logits on the prompt and its first answer
    token do not depend on later answer tokens, and it equals the forward with the prompt mask."""
    siamese = perturbed(folder)
    tokens = torch.tensor([[5, 17, 40, 9, 33, 71, 2], [5, 17, 40, 9, 33, 88, 99]])
    labels = torch.tensor([[-100] * 4 + [33, 71, 2], [-100] * 4 + [33, 88, 99]])
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        prompt = torch.tensor([[1] * 4 + [0] * 3] * 2)
        logits = siamese(tokens, attention_mask=mask, prompt_mask=prompt)  # (2, 7, V)
        assert torch.equal(logits[0, :5], logits[1, :5])
        want = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        )
        assert torch.equal(imsm.loss(siamese, tokens, labels, mask), want)


def greedy_uncached(siamese, prompt, n):
    """The two-stream forward on the whole sequence at every step, mean_p over the prompt."""
    seq = list(prompt)
    for _ in range(n):
        prompt_mask = torch.tensor([[1] * len(prompt) + [0] * (len(seq) - len(prompt))])
        logits = siamese(torch.tensor([seq]), prompt_mask=prompt_mask)[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def test_generate_with_two_caches_equals_uncached(folder):
    siamese = perturbed(folder)
    prompts = [[5, 17, 40, 9, 33, 71, 2, 8], [12, 99, 4]]  # the second is left-padded by 5
    got = model_lib.generate(siamese, prompts, max_new_tokens=6, eos_ids={-1})
    with torch.no_grad():
        want = [greedy_uncached(siamese, p, 6) for p in prompts]
    assert got == want


def test_finished_rows_leave_both_caches_with_the_same_answers(folder):
    """model.generate drops finished rows through the model's own keep_rows: both streams' caches
    and the prompt means shrink together, and every row answers as it does alone."""
    siamese = perturbed(folder)
    g = torch.Generator().manual_seed(1)
    lengths = (3, 9, 5, 12, 7, 4, 10, 6)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]
    free = model_lib.generate(siamese, prompts, 12, eos_ids=set())
    eos = {free[0][2], free[3][5]}  # rows stop at different steps
    sizes = []
    hook = siamese.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    got = model_lib.generate(siamese, prompts, 12, eos)
    hook.remove()
    assert sizes[0] == len(prompts) and min(sizes) < len(prompts)  # the batch did shrink
    assert got == [model_lib.generate(siamese, [p], 12, eos)[0] for p in prompts]


def test_save_load_same_logits(folder, tmp_path):
    siamese = perturbed(folder)
    path, identity = tmp_path / "imsm.safetensors", checkpoints.identity(folder)
    adapters.save_imsm(siamese, path, identity, {"method": "imsm"})
    fresh, _ = model_lib.load(folder)
    loaded = adapters.load_imsm(fresh, path, identity)
    tokens = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), siamese(tokens))
    assert imsm.added_parameters(loaded) == imsm.added_parameters(siamese)


def test_load_on_another_checkpoint_is_refused(folder, tmp_path):
    path = tmp_path / "run" / "imsm.safetensors"
    adapters.save_imsm(perturbed(folder), path, checkpoints.identity(folder), {})
    other = make_tiny_llama(tmp_path / "other", seed=1)
    model, _ = model_lib.load(other)
    with pytest.raises(palora.PaloraError, match="imsm.safetensors: made for checkpoint"):
        adapters.load_imsm(model, path, checkpoints.identity(other))


def test_training_learns_facts(folder):
    """3 facts (prompt -> 3-token answer); 30 Adam steps on the LoRA and the gate. The loss falls by
    at least 10x and greedy decoding (two caches) then gives each answer, which it did not before.
    The head is sharpened 20x: at the random init (std 0.02) every logit is below |w| √D ≈ 1.3, so
    no answer could become likely."""
    model, _ = model_lib.load(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    siamese = imsm.Siamese(model, r=4, alpha=8.0, gate_rank=4)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 300, (5,), generator=g).tolist() for _ in range(3)]
    answers = [torch.randint(3, 300, (3,), generator=g).tolist() for _ in range(3)]
    tokens = torch.tensor([p + a for p, a in zip(prompts, answers)])  # (3, 8), no padding
    labels = torch.tensor([[-100] * 5 + a for a in answers])
    mask = torch.ones_like(tokens)
    optimizer = torch.optim.Adam(imsm.param_groups(imsm.trainable(siamese), lr=1e-2, gate_lr=1e-2))
    before = imsm.loss(siamese, tokens, labels, mask).item()
    assert model_lib.generate(siamese, prompts, 3, eos_ids={-1}) != answers
    for _ in range(30):
        optimizer.zero_grad()
        imsm.loss(siamese, tokens, labels, mask).backward()
        optimizer.step()
    after = imsm.loss(siamese, tokens, labels, mask).item()
    assert after < before / 10
    assert model_lib.generate(siamese, prompts, 3, eos_ids={-1}) == answers


def test_bad_sizes(folder):
    model, _ = model_lib.load(folder)
    for kwargs in ({"r": 0}, {"gate_rank": 0}, {"alpha": -1.0}):
        with pytest.raises(imsm.IMSMError) as e:
            imsm.Siamese(model, **kwargs)
        assert e.value.expected
    with pytest.raises(palora.PaloraError, match="unknown target"):
        imsm.Siamese(model, targets=("w9",))
