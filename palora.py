"""PALoRA (Projection-Adaptive LoRA, arXiv 2605.24549): the method alone, in torch, top to bottom.

1. SVF (Transformer², arXiv 2501.06252): W = U diag(s) Vh is cut once and only z is trained:
   W' = U diag(s ⊙ z) Vh · c, c = Σs / Σ(s ⊙ z).
2. Probe (this project's rule; the paper publishes none): m = z · c; the skill's components are
   those with |m - 1| largest, wherever they sit in the spectrum.
3. Injection: dW = (I - U_S U_Sᵀ) B A (I - V_S V_Sᵀ) · alpha/r. For any A, B: U_Sᵀ dW = 0 (output
   side) and dW V_S = 0 (input side): each protected triplet (u_i, s_i m_i, v_i) of W' is one of
   W' + dW.
Baselines on the same layer: LoRA (2106.09685), PiSSA (2404.02948), MiLoRA (2406.09044), top-k
protection (OPLoRA, 2510.13003), random protection (a control); "palora_act", input side from
activations (CorDA 2406.05223, AlphaEdit 2410.02355), is our extension.
Files (SVD cache, z, probe, PEFT adapters) are adapters.py's: this module touches no disk.

Dimension letters: B batch, T tokens, D hidden, F MLP width. One weight W is (out, in), (F, D) or
(D, F), y = x Wᵀ; R = min(out, in) singular values, r the LoRA rank, k protected components,
"..." = (B, T). Weight names are Hugging Face's without ".weight" ("model.layers.0.mlp.down_proj").
"""

import math
import zlib
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # the one place default targets are named
# float32 unit roundoff: merge checks and the float32 leakage bound are multiples of it
U32 = 2.0**-24


class PaloraError(ValueError):
    """Bad input (a shape, a setting); the message names the weight and the problem."""

    expected = True  # bad input: cli.run prints it as one line, exit 2


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32: bfloat16 weights are decomposed, merged and projected in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def matrix_kind(name: str) -> str:
    """The matrix kind targets name: "model.layers.0.mlp.up_proj" -> "up_proj"."""
    return name.rpartition(".")[2]


