"""IMSM (Interweaving Memories of a Siamese LLM, arXiv 2412.17383): one backbone runs twice on a
query, frozen and with a plain LoRA trained on the facts; a small gate mixes the two final hidden
states per token and per hidden dimension, then the frozen output head reads the mix.

    g_t = sigmoid(B_g A_g [mean_p(h_f); h_f,t; h_t,t; mean_p(h_t)])    A_g (r, 4D), B_g (D, r)
    h_t = g_t ⊙ h_f,t + (1 - g_t) ⊙ h_t,t  ->  logits = lm_head(h_t)

h_f, h_t: the frozen and tuned streams' final post-norm hidden states (what lm_head reads);
mean_p: the mean over the prompt's real tokens. In decoding the prompt means are computed at
prefill (start = 0) and kept in the cache beside the two streams' KV caches. The frozen stream is
the same modules with every LoRA scale set to 0 (`adapters_off`): no weight is copied.
Reference code: github.com/ECNU-Text-Computing/IMSM (no KV cache, batch 1; its gate trains at
AdamW's default lr because its parameter group has none: `param_groups` states both lrs).
Siamese.forward takes model.Transformer's arguments, so model.generate decodes it (two KV caches in
one Cache); this module touches no disk: adapters.py saves and loads a run (imsm.safetensors).

Dimension letters (as model.py): B batch, T query positions, S cache slots, D hidden,
V vocabulary, r gate rank.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import palora
from model import causal_mask, rope_cos_sin, rope_frequencies
from palora import LoRALinear
from tasks import IGNORE_INDEX


class IMSMError(ValueError):
    """Bad IMSM setting or file; the message names it."""

    expected = True  # bad input: cli.run prints it as one line, exit 2


def check(r: int, alpha: float, gate_rank: int):
    """Fail on a bad size before anything is allocated."""
    for name, value in (("rank", r), ("alpha", alpha), ("gate rank", gate_rank)):
        if not value > 0:
            raise IMSMError(f"IMSM {name} must be positive, got {value}")


# -----------------------------------------------------------------------------
# math: the gate, the prompt mean, one stream


def prompt_mean(h, prompt_mask):
    """mean_p(h) = Σ_t m_t h_t / Σ_t m_t: h (B, T, D), prompt_mask (B, T) -> (B, D)."""
    m = prompt_mask.to(h.dtype)[..., None]  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def gate_values(h_f, h_t, mean_f, mean_t, A, B):
    """g = sigmoid(B A [mean_f; h_f; h_t; mean_t]): h_f, h_t (B, T, D), means (B, D)
    -> (B, T, D)."""
    T = h_f.shape[1]
    mean_f, mean_t = mean_f[:, None].expand(-1, T, -1), mean_t[:, None].expand(-1, T, -1)
    z = torch.cat([mean_f, h_f, h_t, mean_t], -1)  # (B, T, 4D)
    return torch.sigmoid(F.linear(F.linear(z, A), B))  # (B, T, 4D) @ (4D, r) @ (r, D) -> (B, T, D)


def interweave(h_f, h_t, g):
    """h = g ⊙ h_f + (1 - g) ⊙ h_t: a convex combination per token and dimension, g in (0, 1)."""
    return g * h_f + (1 - g) * h_t


def hidden_states(model, tokens, cos, sin, mask, cache=None, start=0):
    """embed -> blocks -> final norm: tokens (B, T) -> (B, T, D), the states lm_head reads."""
    h = model.model.embed_tokens(tokens)  # (B, T, D)
    for i, layer in enumerate(model.model.layers):
        h = layer(h, cos, sin, mask, None if cache is None else cache[i], start)
    return model.model.norm(h)


def attention_inputs(args, tokens, attention_mask, start, dtype):
    """cos, sin (B, 1, T, Dh) and the mask for slots start..start+T-1. attention_mask
    (B, >= start+T), 1 = token, 0 = left padding, covers every slot so far (HF's convention);
    positions count real tokens only."""
    B, T = tokens.shape
    slots = torch.arange(start, start + T, device=tokens.device)  # (T,)
    if attention_mask is None:
        valid, positions = None, slots.expand(B, T)
        if start and T > 1:  # a chunk after a cached prefix: is_causal would align it wrongly
            valid = torch.ones(B, start + T, dtype=torch.bool, device=tokens.device)
    else:
        valid = attention_mask[:, : start + T].bool()  # (B, S)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
    cos, sin = rope_cos_sin(rope_frequencies(args, tokens.device), positions, dtype)
    return cos, sin, causal_mask(valid, slots, start + T, args.sliding_window)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model: nn.Module):
    """The frozen stream: each LoRALinear's alpha/r is 0 in the block (y = x Wᵀ), then restored."""
    layers = lora_layers(model)
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


# -----------------------------------------------------------------------------
# modules: the gate and the siamese wrapper


class Gate(nn.Module):
    """g = sigmoid(B_g A_g [mean_f; h_f; h_t; mean_t]), A_g (r, 4D) ~ U(±1/√4D), B_g (D, r) = 0.

    g = 1/2 at the start, and both streams are equal while the LoRA's B is 0: the model starts
    as the frozen one. Parameters and the mix are float32 (as LoRALinear keeps A, B)."""

    def __init__(self, D: int, r: int, generator=None, device=None):
        super().__init__()
        bound = 1 / (4 * D) ** 0.5
        A = torch.empty(r, 4 * D).uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A.to(device))
        self.B = nn.Parameter(torch.zeros(D, r, device=device))

    def forward(self, h_f, h_t, mean_f, mean_t):
        h_f, h_t, mean_f, mean_t = (palora.wide(x) for x in (h_f, h_t, mean_f, mean_t))
        return interweave(h_f, h_t, gate_values(h_f, h_t, mean_f, mean_t, self.A, self.B))


