"""A Llama / Mistral decoder that loads Hugging Face checkpoints key for key, and its generation
loop.

Read top to bottom: config -> layers -> model -> generation -> loading -> command line.
The tokenizer is in tokenizer.py; names, files and safetensors headers in checkpoints.py.
References:
- Llama 2/3: https://arxiv.org/abs/2307.09288, https://arxiv.org/abs/2407.21783 (llama3 rope)
- Mistral 7B (grouped-query attention, sliding window): https://arxiv.org/abs/2310.06825
- RoPE https://arxiv.org/abs/2104.09864, RMSNorm https://arxiv.org/abs/1910.07467,
  SwiGLU https://arxiv.org/abs/2002.05202
- transformers models/llama/modeling_llama.py: module names and the rotate_half rope layout,
  so checkpoints load with no weight permutation.
- gpt-fast model.py: one forward for training, prefill and decoding, a preallocated KV cache.

Run:  python model.py "What is the capital of France?"      (default checkpoint smollm2_135m)
      python model.py --ckpt path/to/hf_folder --dtype bfloat16 --temperature 0.7 "Tell me a story"
      python model.py --run runs/inject-palora_act-facts-s0 "What is the capital of Veltoria?"
      python model.py --svf runs/svf-smollm2_135m-reasoning/svf.safetensors   # questions from stdin

Dimension letters: B batch, T query positions, S key positions (cache slots), D hidden size,
H query heads, Hkv key/value heads, Dh head size, F MLP hidden size, V vocabulary.
Linear weights are (out, in).
"""

import argparse
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
from checkpoints import (
    DEFAULT,
    CheckpointError,
    check_tensors,
    read_json,
    read_safetensors,
    resolve,
    weight_index,
)
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: the checkpoint's config.json, read through an explicit key map

REQUIRED = object()
CONFIG_KEYS = {  # config.json key -> its default when absent (HF's), or REQUIRED
    "vocab_size": REQUIRED,
    "hidden_size": REQUIRED,
    "intermediate_size": REQUIRED,
    "num_hidden_layers": REQUIRED,
    "num_attention_heads": REQUIRED,
    "rms_norm_eps": REQUIRED,
    "max_position_embeddings": REQUIRED,
    "num_key_value_heads": None,  # None -> num_attention_heads (no GQA)
    "head_dim": None,  # None -> hidden_size // num_attention_heads
    "tie_word_embeddings": False,  # Llama 3.2 1B/3B and SmolLM2 share lm_head with the embedding
}
ARCHITECTURES = {  # config.json architectures[0] -> the keys it adds, with HF's default
    "LlamaForCausalLM": {},
    # sliding_window null = full attention; HF's num_key_value_heads default (8) is Mistral 7B's
    # size: require it
    "MistralForCausalLM": {"sliding_window": 4096, "num_key_value_heads": REQUIRED},
}
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
SIZES = (  # positive integers when present; None means "derive it" (or "no window")
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
)