def largest(s: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |s|, largest first (an expert's s ⊙ m may be negative)."""
    return torch.argsort(s.abs(), descending=True)[:k]


def find_targets(model: nn.Module, targets=MLP_TARGETS) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every linear layer whose matrix kind is in targets."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    valid = sorted({matrix_kind(n) for n in linears})
    for t in targets:
        if t not in valid:
            raise PaloraError(
                f"unknown target {t!r}: the model's linear layers are {', '.join(valid)}"
            )
    chosen = {n: m for n, m in linears.items() if matrix_kind(n) in targets}
    for n, m in chosen.items():
        if m.bias is not None:  # Llama and Mistral have none; the layers below would drop it
            raise PaloraError(f"{n} has a bias: palora adapts bias-free linear layers only")
    return chosen


def replace(model: nn.Module, name: str, module: nn.Module):
    """Swap child `name` for `module` on its parent, as gpt-fast's quantize.py swaps nn.Linear."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def frozen_linear(W: torch.Tensor, like: type = nn.Linear) -> nn.Linear:
    """A frozen bias-free linear layer holding W (out, in): a merged weight, the next stage's
    base. Of class `like`, nn.Linear or a subclass with its constructor: the class of the layer
    it stands in for, so that a model's own forward (model.Linear's CPU fast path) stays."""
    layer = like(W.shape[1], W.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(W, requires_grad=False)
    return layer


# -----------------------------------------------------------------------------
# SVD: once per weight, float32


def svd(W: torch.Tensor):
    """W = U diag(s) Vh, thin: U (out, R) output side, s (R,) descending, Vh (R, in) input side."""
    U, s, Vh = torch.linalg.svd(wide(W.detach()), full_matrices=False)
    return U.contiguous(), s.contiguous(), Vh.contiguous()  # LAPACK returns column-major


def svds(model: nn.Module, targets=MLP_TARGETS) -> dict:
    """name -> (U, s, Vh) on the CPU for every target weight (adapters.svds caches them on disk)."""
    return {
        n: tuple(t.cpu() for t in svd(m.weight)) for n, m in find_targets(model, targets).items()
    }


# -----------------------------------------------------------------------------
# SVF: stage one, a trainable vector z per weight


def multiplier(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """m = z · c, c = Σs / Σ(s ⊙ z): each singular value's factor (Σ s ⊙ m = Σ s, so z ~ a·z)."""
    return z * (s.sum() / (s * z).sum())  # (R,)


def svf_weight(U, s, Vh, z) -> torch.Tensor:
    """W' = U diag(s ⊙ m) Vh: (out, R) ⊙ (R,) @ (R, in) -> (out, in)."""
    return (U * (s * multiplier(s, z))) @ Vh


def expert_svds(svds: dict, z: dict) -> dict:
    """SVD of each merged expert W', (U, s ⊙ m, Vh): U, Vh are W's, only s changes. Kept in the
    base's order, so indices name the same components; who needs the largest sorts by |s ⊙ m|."""
    out = {}
    for n, (U, s, Vh) in svds.items():
        out[n] = (U, s * multiplier(s, z[n].to(s)), Vh) if n in z else (U, s, Vh)
    return out


class SVFLinear(nn.Module):
    """y = ((x Vhᵀ) ⊙ (s ⊙ m)) Uᵀ = x W'ᵀ, m = z · Σs / Σ(s ⊙ z); W' is never formed.

    U (out, R), s (R,), Vh (R, in) are frozen parameters that replace W (not kept beside it: (out +
    in) R numbers against W's out · in, 1.375x for SmolLM2's 576 x 1536); parameters, not buffers,
    so that FSDP2 shards them as it shards W. z (R,), initialised at 1 (W' = W), is the only trained
    one. U and Vh may be bfloat16 (CUDA autocast); s and z stay float32.
    `like` is the class merge_svf gives W' (the replaced layer's: frozen_linear).
    """

    def __init__(self, U, s, Vh, z=None, like: type = nn.Linear):
        super().__init__()
        self.out_features, self.in_features = U.shape[0], Vh.shape[1]
        self.like = like
        self.U = nn.Parameter(U, requires_grad=False)
        self.s = nn.Parameter(wide(s), requires_grad=False)
        self.Vh = nn.Parameter(Vh, requires_grad=False)
        z = torch.ones_like(self.s) if z is None else z.detach().to(self.s).clone()
        self.z = nn.Parameter(z)

    def forward(self, x):
        h = F.linear(x, self.Vh)  # x Vhᵀ: (..., in) @ (in, R) -> (..., R)
        h = h * (self.s * multiplier(self.s, self.z)).to(h.dtype)  # (..., R) ⊙ (R,)
        return F.linear(h, self.U)  # h Uᵀ: (..., R) @ (R, out) -> (..., out)


def add_svf(model: nn.Module, svds: dict, z: dict | None = None) -> dict[str, nn.Parameter]:
    """Replace each weight named in svds by an SVFLinear (z from `z`, else ones): name -> z."""
    layers = {n: m for n, m in model.named_modules() if n in svds and isinstance(m, nn.Linear)}
    missing = sorted(set(svds) - set(layers)) + sorted(set(z or svds) ^ set(svds))
    if missing:
        raise PaloraError(f"no nn.Linear, SVD or z for {', '.join(missing[:3])}")
    zs = {}
    for name, layer in layers.items():
        (U, s, Vh), W = svds[name], layer.weight
        if z is not None and z[name].shape != s.shape:
            raise PaloraError(
                f"{name}: z has shape {tuple(z[name].shape)}, the weight has R = {len(s)}"
            )
        U, s, Vh = U.to(W.device, W.dtype), s.to(W.device), Vh.to(W.device, W.dtype)
        new = SVFLinear(U, s, Vh, None if z is None else z[name], like=type(layer))
        replace(model, name, new)
        zs[name] = new.z
    return zs


def merge_expert(model: nn.Module, svds: dict, z: dict) -> nn.Module:
    """The trained expert z merged into model's weights in place (add_svf, then merge_svf), from
    the SVDs of the base weights (any superset of z's names)."""
    add_svf(model, {n: svds[n] for n in z}, z)
    return merge_svf(model)


@torch.no_grad()
def merge_svf(model: nn.Module) -> nn.Module:
    """Replace each SVFLinear by a frozen nn.Linear holding W' (float32, stored in U's dtype).
    Checked:
    x W'ᵀ equals the factored forward within 2 (R + in) u ||x|| ||W'||₂ (first-order rounding)."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, SVFLinear)]:
        U, Vh = wide(layer.U), wide(layer.Vh)
        sm = layer.s * multiplier(layer.s, layer.z)  # (R,)
        W = (U * sm) @ Vh  # W' (out, in)
        g = torch.Generator(W.device).manual_seed(0)
        x = torch.randn(8, W.shape[1], device=W.device, dtype=W.dtype, generator=g)
        factored = ((x @ Vh.T) * sm) @ U.T  # (8, in) -> (8, R) -> (8, out)
        err = (x @ W.T - factored).norm() / (x.norm() * sm.abs().max())
        assert err <= 2 * (len(sm) + W.shape[1]) * U32, f"{name}: merged W' is {err:.1e} off"
        replace(model, name, frozen_linear(W.to(layer.U.dtype), layer.like))
    return model


# -----------------------------------------------------------------------------
# the probe: which components the skill moved


def select(scores: dict, rule: tuple[str, float]) -> dict:
    """name -> indices chosen by rule, one of: ("fraction", f) the top round(f · R) scores of each
    matrix; ("k", k) the top k of each; ("threshold", t) every score above t; ("global_fraction", f)
    the scores above the pooled quantile that keeps f of all components (rank adapts per matrix)."""
    kind, value = rule
    if kind in ("fraction", "global_fraction") and not 0 < value < 1:
        raise PaloraError(f"probe {kind} must be in (0, 1), got {value}")
    if kind == "global_fraction":  # ties at the quantile are all kept
        flat = torch.cat(list(scores.values()))
        kind, value = (
            "threshold",
            torch.topk(flat, max(1, round(value * len(flat)))).values[-1].item(),
        )
        return {n: torch.nonzero(sc >= value).flatten() for n, sc in scores.items()}
    if kind == "threshold":
        return {n: torch.nonzero(sc > value).flatten() for n, sc in scores.items()}
    if kind not in ("fraction", "k"):
        raise PaloraError(f"unknown probe rule {kind!r}: fraction, k, threshold or global_fraction")
    out = {}
    for n, sc in scores.items():
        k = int(value) if kind == "k" else max(1, round(value * len(sc)))
        if not 0 <= k <= len(sc):
            raise PaloraError(f"probe selects {k} components of {n}, which has rank {len(sc)}")
        out[n] = torch.topk(sc, k).indices
    return out


def probe_rule(fraction=0.5, threshold=0.0, global_fraction=0.0) -> tuple[str, float]:
    """The probe's selection (select's rule): a threshold or a global fraction if one is given (not
    both), else the per-matrix fraction."""
    if threshold and global_fraction:
        raise PaloraError("give a probe threshold or a global fraction, not both")
    if threshold:
        return ("threshold", threshold)
    return ("global_fraction", global_fraction) if global_fraction else ("fraction", fraction)


def probe(svds: dict, experts: list[dict], rule=("fraction", 0.5), score="delta") -> dict:
    """name -> S, int64 ascending: indices into the base weight's spectrum (descending s) of the
    components the SVF expert(s) moved most. score "delta" = |m - 1| (blind to where a component
    sits,
    since the skill is spread over the spectrum), "energy" = s ⊙ |m - 1|. Several experts: union."""
    if score not in ("delta", "energy"):
        raise PaloraError(f"unknown probe score {score!r}: delta or energy")
    protected = {}
    for z in experts:
        scores = {}
        for n, t in z.items():
            if n not in svds or t.shape != svds[n][1].shape:
                raise PaloraError(
                    f"expert z for {n}: shape {tuple(t.shape)} does not match its SVD"
                )
            s = svds[n][1]
            delta = (multiplier(s, t.to(s)) - 1).abs()  # |m - 1|, (R,)
            scores[n] = delta * s if score == "energy" else delta
        for n, S in select(scores, rule).items():
            protected[n] = torch.cat([protected.get(n, S[:0]), S])
    return {n: torch.unique(S).long() for n, S in protected.items()}  # unique() also sorts


def same_count(method: str, S: dict, expert_svds: dict, seed: int) -> dict:
    """The set a method protects, as many components per matrix as the probe's S: "topk" the merged
    expert's largest (OPLoRA), "random" uniform with the seed (the control), "none" nothing (an
    ablation of palora_act's output side), else S itself."""
    if method == "none":
        return {n: s[:0] for n, s in S.items()}
    if method == "topk":  # largest first: U_S's columns in the order OPLoRA takes them
        return {n: largest(expert_svds[n][1], len(s)) for n, s in S.items()}
    if method == "random":  # one generator per matrix: the draw depends on (seed, name) alone
        out = {}
        for n, s in S.items():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(n.encode()))
            out[n] = torch.randperm(len(expert_svds[n][1]), generator=g)[: len(s)].sort().values
        return out
    return S


