"""Sparse Memory Finetuning (Lin et al., arXiv 2510.15103) on product-key memory layers (Memory
Layers at Scale, arXiv 2412.09764; product keys: Lample et al., arXiv 1907.05242), retrofitted
beside the MLP of a few middle blocks of a trained checkpoint.

    q = W_q x,  s_ij = q1·K1_i + q2·K2_j,  I = top-k of s over the n² slots (from the top-k
    of each half),  y = Σ_{i ∈ I} softmax(s_I)_i V_i  (W_o y when value_dim != D)
    block: x + attn;  x + MLP(norm(x)) + memory(norm(x))

Retrofit: V = 0, so the model's outputs are unchanged at initialisation (bit for bit), and the
first gradient reaches V directly (a zero output gate would keep V's gradient at 0 until the gate
moved, and SMF trains nothing but V). W_q (random orthogonal), K1, K2 (k-means of the checkpoint's
own queries on a background corpus, `keys_from`) and W_o stay frozen. Training: per step and
memory layer, the top-T slots by TF-IDF, score(i) = (c_i / Σc) · log((|B| + 1) / (df_i + 1)), or
by KL, p_b(i) log(p_b(i) / p_bg(i)), against the background counts; then a SparseAdam step on
exactly those rows of V (a lazy Adam: the other rows' values and moments are not touched; dense
AdamW's momentum would keep moving earlier rows). |B| = background documents (forward rows).

Defaults for a 135M model (SmolLM2, D = 576, 30 blocks): 4096 slots = 64 x 64 keys (the retrofit
used 16,384 on a 0.5B model), top-k 16, blocks L/3, L/2, 2L/3 (10, 15, 20), T = 64 slots per layer
and step. Added per layer: V 4096·576 + W_q 576² + K 2·64·288 = 2.73M; 8.2M (6% of 135M) in all.

This module touches no disk: adapters.py saves and loads a run (smf.safetensors).

Dimension letters: B batch, T tokens, D hidden, N slots = n², n keys per half, k top-k,
Dv value width.
"""

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_lib
from training import answer_loss

SLOTS, TOP_K, TOP_T = 4096, 16, 64


class SMFError(ValueError):
    """Bad SMF setting or file; the message names it."""

    expected = True  # bad input: cli.run prints it as one line, exit 2


def check_sizes(n_slots: int, k: int, layers=(), num_layers: int | None = None):
    """Fail before any allocation: n_slots a square n² (n ≥ 2), 1 ≤ k ≤ n, layers in the model."""
    n = math.isqrt(max(n_slots, 0))
    if n < 2 or n * n != n_slots:
        raise SMFError(
            f"memory slots must be a square n² with n >= 2 (product keys), got {n_slots}"
        )
    if not 1 <= k <= n:
        raise SMFError(
            f"memory top-k must be in [1, {n}] (keys per half of {n_slots} slots), got {k}"
        )
    for i in layers:
        if num_layers is not None and not 0 <= i < num_layers:
            raise SMFError(f"memory layer {i} is outside the model's blocks 0..{num_layers - 1}")