def check_sizes(values: dict, source) -> None:
    """Every size a positive integer, the heads divisible into groups: else CheckpointError."""
    for key in SIZES:
        value = values.get(key)
        if value is None:
            continue
        if type(value) is not int or value <= 0:  # type(): True is an int, and not a size
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if kv_heads is not None and heads % kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
            f"{kv_heads}"
        )
    if values["head_dim"] is None and values["hidden_size"] % heads:
        raise CheckpointError(f"{source}: hidden_size is not a multiple of num_attention_heads")
    eps = values["rms_norm_eps"]
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise CheckpointError(f"{source}: rms_norm_eps must be a number in (0, 1), got {eps!r}")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None
    head_dim: int | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3 rope: the LLAMA3_ROPE_KEYS
    sliding_window: int | None = (
        None  # a query sees itself and the sliding_window - 1 keys before it
    )

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, config: dict, source="config.json") -> "ModelArgs":
        arch = config.get("architectures", ["(missing key 'architectures')"])[0]
        if arch not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise CheckpointError(
                f"{source}: unsupported architecture {arch!r} (supported: {supported})"
            )
        plain = config.get("hidden_act", "silu") == "silu"
        if not plain or config.get("attention_bias") or config.get("mlp_bias"):
            raise CheckpointError(
                f"{source}: only hidden_act 'silu' without attention or MLP biases is supported"
            )
        # rope: transformers>=5 writes rope_parameters (theta inside); Hub files write rope_theta
        # and rope_scaling
        rope = config.get("rope_parameters")
        if not rope:
            rope = dict(config.get("rope_scaling") or {}, rope_theta=config.get("rope_theta"))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise CheckpointError(
                f"{source}: unsupported rope type {kind!r} (supported: default, llama3)"
            )
        keys = CONFIG_KEYS | ARCHITECTURES[arch]
        values = {k: config.get(k, default) for k, default in keys.items()}
        scaling = {}
        if kind == "llama3":
            scaling = {k: rope.get(k, REQUIRED) for k in LLAMA3_ROPE_KEYS}
        missing = [k for k, v in (values | scaling).items() if v is REQUIRED]
        if missing:
            raise CheckpointError(f"{source}: missing key {missing[0]!r} (needed for {arch})")
        check_sizes(values, source)
        theta = rope.get("rope_theta") or 10000.0
        if type(theta) not in (int, float) or not 1 < theta < math.inf:
            raise CheckpointError(f"{source}: rope_theta must be a number > 1, got {theta!r}")
        return cls(**values, rope_theta=theta, rope_scaling=scaling or None)


def layer_shapes(args: ModelArgs) -> dict:
    """Module name within a block -> the shape of its weight, as every block stores it."""
    D, F = args.hidden_size, args.intermediate_size
    q = args.num_attention_heads * args.head_dim
    kv = args.num_key_value_heads * args.head_dim
    return {
        "input_layernorm": (D,),
        "self_attn.q_proj": (q, D),
        "self_attn.k_proj": (kv, D),
        "self_attn.v_proj": (kv, D),
        "self_attn.o_proj": (D, q),
        "post_attention_layernorm": (D,),
        "mlp.gate_proj": (F, D),
        "mlp.up_proj": (F, D),
        "mlp.down_proj": (D, F),
    }


def weight_shapes(args: ModelArgs):
    """(name, shape) of every tensor the checkpoint stores, in state_dict order, as a generator:
    a config.json with a million layers is compared with the files before anything is built."""
    D, V = args.hidden_size, args.vocab_size
    yield "model.embed_tokens.weight", (V, D)
    per_layer = layer_shapes(args)
    for i in range(args.num_hidden_layers):
        for name, shape in per_layer.items():
            yield f"model.layers.{i}.{name}.weight", shape
    yield "model.norm.weight", (D,)
    if not args.tie_word_embeddings:  # tied: the head is the embedding, not stored again
        yield "lm_head.weight", (V, D)