def protected_bases(svd_: tuple, S: torch.Tensor):
    """U_S = U[:, S] (out, k), output-side basis; V_S = Vh[S]ᵀ (in, k), input-side; orthonormal."""
    U, _, Vh = svd_
    S = S.to(U.device)
    return U[:, S].contiguous(), Vh[S].T.contiguous()


# -----------------------------------------------------------------------------
# stage two: LoRA whose update cannot reach the protected subspace


def project_out(B: torch.Tensor, U_S) -> torch.Tensor:
    """B - U_S (U_Sᵀ B), out side: (k, out) @ (out, r) -> (k, r); (out, k) @ (k, r) -> (out, r)."""
    return B if U_S is None else B - U_S @ (U_S.T @ B)


def project_in(A: torch.Tensor, V_S) -> torch.Tensor:
    """A - (A V_S) V_Sᵀ, in side: (r, in) @ (in, k) -> (r, k); (r, k) @ (k, in) -> (r, in)."""
    return A if V_S is None else A - (A @ V_S) @ V_S.T


class LoRALinear(nn.Module):
    """y = x Wᵀ + (alpha/r) (x A_pᵀ) B_pᵀ: dW = (alpha/r) B_p A_p = (I - U_S U_Sᵀ) B A (I - V_S
    V_Sᵀ) alpha/r.

    W (out, in) frozen, in `base`, a frozen_linear of class `like` (the replaced layer's, so x Wᵀ
    runs through the model's own forward); A (r, in), B (out, r) trained; U_S (out, k), V_S (in,
    k) frozen orthonormal (None = unprotected), parameters so that FSDP2 shards them. B_p, A_p
    are recomputed from A, B at every forward, so U_Sᵀ dW = 0 = dW V_S whatever the optimizer
    does; the dense projectors are never formed.
    `moved` = (A0, B0) when the init took (alpha/r) B0 A0 out of W (PiSSA, MiLoRA), for the export.
    """

    def __init__(self, weight, A, B, alpha: float, U_S=None, V_S=None, moved=None, like=nn.Linear):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha = A.shape[0], alpha
        self.scale = alpha / self.r
        self.base = frozen_linear(weight.detach(), like)
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        A0, B0 = moved if moved else (None, None)
        for name, t in (("U_S", U_S), ("V_S", V_S), ("A0", A0), ("B0", B0)):
            t = None if t is None else nn.Parameter(t.detach().to(A).clone(), requires_grad=False)
            self.register_parameter(name, t)

    @property
    def weight(self) -> nn.Parameter:
        """W (out, in), the frozen base weight."""
        return self.base.weight

    def projected(self):
        """(A_p, B_p) in the factors' precision: autocast off (a bfloat16 projection leaks 1e-2)."""
        with torch.autocast(self.A.device.type, enabled=False):
            return project_in(self.A, self.V_S), project_out(self.B, self.U_S)

    def forward(self, x):
        A, B = self.projected()
        h = F.linear(x, A.to(x.dtype))  # x A_pᵀ: (..., in) @ (in, r) -> (..., r)
        dh = F.linear(h, B.to(x.dtype))  # (..., r) @ (r, out) -> (..., out)
        return self.base(x) + self.scale * dh