def default_layers(num_layers: int) -> list[int]:
    """Blocks L/3, L/2, 2L/3 (middle ones; deduplicated for tiny models)."""
    return sorted({num_layers // 3, num_layers // 2, 2 * num_layers // 3})


# -----------------------------------------------------------------------------
# math: lookup, keys, slot scores


def lookup(x, W_q, K, k: int):
    """x (..., D) -> (weights (..., k) = softmax of the best k scores, slots (..., k) in [0, n²)).

    Slot (i, j) = i·n + j scores q1·K1_i + q2·K2_j; its top-k lies among the top-k of each half."""
    n = K.shape[1]
    q1, q2 = F.linear(x, W_q).chunk(2, dim=-1)  # (..., D) @ (D, Dq) -> 2 x (..., Dq/2)
    s1, i1 = F.linear(q1, K[0]).topk(k, dim=-1)  # (..., Dq/2) @ (Dq/2, n) -> (..., n) -> (..., k)
    s2, i2 = F.linear(q2, K[1]).topk(k, dim=-1)
    s = s1[..., :, None] + s2[..., None, :]  # (..., k, k): every pair of the two top-k
    best, flat = s.flatten(-2).topk(k, dim=-1)  # (..., k²) -> (..., k)
    slots = i1.gather(-1, flat // k) * n + i2.gather(-1, flat % k)  # (..., k)
    return best.softmax(-1), slots


def kmeans(x, n: int, generator, iters: int = 20):
    """n centroids of the rows of x (N, d): Lloyd's algorithm from a farthest-point start (a random
    row, then each next the row farthest from those chosen), so no two start in one cluster."""
    C = x[torch.randint(len(x), (1,), generator=generator)]  # (1, d)
    for _ in range(n - 1):
        far = torch.cdist(x, C).min(-1).values.argmax()  # (N, c) -> (N,) -> the farthest row
        C = torch.cat([C, x[far, None]])  # (c + 1, d)
    for _ in range(iters):
        nearest = torch.cdist(x, C).argmin(-1)  # (N, n) -> (N,)
        sums = torch.zeros_like(C).index_add_(0, nearest, x)  # (n, d)
        counts = torch.bincount(nearest, minlength=n)[:, None]  # (n, 1)
        C = torch.where(
            counts > 0, sums / counts.clamp(min=1), C
        )  # an empty cluster keeps its centroid
    return C


class Access(NamedTuple):
    """Slot accesses of a set of forward passes: c (N,) tokens that picked each slot, df (N,) rows
    (documents) that picked it at least once, docs = |B| the number of rows."""

    counts: torch.Tensor
    df: torch.Tensor
    docs: int


def slot_scores(batch: Access, background: Access, score: str = "tfidf"):
    """(N,) per slot: tfidf (c_i / Σc) log((|B| + 1) / (df_i + 1)),
    or kl p_b(i) log(p_b(i) / p_bg(i)),
    p_bg add-one smoothed so that a slot the background never used has a finite score."""
    p_b = batch.counts.double() / batch.counts.sum().clamp(min=1)
    if score == "tfidf":
        return p_b * torch.log((background.docs + 1) / (background.df.double() + 1))
    if score == "kl":
        bg = background.counts.double() + 1
        return torch.where(p_b > 0, p_b * torch.log(p_b / (bg / bg.sum())), 0.0)
    raise SMFError(f"unknown slot score {score!r}: choose tfidf or kl")


def top_slots(scores, counts, top_t: int):
    """The top-T slots by score among those the batch used (c_i > 0): int64 (≤ T,)."""
    used = torch.nonzero(counts > 0).flatten()
    return used[scores[used].topk(min(top_t, len(used))).indices]


# -----------------------------------------------------------------------------
# modules


class MemoryLayer(nn.Module):
    """y = Σ_{i ∈ top-k} softmax(s)_i V_i (then W_o y if Dv != D); V (n², Dv) starts at 0.

    W_q (Dq, D), Dq = 2 floor(D/2), random orthogonal; K (2, n, Dq/2) random until set from data;
    W_o (D, Dv) random orthogonal columns, or None. All float32; only V is meant to train."""

    def __init__(self, D: int, n_keys: int, k: int, value_dim: int | None = None, generator=None):
        super().__init__()
        check_sizes(n_keys * n_keys, k)
        self.k, Dq, Dv = k, 2 * (D // 2), value_dim or D
        self.W_q = nn.Parameter(orthogonal(Dq, D, generator), requires_grad=False)
        K = torch.randn(2, n_keys, Dq // 2, generator=generator) / math.sqrt(Dq // 2)
        self.K = nn.Parameter(K, requires_grad=False)
        self.V = nn.Parameter(torch.zeros(n_keys * n_keys, Dv))
        W_o = orthogonal(D, Dv, generator) if Dv != D else None
        self.W_o = None if W_o is None else nn.Parameter(W_o, requires_grad=False)

    def forward(self, x):
        weights, slots = lookup(x.float(), self.W_q, self.K, self.k)  # (B, T, k) each
        flat = slots.flatten(0, -2), weights.flatten(0, -2)  # (B·T, k)
        y = F.embedding_bag(flat[0], self.V, per_sample_weights=flat[1], mode="sum")  # (B·T, Dv)
        y = y.view(*x.shape[:-1], -1)  # (B, T, Dv)
        return (y if self.W_o is None else F.linear(y, self.W_o)).to(x.dtype)  # (B, T, D)


def orthogonal(rows: int, cols: int, generator) -> torch.Tensor:
    """(rows, cols) with orthonormal rows or columns (QR of a Gaussian)."""
    Q, R = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=generator))
    Q = Q * R.diagonal().sign()  # (max, min), orthonormal columns
    return Q if rows >= cols else Q.T


class MLPWithMemory(nn.Module):
    """MLP(x) + memory(x): model.MLP's forward on the same three linears, so their state-dict keys
    stay model.layers.i.mlp.{gate,up,down}_proj; the memory's are model.layers.i.mlp.memory.*."""

    def __init__(self, mlp: nn.Module, memory: MemoryLayer):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.memory = memory

    def forward(self, x):
        return model_lib.MLP.forward(self, x) + self.memory(x)


def memories(model: nn.Module) -> dict[str, MemoryLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MemoryLayer)}


# -----------------------------------------------------------------------------
# retrofit, statistics, training


def mlp_inputs(model, layers, run, max_rows: int, generator) -> dict[int, torch.Tensor]:
    """block -> (≤ max_rows, D) float32 random rows of its MLP's inputs while run() does forward
    passes (padding rows count too: pass unpadded sequences, as palora.activation_covariances)."""
    rows = {i: [] for i in layers}
    hooks = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda m, args, i=i: rows[i].append(args[0].detach().flatten(0, -2).float())
        )
        for i in layers
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, parts in rows.items():
        x = torch.cat(parts)  # (N, D)
        out[i] = x[torch.randperm(len(x), generator=generator)[:max_rows]]
    return out


def add_memory(model, layers=None, n_slots=SLOTS, k=TOP_K, keys_from=None, value_dim=None, seed=0):
    """Put a MemoryLayer beside the MLP of each block in `layers` (default_layers); freeze every
    other parameter. keys_from: a callable running forward passes on a background corpus; K1, K2
    are then k-means (n each) of the halves of W_q x over its MLP inputs. -> name -> MemoryLayer."""
    num_layers = len(model.model.layers)
    layers = default_layers(num_layers) if layers is None else sorted(set(layers))
    check_sizes(n_slots, k, layers, num_layers)
    n, D = math.isqrt(n_slots), model.args.hidden_size
    generator = torch.Generator().manual_seed(seed)
    samples = mlp_inputs(model, layers, keys_from, 64 * n, generator) if keys_from else {}
    model.requires_grad_(False)
    device = model.lm_head.weight.device
    for i in layers:
        memory = MemoryLayer(D, n, k, value_dim, generator)
        if i in samples:
            if len(samples[i]) < n:
                raise SMFError(f"keys_from gave {len(samples[i])} token states, need >= {n} keys")
            q1, q2 = F.linear(samples[i], memory.W_q).chunk(2, dim=-1)  # (N, Dq/2) each
            with torch.no_grad():
                memory.K.copy_(torch.stack([kmeans(q1, n, generator), kmeans(q2, n, generator)]))
        block = model.model.layers[i]
        block.mlp = MLPWithMemory(block.mlp, memory.to(device))
    return memories(model)


def accesses(model, run, valid=None) -> dict[str, Access]:
    """name -> Access of each MemoryLayer while run() does forward passes (gradients as run()
    wants).
    valid (B, T): the real tokens of run()'s one forward, or None: every token counts."""
    stats = {}

    def count(name, module, args, output):
        x = args[0].detach().float()
        slots = lookup(x, module.W_q, module.K, module.k)[1]  # (B, T, k)
        N = module.V.shape[0]
        if valid is not None:  # padding picks go to an extra column N, dropped below
            slots = torch.where(valid.bool()[..., None].to(slots.device), slots, N)
        c = torch.bincount(slots.flatten(), minlength=N + 1)[:N]  # (N,)
        hit = torch.zeros(len(slots), N + 1, dtype=torch.bool, device=slots.device)
        hit.scatter_(1, slots.flatten(1), True)  # (B, N + 1): row b used slot i
        old = stats.get(name, Access(0, 0, 0))
        stats[name] = Access(old.counts + c, old.df + hit[:, :N].sum(0), old.docs + len(slots))

    hooks = [m.register_forward_hook(partial(count, n)) for n, m in memories(model).items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return stats


def trainable(model) -> dict[str, nn.Parameter]:
    """ "<memory name>.V" of every MemoryLayer: the only tensors SMF changes."""
    return {f"{n}.V": m.V for n, m in memories(model).items()}


def optimizer(model, lr: float) -> torch.optim.SparseAdam:
    """Lazy Adam over the value tables: a step moves exactly the rows in the sparse gradient."""
    return torch.optim.SparseAdam(list(trainable(model).values()), lr=lr)


def train_step(model, tokens, labels, attention_mask, background, opt, top_t=TOP_T, score="tfidf"):
    """One SMF step: answer loss, backward, per layer the top-T slots of the batch's real tokens
    against `background` (name -> Access), a SparseAdam step on those rows of V only.
    -> (loss, name -> chosen slots)."""
    out = {}

    def run():
        out["loss"] = answer_loss(model, tokens, labels, attention_mask)

    batch = accesses(model, run, attention_mask)
    out["loss"].backward()
    chosen = {}
    for name, memory in memories(model).items():
        scores = slot_scores(batch[name], background[name], score)
        rows = top_slots(scores, batch[name].counts, top_t).to(memory.V.device)
        chosen[name] = rows
        grad = memory.V.grad
        memory.V.grad = torch.sparse_coo_tensor(
            rows[None], grad[rows], grad.shape, check_invariants=True
        )
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out["loss"].item(), chosen


# -----------------------------------------------------------------------------
# sizes


def added_parameters(model) -> int:
    """Every memory tensor: V, W_q, K (and W_o)."""
    return sum(p.numel() for m in memories(model).values() for p in m.parameters())


def touched(model) -> int:
    """Slots whose value row is no longer 0: what the facts wrote into the memory."""
    return sum(int((m.V != 0).any(-1).sum()) for m in memories(model).values())


def memory_bytes(model) -> int:
    return sum(
        p.numel() * p.element_size() for m in memories(model).values() for p in m.parameters()
    )