# -----------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back before the weight,
    as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        y = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_frequencies(args: ModelArgs, device) -> torch.Tensor:
    """theta_i = base^(-2i/Dh), (Dh/2,) float32. llama3 keeps short wavelengths, divides long ones
    by `factor` and interpolates in between (Llama 3 paper, sec. 3.3; HF
    _compute_llama3_parameters)."""
    i2 = torch.arange(0, args.head_dim, 2, device=device).float()  # (Dh/2,): 2i
    inv_freq = 1.0 / args.rope_theta ** (i2 / args.head_dim)
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    ratio = s["original_max_position_embeddings"] * inv_freq / (2 * torch.pi)  # context/wavelength
    smooth = (ratio - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smooth = smooth.clamp(0, 1)
    return (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, Dh) in `dtype`; the angles are float32 so long
    positions stay exact."""
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, Dh/2)
    # rotate_half pairs dim i with i + Dh/2
    angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, Dh) -> x * cos + rotate_half(x) * sin, where rotate_half(a, b) = (-b, a)."""
    a, b = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    return x * cos + torch.cat((-b, a), dim=-1) * sin


def causal_mask(valid, q_slots, num_keys: int, window: int | None):
    """Which keys each query sees: (B or 1, 1, T, S) bool, or None when plain causal attention
    will do.

    valid (B, S) marks real tokens (False = left padding); q_slots (T,) are the queries' slots
    among the S keys. A padding query would see no key at all (NaN in some kernels), so it sees
    itself; its output is never used.
    """
    if valid is None and window is None:
        return None
    k = torch.arange(num_keys, device=q_slots.device)  # (S,)
    q = q_slots[:, None]  # (T, 1)
    allowed = k <= q  # (T, S)
    if window:
        allowed = allowed & (k > q - window)
    if valid is None:
        return allowed
    return (allowed & valid[:, None, None, :]) | (k == q)  # (B, 1, T, S)


SMALL = 256  # up to this many rows of x, linear() takes the (w xᵀ)ᵀ form (break-even: ~400)


def linear(x, w):
    """x (..., in) @ wᵀ -> (..., out), bias-free: F.linear, but on a CPU for up to SMALL rows of
    x (decoding, small batches) computed as (w xᵀ)ᵀ and made contiguous (the attention kernel
    needs it). The same numbers to float rounding; MKL reads w 1.3-1.6x faster in that form
    (benchmarks/bench_model.py, the matmul rows). A single row goes as a batch of two
    half-products: MKL's matrix-vector product runs on one thread whatever the count (15 GB/s
    here), the batched one on two (23-26 GB/s; benchmarks/bench_gemv.py)."""
    rows = x.reshape(-1, x.shape[-1])  # (M, in)
    M, out = rows.shape[0], w.shape[0]
    if not x.is_cpu or M > SMALL:
        return F.linear(x, w)
    if M == 1 and out % 2 == 0 and w.is_contiguous():
        halves = w.view(2, out // 2, -1)  # (2, out/2, in): the top and bottom rows of w
        y = torch.bmm(halves, rows.T.expand(2, -1, 1)).view(out, 1)  # (2, out/2, 1) -> (out, 1)
    elif M == 1:
        y = (w @ torch.cat((rows, rows)).T)[:, :1]  # (out, 1): the row and its copy, one kept
    else:
        y = w @ rows.T  # (out, in) @ (in, M) -> (out, M)
    return y.T.contiguous().view(*x.shape[:-1], -1)  # (M, out) -> (..., out)


class Linear(nn.Linear):
    """nn.Linear (bias-free here) through linear(): every projection of the model."""

    def forward(self, x):
        return linear(x, self.weight)


class Attention(nn.Module):
    """y = o(softmax(q kᵀ / sqrt(Dh) + mask) v), q k v with rope; H/Hkv query heads share each
    key/value head (grouped-query attention)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, Hkv = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        self.head_dim = Dh = args.head_dim
        self.q_proj = Linear(D, H * Dh, bias=False)
        self.k_proj = Linear(D, Hkv * Dh, bias=False)
        self.v_proj = Linear(D, Hkv * Dh, bias=False)
        self.o_proj = Linear(H * Dh, D, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        B, T, _ = x.shape
        Dh = self.head_dim
        q = self.q_proj(x).view(B, T, -1, Dh).transpose(1, 2)  # (B, T, H*Dh) -> (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, -1, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, -1, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:  # write slots start..start+T-1 of the preallocated cache
            k_cache, v_cache = cache  # (B, Hkv, S_max, Dh) each
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k = k_cache[:, :, : start + T]  # (B, Hkv, S, Dh): every slot so far
            v = v_cache[:, :, : start + T]
        # Without a mask either T == S (training, prefill: causal) or T == 1 (a new token sees
        # every slot), so is_causal is right in both cases.
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
        )  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*Dh) -> (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), (B, T, D) -> (B, T, F) -> (B, T, D)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(·)): a pre-norm residual block, (B, T, D) -> (B, T, D)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    """logits = lm_head(norm(blocks(embed(tokens)))): one forward for training, prefill and
    decoding, so wrappers (DDP, FSDP) see every call."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # named like HF's LlamaModel, so state_dict keys are the checkpoint's keys
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(args.vocab_size, args.hidden_size),
                layers=nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers)),
                norm=RMSNorm(args.hidden_size, args.rms_norm_eps),
            )
        )
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, tokens, attention_mask=None, cache=None, start=0, head=True, last=False, keep=None
    ):
        """tokens (B, T) in slots start..start+T-1 -> logits (B, T, V).

        attention_mask (B, start + T): 1 = token, 0 = left padding, over every slot so far (as
        HF's); None = no padding. cache (new_cache) holds slots 0..start-1 and receives the new
        ones; without a cache start is 0 (training, scoring).
        head=False returns the final hidden states instead, after the last norm: (B, T, D).
        last=True keeps only position T-1, (B, 1, V or D): what generation needs.
        keep (B, T) bool keeps the N positions it marks, flattened: (N, V or D), what the training
        loss needs (the head, a fifth of the model's work here, runs on the answer tokens alone).
        """
        B, T = tokens.shape
        S = start + T  # keys: the cached slots, then the new ones
        slots = torch.arange(start, S, device=tokens.device)  # (T,)
        valid = None
        positions = slots.expand(B, T)
        if attention_mask is not None:  # a row's first real token is position 0 (HF: cumsum)
            valid = attention_mask.bool()  # (B, S)
            positions = attention_mask.long().cumsum(-1)[:, start:] - 1  # (B, T)
            positions = positions.clamp(min=0)
        elif cache is not None and T > 1 and start > 0:  # is_causal would align it at slot 0
            valid = torch.ones(1, S, dtype=torch.bool, device=tokens.device)
        h = self.model.embed_tokens(tokens)  # (B, T, D)
        inv_freq = rope_frequencies(self.args, tokens.device)
        cos, sin = rope_cos_sin(inv_freq, positions, h.dtype)  # (B, 1, T, Dh)
        mask = causal_mask(valid, slots, S, self.args.sliding_window)
        caches = cache if cache is not None else [None] * len(self.model.layers)
        for layer, layer_cache in zip(self.model.layers, caches):
            h = layer(h, cos, sin, mask, layer_cache, start)
        if last:
            h = h[:, -1:]  # (B, 1, D)
        if keep is not None:
            h = h[keep]  # (N, D)
        h = self.model.norm(h)
        return self.lm_head(h) if head else h  # (B, T, V) or (B, T, D)

    def new_cache(self, batch_size: int, max_len: int, prefix=None):
        """Per layer a (key, value) pair of (B, Hkv, S_max, Dh) buffers, in the model's device and
        dtype. prefix (prefix_cache's, n slots) opens every row: its keys and values, then zeros.
        Built by concatenation, so a loss can backpropagate through the prefix."""
        shape = (batch_size, self.args.num_key_value_heads, max_len, self.args.head_dim)
        w = self.model.embed_tokens.weight
        like = dict(dtype=w.dtype, device=w.device)
        if prefix is None:
            return [
                (torch.zeros(shape, **like), torch.zeros(shape, **like)) for _ in self.model.layers
            ]
        empty = torch.zeros(*shape[:2], max_len - prefix[0][0].shape[2], shape[3], **like)
        rows = (batch_size, -1, -1, -1)
        return [tuple(torch.cat((t.expand(rows), empty), dim=2) for t in kv) for kv in prefix]

    def prefix_cache(self, prefix):
        """prefix (1, n) -> a one-row cache of n slots holding its keys and values: computed once
        for prompts that open alike (a chat template's system turn), then new_cache(..., prefix)."""
        one = self.new_cache(1, prefix.shape[1])  # (1, Hkv, n, Dh) each
        self(prefix, cache=one, head=False, last=True)
        return one

    @staticmethod
    def keep_rows(cache, keep):
        """The cache of the batch rows `keep` (b',): what generate does when finished rows leave."""
        return [(k[keep], v[keep]) for k, v in cache]  # (b', Hkv, S_max, Dh) each