def delta_weight(layer: LoRALinear) -> torch.Tensor:
    """dW = (alpha/r) B_p A_p: (out, r) @ (r, in) -> (out, in)."""
    A, B = layer.projected()
    return layer.scale * (B @ A)


def leakage(dW: torch.Tensor, U_S=None, V_S=None) -> tuple[float, float]:
    """(||U_Sᵀ dW|| / ||dW||, ||dW V_S|| / ||dW||), Frobenius: the update's share on the protected
    output
    (U) and input (V) directions; 0 for PALoRA up to rounding (tests/test_palora.py)."""
    norm = dW.norm()
    out = dW[:0] if U_S is None else U_S.T.to(dW) @ dW  # (k, out) @ (out, in) -> (k, in)
    inp = dW[:, :0] if V_S is None else dW @ V_S.to(dW)  # (out, in) @ (in, k) -> (out, k)
    return tuple(0.0 if norm == 0 else (t.norm() / norm).item() for t in (out, inp))


# -----------------------------------------------------------------------------
# methods: one small initialisation per value of `method`


class Target(NamedTuple):
    """What an initialisation may use for one weight: W (out, in), its SVD, protected S, V_act,
    and the class of its layer (the LoRALinear's base keeps it: frozen_linear)."""

    W: torch.Tensor
    svd: tuple | None
    S: torch.Tensor | None
    V_act: torch.Tensor | None
    like: type = nn.Linear


