"""model.py against transformers on tiny random checkpoints that transformers itself wrote
(tests/tiny.py).

Parity: logits within 1e-4 in float32 (with and without left padding), 20 greedy tokens through our
KV cache equal
to transformers' generate (the tokenizer: test_tokenizer.py). Bad input: one clear error naming
the file. CPU only, no downloads, a few seconds.
"""

import json
import math
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

import cli
import model as M
from tests.tiny import make_tiny_llama, make_tiny_mistral

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ["llama", "llama_tied", "mistral"]
ATOL = 1e-4  # float32 parity: both sides run the same arithmetic, only op order differs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny_llama(root / "llama"),
        "llama_tied": make_tiny_llama(root / "llama_tied", tie=True),
        "mistral": make_tiny_mistral(root / "mistral"),
    }


def batch(T=12, pads=(0, 4, 7), seed=0):
    """tokens (B, T) with row b left-padded by pads[b] (pad id 0), and the matching attention
    mask."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 300, (len(pads), T), generator=g)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for b, p in enumerate(pads):
        tokens[b, :p], mask[b, :p] = 0, 0
    return tokens, mask


def hf_model(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# config


def test_config_defaults_match_transformers(folders):
    """Optional keys absent from config.json get the defaults of transformers' own config
    classes."""
    llama = json.loads((folders["llama"] / "config.json").read_text())
    mistral = json.loads((folders["mistral"] / "config.json").read_text())
    assert (
        M.ModelArgs.from_hf_config(mistral).head_dim,
        M.ModelArgs.from_hf_config(mistral).sliding_window,
    ) == (24, 5)
    drop = lambda config, *keys: {k: v for k, v in config.items() if k not in keys}
    args = M.ModelArgs.from_hf_config(
        drop(llama, "head_dim", "num_key_value_heads", "tie_word_embeddings")
    )
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4)
    assert (
        args.head_dim,
        args.num_key_value_heads,
        args.tie_word_embeddings,
        args.sliding_window,
    ) == (hf.head_dim, hf.num_key_value_heads, hf.tie_word_embeddings, None)
    args = M.ModelArgs.from_hf_config(drop(mistral, "head_dim", "sliding_window"))
    hf = MistralConfig(hidden_size=64, num_attention_heads=4)
    assert (args.head_dim, args.sliding_window) == (hf.head_dim, hf.sliding_window)
    assert M.ModelArgs.from_hf_config(dict(mistral, sliding_window=None)).sliding_window is None
    with pytest.raises(ValueError, match="config.json: missing key 'num_key_value_heads'"):
        M.ModelArgs.from_hf_config(drop(mistral, "num_key_value_heads"))


def test_legacy_rope_keys_read_like_rope_parameters(folders):
    """Hub files (transformers 4) write rope_theta + rope_scaling; transformers 5 writes
    rope_parameters."""
    config = json.loads((folders["llama"] / "config.json").read_text())
    rope = config.pop("rope_parameters")
    legacy = dict(
        config,
        rope_theta=rope.pop("rope_theta"),
        rope_scaling=dict(rope, type=rope.pop("rope_type")),
    )
    assert M.ModelArgs.from_hf_config(legacy) == M.ModelArgs.from_hf_config(
        json.loads((folders["llama"] / "config.json").read_text())
    )
    assert M.ModelArgs.from_hf_config(legacy).rope_scaling["factor"] == 8.0


def llama3_bands(config: dict) -> list[str]:
    """Each rotary pair's band under llama3 scaling, by hand from its wavelength 2π/θ_i against
    the original context (Llama 3 paper, sec. 3.3), not by model.py's smooth factor."""
    rope = config["rope_parameters"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    original = rope["original_max_position_embeddings"]
    bands = []
    for i in range(head_dim // 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (2 * i / head_dim)
        if wavelength < original / rope["high_freq_factor"]:
            bands.append("kept")
        elif wavelength > original / rope["low_freq_factor"]:
            bands.append("divided")
        else:
            bands.append("interpolated")
    return bands


def test_llama3_rope_keeps_divides_and_interpolates_the_tiny_bands(folders):
    """All three bands occur in the tiny Llama (tests/tiny.py), and model.py gives each its θ:
    pair 0 as it is, pairs 2-7 divided by factor, pair 1 between the two with the smooth factor
    s = (original / wavelength - low) / (high - low), here (64 / 32.4 - 1) / 3 = 0.325."""
    config = json.loads((folders["llama"] / "config.json").read_text())
    assert llama3_bands(config) == ["kept", "interpolated"] + ["divided"] * 6
    args = M.ModelArgs.from_hf_config(config)
    plain = 1.0 / 5e5 ** (torch.arange(0, 16, 2).double() / 16)  # θ_i, unscaled
    theta = M.rope_frequencies(args, "cpu").double()
    s = (64 * plain[1] / (2 * math.pi) - 1.0) / (4.0 - 1.0)
    assert 0 < s < 1
    torch.testing.assert_close(theta[0], plain[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(theta[1], (1 - s) * plain[1] / 8 + s * plain[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(theta[2:], plain[2:] / 8, rtol=1e-6, atol=0)


def test_llama3_frequencies_match_transformers(folders):
    """θ per pair as transformers computes it for the same config.json (every band)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig.from_pretrained(folders["llama"]), "cpu")
    config = json.loads((folders["llama"] / "config.json").read_text())
    ours = M.rope_frequencies(M.ModelArgs.from_hf_config(config), "cpu")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(folders, name):
    ours, _ = M.load(folders[name])
    theirs = hf_model(folders[name])
    tokens, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=ATOL, rtol=0)
        ours_padded, theirs_padded = ours(tokens, mask), theirs(tokens, attention_mask=mask).logits
    real = mask.bool()  # logits at padding positions are unused by both
    assert torch.isfinite(ours_padded).all()
    torch.testing.assert_close(ours_padded[real], theirs_padded[real], atol=ATOL, rtol=0)


def test_sliding_window_is_exercised(folders):
    """The 12-token test sequence is longer than the window (5): removing the window must change the
    logits."""
    ours, _ = M.load(folders["mistral"])
    tokens, _ = batch()
    with torch.no_grad():
        windowed = ours(tokens)
        ours.args.sliding_window = None
        full = ours(tokens)
    assert torch.equal(windowed[:, :5], full[:, :5]) and not torch.allclose(
        windowed[:, 5:], full[:, 5:], atol=ATOL
    )


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_matches_transformers(folders, name):
    ours, tokenizer = M.load(folders[name])
    theirs = hf_model(folders[name])
    tokens, mask = batch()
    prompts = [row[m.bool()].tolist() for row, m in zip(tokens, mask)]
    got = M.generate(ours, prompts, 20, tokenizer.eos_ids)
    expected = theirs.generate(
        tokens, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0
    )
    for row, ref in zip(got, expected[:, tokens.shape[1] :].tolist()):
        stop = [i for i, t in enumerate(ref) if t in tokenizer.eos_ids]
        assert row == ref[: stop[0] if stop else 20]
    assert (
        M.generate(ours, prompts[2:], 20, tokenizer.eos_ids) == got[2:]
    )  # alone, with no padding: the same


@pytest.mark.parametrize("name", MODELS)
def test_a_shared_prefix_runs_once_with_the_same_answers(folders, name):
    """Prompts opening with the same 6 tokens (a chat template's system turn): the prefix runs once,
    in one row, and every answer is still transformers' (left padding, nothing shared) and the one
    the prompt gets alone. Mistral's sequences pass its 5-slot window: nothing is shared there."""
    ours, tokenizer = M.load(folders[name])
    theirs = hf_model(folders[name])
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 300, (6,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 300, (n,), generator=g).tolist() for n in (1, 4, 2, 7)]
    P = max(map(len, prompts))
    sizes = []
    hook = ours.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape))
    got = M.generate(ours, prompts, 12, tokenizer.eos_ids)
    hook.remove()
    windowed = ours.args.sliding_window is not None
    assert sizes[:2] == ([(4, P), (4, 1)] if windowed else [(1, 6), (4, P - 6)])
    tokens = torch.tensor([[0] * (P - len(p)) + p for p in prompts])  # (4, P), left-padded
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    expected = theirs.generate(
        tokens, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    for row, ref in zip(got, expected[:, P:].tolist()):
        stop = [i for i, t in enumerate(ref) if t in tokenizer.eos_ids]
        assert row == ref[: stop[0] if stop else 12]
    assert got == [M.generate(ours, [p], 12, tokenizer.eos_ids)[0] for p in prompts]
    with torch.no_grad():  # sharp attention: random init's is near uniform, keys barely count
        for layer in ours.model.layers:
            layer.self_attn.q_proj.weight *= 30
            layer.self_attn.k_proj.weight *= 30
    got = M.generate(ours, prompts, 12, eos_ids=set())
    assert got == [M.generate(ours, [p], 12, eos_ids=set())[0] for p in prompts]


def test_generation_stops_each_row_at_its_eos(folders):
    ours, _ = M.load(folders["llama"])
    tokens, mask = batch()
    prompts = [row[m.bool()].tolist() for row, m in zip(tokens, mask)]
    free = M.generate(ours, prompts, 20, eos_ids=set())
    eos = free[1][3]  # a token that row 1 emits at step 3: as eos, row 1 stops there
    stopped = M.generate(ours, prompts, 20, eos_ids={eos})
    for row, full in zip(stopped, free):
        assert row == (full[: full.index(eos)] if eos in full else full)


@pytest.mark.parametrize("name", MODELS)
def test_finished_rows_leave_the_batch_with_the_same_answers(folders, name):
    """Rows stopping at different steps leave the batch (and the KV cache): every row's answer is
    still the one it gets alone, unpadded, and the batch does shrink."""
    ours, _ = M.load(folders[name])
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 7, 4, 10, 6)
    ]
    free = M.generate(ours, prompts, 16, eos_ids=set())
    eos = {free[b][step] for b, step in ((0, 2), (3, 5), (5, 9))}  # rows stop at several steps
    sizes = []
    ours.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    got = M.generate(ours, prompts, 16, eos)
    assert sizes[0] == len(prompts) and min(sizes) < len(prompts)
    assert any(len(row) < 16 for row in got) and any(len(row) == 16 for row in got)
    assert got == [M.generate(ours, [p], 16, eos)[0] for p in prompts]


def test_sampling(folders):
    ours, _ = M.load(folders["llama"])
    prompts = [[5, 6, 7], [8, 9]]
    greedy = M.generate(ours, prompts, 8, eos_ids=set())
    # top_p -> 0 keeps only the most likely token, whatever the temperature
    assert (
        M.generate(
            ours,
            prompts,
            8,
            set(),
            temperature=1.0,
            top_p=1e-9,
            generator=torch.Generator().manual_seed(1),
        )
        == greedy
    )
    draws = [
        M.generate(
            ours,
            prompts,
            8,
            set(),
            temperature=1.5,
            top_p=0.9,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (3, 3, 4)
    ]
    assert draws[0] == draws[1] != draws[2]


# -----------------------------------------------------------------------------
# loading


def test_load_ties_weights_and_sets_no_attribute(folders):
    tied, _ = M.load(folders["llama_tied"])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert (
        sum(p.numel() for p in tied.parameters())
        == hf_model(folders["llama_tied"]).num_parameters()
    )
    untied, _ = M.load(folders["llama"], dtype="bfloat16")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert {p.dtype for p in untied.parameters()} == {torch.bfloat16}
    assert not hasattr(untied, "identity")  # the identity travels explicitly, never on the module


def test_bfloat16_close_to_float32(folders):
    """Each of the L blocks and the head round their outputs to bfloat16 (relative error <= eps/2
    each); summed
    linearly, the logits' relative error stays below (L + 1) * eps. transformers in bfloat16 is the
    cross-check."""
    ref, _ = M.load(folders["llama"])
    ours, _ = M.load(folders["llama"], dtype=torch.bfloat16)
    tokens, mask = batch()
    with torch.no_grad():
        full, low, hf_low = (
            ref(tokens, mask),
            ours(tokens, mask).float(),
            hf_model(folders["llama"], torch.bfloat16)(tokens, attention_mask=mask).logits.float(),
        )
    real = mask.bool()
    eps = torch.finfo(torch.bfloat16).eps
    rel = lambda a, b: ((a - b)[real].norm() / b[real].norm()).item()
    assert rel(low, full) < (ref.args.num_hidden_layers + 1) * eps
    assert rel(low, hf_low) < eps


def test_trainable_and_linear_layers_called_as_modules(folders):
    ours, _ = M.load(folders["llama"])
    ours.requires_grad_(False)
    calls = []

    class Scaled(
        torch.nn.Module
    ):  # what an adapter does: replace a child nn.Linear with setattr on its parent
        def __init__(self, linear):
            super().__init__()
            self.linear, self.scale = linear, torch.nn.Parameter(torch.ones(linear.out_features))

        def forward(self, x):
            calls.append(1)
            return self.linear(x) * self.scale

    for layer in ours.model.layers:
        layer.mlp.down_proj = Scaled(layer.mlp.down_proj)
    tokens, mask = batch()
    loss = torch.nn.functional.cross_entropy(
        ours(tokens, mask)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
    )
    loss.backward()
    assert len(calls) == ours.args.num_hidden_layers
    assert all(layer.mlp.down_proj.scale.grad.abs().sum() > 0 for layer in ours.model.layers)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.sampled_from([(1,), (1, 1), (2, 3), (4, 64), (1, M.SMALL), (2, M.SMALL // 2 + 1)]),
    shape=st.sampled_from([(3, 5), (16, 4), (7, 33)]),
    seed=st.integers(0, 2**16),
)
def test_linear_is_F_linear_in_every_form(lead, shape, seed):
    """The (w xᵀ)ᵀ forms (one row as two half-products or as two rows, a few, SMALL) and F.linear
    above it: the same values and gradients as x @ wᵀ, for any leading shape."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(*lead, shape[1], dtype=torch.float64, generator=g, requires_grad=True)
    y = M.linear(x, w)
    want = x.detach() @ w.detach().T
    assert y.shape == (*lead, shape[0])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(grad_y)
    flat = grad_y.reshape(-1, shape[0])
    torch.testing.assert_close(w.grad, flat.T @ x.detach().reshape(-1, shape[1]))
    torch.testing.assert_close(x.grad, grad_y @ w.detach())


def test_command_line_answers_through_the_chat_template(folders, capsys):
    M.main(["--ckpt", str(folders["llama"]), "--max-new-tokens", "6", "Hello"])
    model, tokenizer = M.load(folders["llama"])
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}]),
        add_special_tokens=False,
    )
    assert (
        capsys.readouterr().out
        == tokenizer.decode(M.generate(model, [prompt], 6, tokenizer.eos_ids)[0]) + "\n"
    )


def test_compiled_command_line_gives_the_same_answer(folders, capsys, monkeypatch):
    """--compile: torch.compile with dynamic shapes under inductor's C++ wrapper, the same greedy
    answer as eager."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "cpp_wrapper", False)  # restored after the test: main sets it
    real, calls = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or real(m, **kw))
    args = ["--ckpt", str(folders["llama"]), "--max-new-tokens", "6", "Hello"]
    M.main(args)
    eager = capsys.readouterr().out
    M.main(["--compile", *args])
    assert capsys.readouterr().out == eager
    assert calls == [{"dynamic": True}] and inductor.cpp_wrapper


# -----------------------------------------------------------------------------
# bad input: one clear error naming the file and the problem


def broken_copy(folder, tmp_path, breakage):
    copy = Path(shutil.copytree(folder, tmp_path / "broken"))
    breakage(copy)
    return copy


def edit_config(**changes):
    def breakage(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(
            json.dumps({k: v for k, v in config.items() if v != "DELETE"})
        )

    return breakage


def first_shard(folder):
    return (
        folder
        / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
            "model.embed_tokens.weight"
        ]
    )


def delete_first_shard(folder):
    first_shard(folder).unlink()


def reshape_embedding(folder):
    shard = first_shard(folder)
    tensors = load_file(shard)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:, :32].contiguous()
    save_file(tensors, shard)


def remove_weights(folder):
    for path in list(folder.glob("model*.safetensors*")):
        path.unlink()


def truncate_first_shard(folder):
    shard = first_shard(folder)
    shard.write_bytes(shard.read_bytes()[:-100])


@pytest.mark.parametrize(
    "breakage, match",
    [
        (remove_weights, r"broken: no weights"),
        (
            edit_config(architectures=["GPT2LMHeadModel"]),
            r"config\.json: unsupported architecture 'GPT2LMHeadModel'",
        ),
        (edit_config(hidden_size="DELETE"), r"config\.json: missing key 'hidden_size'"),
        (
            edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
            r"config\.json: unsupported rope type 'yarn'",
        ),
        (
            edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
            r"config\.json: missing key 'factor'",
        ),
        (
            edit_config(num_hidden_layers=1),
            r"model-0000\d-of-0000\d\.safetensors: unexpected tensor 'model\.layers\.1\.",
        ),
        (
            delete_first_shard,
            r"model-00001-of-0000\d\.safetensors: shard listed in model\.safetensors\.index\.json "
            r"is missing",
        ),
        (
            reshape_embedding,
            r"model-00001-of-0000\d\.safetensors: tensor 'model\.embed_tokens\.weight' has shape "
            r"\(320, 32\), "
            r"expected \(320, 64\)",
        ),
        (
            edit_config(num_hidden_layers=-2),
            r"config\.json: num_hidden_layers must be a positive integer, got -2",
        ),
        (
            edit_config(num_attention_heads=0),
            r"config\.json: num_attention_heads must be a positive integer, got 0",
        ),
        (
            edit_config(hidden_size=64.0),
            r"config\.json: hidden_size must be a positive integer, got 64\.0",
        ),
        (
            edit_config(intermediate_size="96"),
            r"config\.json: intermediate_size must be a positive integer, got '96'",
        ),
        (
            edit_config(num_key_value_heads=3),
            r"config\.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3",
        ),
        (edit_config(rms_norm_eps=-1), r"config\.json: rms_norm_eps must be a number in \(0, 1\)"),
        (
            edit_config(vocab_size=10**9),
            r"model-00001-of-0000\d\.safetensors: tensor 'model\.embed_tokens\.weight' has "
            r"shape \(320, 64\), expected \(1000000000, 64\) from config\.json",
        ),
        (
            edit_config(intermediate_size=10**9),
            r"model-0000\d-of-0000\d\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj"
            r"\.weight' has shape \(96, 64\), expected \(1000000000, 64\)",
        ),
        (
            truncate_first_shard,
            r"model-00001-of-0000\d\.safetensors: tensor '.*' runs past the end of the file "
            r"\(truncated\?\)",
        ),
    ],
    ids=[
        "no_weights",
        "architecture",
        "missing_key",
        "rope_type",
        "rope_key",
        "extra_tensor",
        "missing_shard",
        "wrong_shape",
        "negative_layers",
        "zero_heads",
        "float_size",
        "string_size",
        "heads_groups",
        "eps",
        "huge_vocab",
        "huge_mlp",
        "truncated",
    ],
)
def test_bad_checkpoint_names_the_file(folders, tmp_path, breakage, match):
    folder = broken_copy(folders["llama"], tmp_path, breakage)
    with pytest.raises(ValueError, match=match):
        M.load(folder)


def test_missing_tokenizer_names_the_file(folders, tmp_path):
    folder = broken_copy(folders["llama"], tmp_path, lambda f: (f / "tokenizer.json").unlink())
    with pytest.raises(ValueError, match=r"tokenizer\.json: file not found"):
        M.load(folder)


def test_unknown_name_is_an_error():
    with pytest.raises(
        ValueError, match="'no_such_model' is neither a folder nor a known checkpoint"
    ):
        M.load("no_such_model")


def test_million_layers_fail_before_memory_grows(folders, tmp_path):
    """1,000,000 layers would be ~9M meta tensors; the header comparison stops at the first missing
    one."""
    folder = broken_copy(folders["llama"], tmp_path, edit_config(num_hidden_layers=1_000_000))
    tracemalloc.start()
    try:
        with pytest.raises(
            ValueError, match=r"broken: missing tensor 'model\.layers\.2\.input_layernorm\.weight'"
        ):
            M.load(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak


# -----------------------------------------------------------------------------
# one forward for training, prefill and decoding


def test_one_forward_serves_prefill_decoding_and_hidden_states(folders):
    """Prefill, a chunk and single tokens through the cache give the full forward's logits;
    head=False gives the hidden states after the last norm; last=True the last position only."""
    ours, _ = M.load(folders["mistral"])  # sliding window 5 < 12: the cached path masks it too
    tokens, mask = batch()
    with torch.no_grad():
        full = ours(tokens, mask)  # (B, T, V)
        hidden = ours(tokens, mask, head=False)  # (B, T, D)
        torch.testing.assert_close(ours.lm_head(hidden), full, atol=0, rtol=0)
        torch.testing.assert_close(ours(tokens, mask, last=True), full[:, -1:], atol=ATOL, rtol=0)
        cache = ours.new_cache(3, 12)
        pieces = [ours(tokens[:, :6], mask[:, :6], cache, 0)]  # prefill
        pieces.append(ours(tokens[:, 6:9], mask[:, :9], cache, 6))  # a chunk after the cache
        for t in range(9, 12):  # one token at a time
            pieces.append(ours(tokens[:, t : t + 1], mask[:, : t + 1], cache, t))
        real = mask.bool()
        torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=ATOL, rtol=0)
        cache = ours.new_cache(3, 12)  # no padding: no mask at all
        ours(tokens[:, :6], None, cache, 0)
        torch.testing.assert_close(
            ours(tokens[:, 6:], None, cache, 6), ours(tokens)[:, 6:], atol=ATOL, rtol=0
        )


def test_generate_goes_through_the_root_module(folders):
    """Every step calls model(...), so a wrapper's hooks (DDP, FSDP) run; a wrapper with .module
    works."""
    ours, tokenizer = M.load(folders["llama"])
    calls = []
    ours.register_forward_pre_hook(lambda module, args: calls.append(1))

    class Wrapper(torch.nn.Module):  # like DDP: the model in .module, forward passes through
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    got = M.generate(Wrapper(ours), [[5, 6, 7]], 6, eos_ids=set())
    assert len(calls) == 6 and got == M.generate(ours, [[5, 6, 7]], 6, eos_ids=set())


# -----------------------------------------------------------------------------
# command line: bad flags are one line on stderr and exit status 2


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "-1"],
        ["--temperature", "nan"],
        ["--temperature", "inf"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--top-p", "nan"],
        ["--max-new-tokens", "-1"],
        ["--max-new", "5"],
        ["--device", "gpu9"],
        ["--device", "cuda:7"],  # parses as a torch device; this machine has no such GPU
        ["--device", "meta"],
    ],
    ids=[
        "temperature_negative",
        "temperature_nan",
        "temperature_inf",
        "top_p_zero",
        "top_p_above_one",
        "top_p_nan",
        "max_new_tokens_negative",
        "abbreviated",
        "device",
        "device_absent",
        "device_meta",
    ],
)
def test_command_line_refuses_bad_flags(folders, capsys, flags):
    with pytest.raises(SystemExit) as exit_:
        cli.run(M.main, ["--ckpt", str(folders["llama"]), *flags, "Hello"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_command_line_caps_max_new_tokens_at_the_context(folders, capsys):
    model, tokenizer = M.load(folders["llama"])
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}]),
        add_special_tokens=False,
    )
    room = model.args.max_position_embeddings - len(prompt)
    M.main(["--ckpt", str(folders["llama"]), "--max-new-tokens", "1000", "Hello"])
    out, err = capsys.readouterr()
    assert (
        err
        == f"warning: --max-new-tokens 1000 capped to {room}: the prompt has {len(prompt)} tokens "
        f"of "
        f"the context's {model.args.max_position_embeddings}\n"
    )
    assert out == tokenizer.decode(M.generate(model, [prompt], room, tokenizer.eos_ids)[0]) + "\n"


def test_command_line_error_is_one_line(tmp_path):
    """Run as a script (python model.py): an expected error is `error: ...`, no traceback, exit
    2."""
    script = Path(M.__file__)
    done = subprocess.run(
        [sys.executable, script, "--ckpt", str(tmp_path / "none"), "Hi"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: '{tmp_path / 'none'}' is neither a folder nor a known")