@dataclass
class Cache:
    """Both streams' KV caches (model.new_cache each) and the prompt means kept from prefill."""

    frozen: list
    tuned: list
    means: tuple | None = None  # (mean_f, mean_t), (B, D) each, set at start = 0


class Siamese(nn.Module):
    """Frozen backbone + plain LoRA (palora.LoRALinear, nothing protected) on the targets + Gate.

    `model` is changed in place: its target nn.Linears become LoRALinears sharing the same weight
    tensors, and every base parameter is frozen. forward(tokens, attention_mask, cache, start) ->
    logits (B, T, V), as model.Transformer's."""

    def __init__(self, model, targets=palora.MLP_TARGETS, r=8, alpha=16.0, gate_rank=8, seed=0):
        super().__init__()
        check(r, alpha, gate_rank)
        generator = torch.Generator().manual_seed(seed)
        model.requires_grad_(False)
        for name, layer in palora.find_targets(model, targets).items():
            target = palora.Target(layer.weight.detach(), None, None, None)
            A, B = palora.lora_factors(target, r, generator)
            new = LoRALinear(layer.weight, A, B, alpha, like=type(layer))
            palora.replace(model, name, new)
        self.model, self.targets, self.r, self.alpha = model, tuple(targets), r, alpha
        device = model.lm_head.weight.device
        self.gate = Gate(model.args.hidden_size, gate_rank, generator, device)

    def new_cache(self, batch_size: int, max_len: int) -> Cache:
        frozen = self.model.new_cache(batch_size, max_len)
        return Cache(frozen, self.model.new_cache(batch_size, max_len))

    def keep_rows(self, cache: Cache, keep) -> Cache:
        """The batch rows `keep` of both streams' caches and of the prompt means."""
        means = None if cache.means is None else tuple(m[keep] for m in cache.means)
        return Cache(*(self.model.keep_rows(c, keep) for c in (cache.frozen, cache.tuned)), means)

    def forward(
        self, tokens, attention_mask=None, cache=None, start=0, last=False, prompt_mask=None
    ):
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with last=True (model.Transformer's
        arguments, so model.generate decodes a Siamese). prompt_mask (B, T): the tokens mean_p
        averages; default: every real token of this call (right at prefill; in training pass the
        prompt part, see `loss`). With a cache, a call at start = 0 stores the prompt means; later
        calls reuse them."""
        w = self.model.lm_head.weight
        cos, sin, mask = attention_inputs(self.model.args, tokens, attention_mask, start, w.dtype)
        cache_f, cache_t = (None, None) if cache is None else (cache.frozen, cache.tuned)
        with adapters_off(self.model):
            h_f = hidden_states(self.model, tokens, cos, sin, mask, cache_f, start)  # (B, T, D)
        h_t = hidden_states(self.model, tokens, cos, sin, mask, cache_t, start)  # (B, T, D)
        if cache is not None and start > 0:
            means = cache.means
        else:
            if prompt_mask is None:
                prompt_mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
            prompt_mask = prompt_mask[:, : tokens.shape[1]]  # this call's part of a full mask
            means = (prompt_mean(h_f, prompt_mask), prompt_mean(h_t, prompt_mask))  # (B, D) each
            if cache is not None:
                cache.means = means
        if last:
            h_f, h_t = h_f[:, -1:], h_t[:, -1:]  # (B, 1, D)
        return self.model.lm_head(self.gate(h_f, h_t, *means).to(w.dtype))  # (B, T, D) -> (B, T, V)


# -----------------------------------------------------------------------------
# training


def trainable(siamese: Siamese) -> dict[str, nn.Parameter]:
    """LoRA "<weight name>.A"/".B" and "gate.A", "gate.B". The gate needs its own stated lr
    (`param_groups`): the reference code's gate trains at AdamW's default 1e-3."""
    gate = {"gate.A": siamese.gate.A, "gate.B": siamese.gate.B}
    return {**palora.lora_params(siamese.model), **gate}


def param_groups(params: dict, lr: float, gate_lr: float) -> list[dict]:
    """Optimizer groups of `trainable`'s dict with both lrs stated: [LoRA A/B at lr, gate at
    gate_lr]."""
    lora = [p for n, p in params.items() if not n.startswith("gate.")]
    gate = [p for n, p in params.items() if n.startswith("gate.")]
    return [{"params": lora, "lr": lr}, {"params": gate, "lr": gate_lr}]


def added_parameters(siamese: Siamese) -> int:
    """LoRA r (in + out) per target plus the gate's 5 D r."""
    return sum(p.numel() for p in trainable(siamese).values())


def loss(siamese: Siamese, tokens, labels, attention_mask):
    """Mean next-token cross-entropy on the answer tokens (labels IGNORE_INDEX elsewhere), mean_p
    over the prompt only (real tokens labelled IGNORE_INDEX): training.answer_loss would average in
    the answer."""
    prompt_mask = attention_mask.bool() & (labels == IGNORE_INDEX)  # (B, T)
    logits = siamese(tokens, attention_mask=attention_mask, prompt_mask=prompt_mask)  # (B, T, V)
    logits = logits[:, :-1].flatten(0, 1).float()  # t predicts t+1: (B (T-1), V)
    return F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