def lora_factors(t: Target, r: int, generator):
    """A (r, in) ~ U(±1/√in), peft's kaiming_uniform_(a=√5); B (out, r) = 0: dW = 0 at the start."""
    (out, inp), dtype = t.W.shape, torch.promote_types(t.W.dtype, torch.float32)
    bound = 1 / math.sqrt(inp)
    A = torch.empty(r, inp, dtype=dtype).uniform_(-bound, bound, generator=generator)
    return A.to(t.W.device), torch.zeros(out, r, dtype=dtype, device=t.W.device)


def init_lora(t: Target, r, alpha, generator):
    """Plain LoRA: nothing protected."""
    return LoRALinear(t.W, *lora_factors(t, r, generator), alpha, like=t.like)


def init_protected(t: Target, r, alpha, generator):
    """PALoRA (S = the probe's), top-k and random (S = same_count's): S protected on both sides."""
    bases = protected_bases(t.svd, t.S)
    return LoRALinear(t.W, *lora_factors(t, r, generator), alpha, *bases, like=t.like)


def init_palora_act(t: Target, r, alpha, generator):
    """Ours: output side from the probe (U_S), input side from the skill's activations (V_act)."""
    U_S = protected_bases(t.svd, t.S)[0]
    return LoRALinear(t.W, *lora_factors(t, r, generator), alpha, U_S, t.V_act, like=t.like)


def init_spectral(t: Target, r, alpha, generator, top: bool):
    """PiSSA (top) / MiLoRA (bottom), as peft: A = √(s/scale) Vh[idx] (r, in), B = U[:, idx]
    √(s/scale)
    (out, r), so scale · B A = U[:, idx] diag(s) Vh[idx]; the frozen residual is W - scale · B A."""
    U, s, Vh = (x.to(t.W.device) for x in t.svd)
    if r > len(s):
        raise PaloraError(f"rank {r} is above the matrix rank {len(s)}: PiSSA/MiLoRA need r <= R")
    idx = torch.argsort(s.abs(), descending=top)[:r]
    root = (
        s[idx].abs() * r / alpha
    ).sqrt()  # an expert's s ⊙ m can be negative: its sign goes into B
    A = root[:, None] * Vh[idx]  # (r, in)
    B = U[:, idx] * (root * s[idx].sign())  # (out, r)
    W0 = wide(t.W) - (alpha / r) * (B @ A).to(wide(t.W))  # (out, r) @ (r, in) -> (out, in)
    return LoRALinear(W0.to(t.W.dtype), A, B, alpha, moved=(A, B), like=t.like)


METHODS = {
    "palora": init_protected,
    "topk": init_protected,
    "random": init_protected,
    "lora": init_lora,
    "pissa": partial(init_spectral, top=True),
    "milora": partial(init_spectral, top=False),
    "palora_act": init_palora_act,
}
PROTECTING = ("palora", "topk", "random", "palora_act")  # need the probe's S (and the SVD)
OUTPUT_SIDES = ("probe", "random", "topk", "none")  # palora_act's U_S: same_count's rules