# -----------------------------------------------------------------------------
# generation


def sample(logits, temperature: float, top_p: float, generator=None):
    """logits (B, V) -> tokens (B,): argmax if temperature == 0, else nucleus sampling with HF's
    rule (drop a token when the tokens more likely than it already hold top_p of the mass; the
    most likely one always stays)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    probs, order = probs.sort(dim=-1, descending=True)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    drawn = torch.multinomial(probs, 1, generator=generator)  # (B, 1); multinomial renormalises
    return order.gather(-1, drawn)[:, 0]


def is_fsdp(model) -> bool:
    """Whether model is FSDP2-sharded: each forward all-gathers weights, so every rank must make
    the same calls."""
    if not dist.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule  # under torchrun only: the import takes ~1 s

    return isinstance(model, FSDPModule)


def everywhere(flag: bool, model, device) -> bool:
    """flag on every rank (an all_reduce, MIN) when model is FSDP2-sharded: each of its forwards
    all-gathers the weights, so the ranks must stop decoding together; flag itself otherwise."""
    if not is_fsdp(model):
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def shared_prefix(prompts, model, total: int) -> int:
    """How many first tokens every prompt shares (a chat template's system turn), at least one token
    of each prompt left. 0 for a single prompt; for a model that is not a Transformer (imsm's
    Siamese averages over whole prompts); under FSDP2 (a rank's own prompts would decide how many
    forwards it makes); when the sequence passes a sliding window (the padding after the prefix
    would take places in it)."""
    core = getattr(model, "module", model)  # DDP and FSDP1 keep the Transformer in .module
    if len(prompts) == 1 or not isinstance(core, Transformer) or is_fsdp(model):
        return 0
    if core.args.sliding_window and total > core.args.sliding_window:
        return 0
    n = min(map(len, prompts)) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


def prompt_batch(core, prompts, shared: int, S: int, device):
    """(tokens (B, P), mask (B, S) or None, KV cache of S slots): each prompt's first `shared`
    tokens, then pads, then its rest, so that every row's last prompt token is in column P - 1; the
    shared columns computed once, in one row, into every row's cache. mask: 1 where a slot holds a
    real token; None when no row is padded."""
    P = max(map(len, prompts))
    pads = [P - len(p) for p in prompts]
    rows = [[*p[:shared], *[0] * pad, *p[shared:]] for pad, p in zip(pads, prompts)]
    tokens = torch.tensor(rows, device=device)  # (B, P)
    mask = None
    if any(pads):
        slot = torch.arange(S, device=device)  # (S,)
        first = torch.tensor(pads, device=device)[:, None] + shared  # (B, 1): rest's first slot
        mask = ((slot < shared) | (slot >= first)).long()
    if not shared:  # a model that shares no prefix (imsm's Siamese) takes no prefix argument
        return tokens, mask, core.new_cache(len(prompts), S)
    return tokens, mask, core.new_cache(len(prompts), S, core.prefix_cache(tokens[:1, :shared]))


@torch.inference_mode()
def generate(
    model,
    prompts,
    max_new_tokens,
    eos_ids,
    temperature=0.0,
    top_p=1.0,
    generator=None,
    on_token=None,
):
    """prompts: lists of token ids -> each row's new tokens, cut before its first eos.

    The batch is the prompts' shared first tokens, computed once in one row and copied into every
    row's KV cache, then each prompt's rest, padded on its left:

        [system turn | pad pad | user turn] [new tokens]     (the mask and positions skip pads)

    Rows that have emitted an eos leave the batch (and the KV cache) once they are an eighth of it,
    and the loop stops when none is left: evaluation answers end at very different lengths. Every
    step calls model(...), so hooks of a wrapper (DDP, FSDP) run. Under FSDP2 the loop ends when
    every rank's rows are done (everywhere): a rank whose rows are all done keeps them and steps
    on, its extra tokens cut after the eos like any other row's. on_token, if given, is called
    with each step's new tokens (b,) as soon as they are drawn: one prompt's answer streamed."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    core = getattr(model, "module", model)  # DDP and FSDP1 keep the Transformer in .module
    B = len(prompts)
    P = max(map(len, prompts))
    S = P + max_new_tokens
    shared = shared_prefix(prompts, model, S)
    tokens, mask, cache = prompt_batch(core, prompts, shared, S, device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # (b,): the row of `out` each running row fills
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (b,): emitted an eos already
    prompt_mask = None if mask is None else mask[:, :P]
    logits = model(tokens[:, shared:], prompt_mask, cache, shared, last=True)[:, -1]  # (B, V)
    for t in range(max_new_tokens):
        next_token = sample(logits, temperature, top_p, generator)  # (b,)
        out[rows, t] = next_token
        if on_token is not None:
            on_token(next_token)
        done |= torch.isin(next_token, eos)
        finished = int(done.sum())  # one sync a step: free on a CPU
        if t + 1 == max_new_tokens or everywhere(finished == len(rows), model, device):
            break
        # drop finished rows once they are 1/8 of the batch (not all: FSDP2 steps on, everywhere)
        if finished * 8 >= len(rows) and finished < len(rows):
            keep = (~done).nonzero()[:, 0]  # (b',)
            rows, done, next_token = rows[keep], done[keep], next_token[keep]
            cache = core.keep_rows(cache, keep)  # the model's own cache layout
            mask = None if mask is None else mask[keep]
        start = P + t
        step_mask = None if mask is None else mask[:, : start + 1]
        logits = model(next_token[:, None], step_mask, cache, start)[:, -1]  # (b, V)
    new = out[:, : t + 1].tolist()
    return [row[: next((i for i, x in enumerate(row) if x in eos_ids), len(row))] for row in new]


# -----------------------------------------------------------------------------
# loading: config.json, then (sharded) safetensors read tensor by tensor into the final dtype


def load(ckpt, device=None, dtype=None):
    """A checkpoint folder or name (checkpoints.resolve) -> (Transformer, Tokenizer); dtype
    default float32. config.json and the files' headers are checked against each other before
    any tensor is allocated."""
    folder = resolve(ckpt)
    device = torch.device(device or "cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    config_path = folder / "config.json"
    args = ModelArgs.from_hf_config(read_json(config_path), source=config_path)
    index = weight_index(folder)  # name -> (file, header entry)
    if args.tie_word_embeddings:  # the head is the embedding; some exporters store a copy anyway
        index.pop("lm_head.weight", None)
    check_tensors(index, weight_shapes(args), folder, config_path.name)
    # shapes only: each weight is allocated once, below, in its final dtype and device
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for name, shape in weight_shapes(args):
        state[name] = torch.empty(shape, dtype=dtype, device=device)
    for path in sorted({path for path, _ in index.values()}):
        read_safetensors(path, {name: state[name] for name, (p, _) in index.items() if p == path})
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)  # the meta parameters become these
    if args.tie_word_embeddings:  # assign made two Parameters of one tensor: make them one
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, Tokenizer(folder)


# -----------------------------------------------------------------------------
# command line: answer questions through the chat template, with a checkpoint, an expert or a run


def parse_args(argv=None):
    parser = cli.Parser(
        description="Answer questions with a checkpoint, an SVF expert or an inject.py run, "
        "through the chat template; with no question, one per line from stdin until its end.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("prompt", nargs="?", help="the question (none: read them from stdin)")
    parser.add_argument(
        "--ckpt", default="", help=f"folder or name (default: the run's checkpoint, else {DEFAULT})"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", default="", help="an inject.py run: its model, stream followed")
    source.add_argument("--svf", default="", help="an SVF expert file, merged into --ckpt")
    parser.add_argument("--svd-cache", default="cache/svd", help="cached SVD factors ('': none)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help=">= 0; capped, with a warning, where the prompt plus it would pass the model's "
        "max_position_embeddings",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first (inductor's C++ wrapper, dynamic shapes): ~40 s once "
        "on 2 cores, cached on disk; then batch-1 decoding ~1.4x faster (bench_model.py)",
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    if not 0 <= args.seed <= cli.INT_MAX:  # a torch generator takes an int64 at most
        parser.error(f"--seed: must be in [0, {cli.INT_MAX}], got {args.seed}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature: must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # NaN fails too
        parser.error(f"--top-p: must be in (0, 1], got {args.top_p}")
    from training import resolve_device  # here, not above: training imports this module

    try:  # a GPU this machine lacks is refused here, not by CUDA's traceback at load
        args.device = str(resolve_device(args.device))
        cli.check_folder(args.svd_cache, "--svd-cache")
    except cli.ConfigError as e:
        parser.error(str(e))
    return args


def load_for(args):
    """(model, tokenizer) of the command line: the checkpoint, an expert merged in, or a run's
    model as evaluate.py builds it (adapters.run_model)."""
    if not (args.run or args.svf):
        return load(args.ckpt or DEFAULT, args.device, args.dtype)
    import adapters  # here, not above: adapters imports this module

    if args.run:
        model, tokenizer, _ = adapters.run_model(
            args.run, args.ckpt, args.device, args.dtype, args.svd_cache
        )
    else:
        model, tokenizer, _ = adapters.expert_model(
            args.svf, args.ckpt or DEFAULT, args.device, args.dtype, args.svd_cache
        )
    return model, tokenizer


def printer(tokenizer, out):
    """generate's on_token for one prompt: writes the answer's text as its tokens come. The text
    decoded so far, less what is written already; a piece ending inside a UTF-8 character (a
    byte-level token can split one) waits for the next token. Returns (on_token, finish)."""
    ids, written = [], [0]

    def on_token(token):  # (1,)
        if int(token[0]) in tokenizer.eos_ids:
            return
        ids.append(int(token[0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            out.write(text[written[0] :])
            out.flush()
            written[0] = len(text)

    def finish():
        out.write(tokenizer.decode(ids)[written[0] :] + "\n")
        out.flush()

    return on_token, finish


def answer(model, tokenizer, question: str, args, generator):
    """One question through the chat template, its answer streamed to stdout."""
    chat = [{"role": "user", "content": question}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
    room = model_args(model).max_position_embeddings - len(prompt)
    if room <= 0:
        raise cli.ConfigError(
            f"the prompt has {len(prompt)} tokens, the model's context "
            f"{model_args(model).max_position_embeddings}: no room to answer"
        )
    new_tokens = args.max_new_tokens
    if new_tokens > room:
        print(
            f"warning: --max-new-tokens {new_tokens} capped to {room}: the prompt has "
            f"{len(prompt)} tokens of the context's {model_args(model).max_position_embeddings}",
            file=sys.stderr,
        )
        new_tokens = room
    on_token, finish = printer(tokenizer, sys.stdout)
    generate(
        model,
        [prompt],
        new_tokens,
        tokenizer.eos_ids,
        args.temperature,
        args.top_p,
        generator,
        on_token,
    )
    finish()


def model_args(model) -> ModelArgs:
    """The ModelArgs of a Transformer, compiled or wrapped (imsm's Siamese holds one as .model).
    Not isinstance: run as a script this file is __main__, and adapters builds the model from
    the module `model`, whose Transformer is another class."""
    core = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return core.args if hasattr(core, "args") else core.model.args


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_for(args)
    if args.compile:
        import torch._inductor.config as inductor

        inductor.cpp_wrapper = True  # the compiled kernels called from C++, no Python between
        model = torch.compile(model, dynamic=True)  # one compilation for every decoding step
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if args.prompt is not None:
        return answer(model, tokenizer, args.prompt, args, generator)
    if sys.stdin.isatty():
        print("one question a line; end of input (Ctrl-D) quits", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            answer(model, tokenizer, line.strip(), args, generator)


if __name__ == "__main__":
    cli.run(main)