def add_lora(
    model,
    method: str,
    r: int,
    alpha: float,
    svds=None,
    protected=None,
    input_bases=None,
    seed: int = 0,
) -> dict[str, nn.Parameter]:
    """Replace each weight named in svds by the LoRALinear METHODS[method] builds; returns the
    trained tensors, "<weight name>.A" / ".B" -> Parameter.

    svds: name -> SVD of the weight being adapted (expert_svds(...) on an SVF expert), which also
    names the targets; protected: name -> S the method protects (same_count(...)); input_bases: name
    -> V_act.
    """
    if method not in METHODS:
        raise PaloraError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if method in PROTECTING and sorted(set(svds) - set(protected or {})):
        raise PaloraError(f"method {method} needs the protected set S of every target")
    if method == "palora_act" and sorted(set(svds) - set(input_bases or {})):
        raise PaloraError("method palora_act needs the input basis V_act of every target")
    generator = torch.Generator().manual_seed(seed)
    layers = {n: m for n, m in model.named_modules() if n in svds and isinstance(m, nn.Linear)}
    for name, layer in layers.items():
        S = (protected or {}).get(name)
        V_act = (input_bases or {}).get(name)
        t = Target(layer.weight.detach(), svds[name], S, V_act, type(layer))
        replace(model, name, METHODS[method](t, r, alpha, generator))
    return lora_params(model)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a frozen nn.Linear holding W + dW, summed in float32 or wider."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        W = wide(layer.weight) + delta_weight(layer)
        replace(model, name, frozen_linear(W.to(layer.weight.dtype), type(layer.base)))
    return model


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trained tensors, "<weight name>.A" and "<weight name>.B" of every LoRALinear."""
    params = {}
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            params[f"{n}.A"], params[f"{n}.B"] = m.A, m.B
    return params


def activation_covariances(model: nn.Module, names, run) -> dict[str, torch.Tensor]:
    """name -> C = Σ xᵀ x (in, in) over the input rows each layer sees while run() does forward
    passes
    (padding rows count too: pass unpadded batches)."""
    covs = {}

    def accumulate(name, module, args):
        x = wide(args[0].detach().flatten(0, -2))  # (..., in) -> (N, in)
        covs[name] = covs.get(name, 0) + x.T @ x  # (in, N) @ (N, in) -> (in, in)

    hooks = [
        model.get_submodule(n).register_forward_pre_hook(partial(accumulate, n)) for n in names
    ]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return covs


def activation_bases(covs: dict, counts: dict) -> dict[str, torch.Tensor]:
    """name -> V_act (in, k): the top-k eigenvectors of C, the input directions used most, so that
    dW x ≈ 0 on those inputs (k = counts[name], e.g. the probe's count for that weight)."""
    bases = {}
    for n, C in covs.items():
        V = torch.linalg.eigh(C.double())[1].float()  # ascending eigenvalues, (in, in)
        bases[n] = V[:, V.shape[1] - counts[n] :].flip(-1).contiguous()
    return bases


def extend_bases(bases: dict, covs: dict, extra: dict, free: int) -> dict[str, torch.Tensor]:
    """name -> [V | V_new] (in, k + k_new): V_new = the top k_new eigenvectors of C restricted to
    the complement of span(V), P C P with P = I - V Vᵀ, so that dW x ≈ 0 on further inputs (an
    earlier round's facts) too, none of V given up. k_new = extra[name], capped so that at least
    `free` input directions stay unprotected (the LoRA's room)."""
    out = {}
    for n, V in bases.items():
        V, C = V.double(), covs[n].double()  # (in, k), (in, in)
        k_new = min(extra[n], C.shape[0] - V.shape[1] - free)
        if k_new <= 0:
            out[n] = V.float()
            continue
        CV = C @ V  # (in, in) @ (in, k) -> (in, k)
        PCP = C - V @ CV.T - CV @ V.T + V @ (V.T @ CV) @ V.T  # P C P, P never formed
        W = torch.linalg.eigh(PCP)[1][:, -k_new:].flip(-1)  # (in, k_new), largest first
        W = torch.linalg.qr(W - V @ (V.T @ W))[0]  # exactly outside span(V), orthonormal
        out[n] = torch.cat([V, W], dim=1).float().contiguous()
    return out


def interference(dW: torch.Tensor, W: torch.Tensor, C: torch.Tensor) -> float:
    """E‖dW x‖² / E‖W x‖² over inputs x whose second moment is C = Σ x xᵀ (in, in): how much of the
    layer's output on those inputs the update changes. tr(dW C dWᵀ) / tr(W C Wᵀ), float64; 0
    exactly when dW C = 0, e.g. when dW's rows lie outside the inputs' span."""
    dW, W, C = dW.double(), W.double(), C.double()
    return ((dW @ C * dW).sum() / (W @ C * W).sum()).item()  # tr(M C Mᵀ) = Σ (M C) ⊙ M


def export_factors(layer: LoRALinear):
    """(A, B, alpha) of a plain LoRA giving the layer's dW on its original base. PALoRA, top-k,
    random: the projections folded in (A_p, B_p), the same dW exactly. PiSSA, MiLoRA (peft's
    subtract_mutated_init): W - W0 = scale B0 A0, so dW on W is scale (B A - B0 A0)
    = scale [B | -B0] [A ; A0], rank 2r with alpha doubled to keep alpha/r."""
    A, B = layer.projected()
    if layer.A0 is None:
        return A, B, layer.alpha
    A2 = torch.cat([A, layer.A0])  # (2r, in)
    B2 = torch.cat([B, -layer.B0], dim=1)  # (out, 2r)
    return A2, B2, 2 * layer.alpha
