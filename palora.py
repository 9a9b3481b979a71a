"""PALoRA (Projection-Adaptive LoRA, arXiv 2605.24549): SVD split, SVF layer, spectral probe, structurally orthogonal
LoRA, the baselines' initialisations, merging and export. Read top to bottom; README maps symbols to equations.

1. SVF (Transformer², arXiv 2501.06252): W = U diag(s) Vh is cut once and only z is trained:
   W' = U diag(s ⊙ z) Vh · c, c = Σs / Σ(s ⊙ z).
2. Probe (this project's rule; the paper publishes none): m = z · c; the skill's components are those with |m - 1|
   largest, wherever they sit in the spectrum.
3. Injection: dW = (I - U_S U_Sᵀ) B A (I - V_S V_Sᵀ) · alpha/r. For any A, B: U_Sᵀ dW = 0 (output side) and
   dW V_S = 0 (input side), so each protected triplet (u_i, s_i m_i, v_i) of W' is still one of W' + dW.
Baselines on the same layer: LoRA (2106.09685), PiSSA (2404.02948), MiLoRA (2406.09044), top-k protection (OPLoRA,
2510.13003); "palora_act", input side from activations (CorDA 2406.05223, AlphaEdit 2410.02355), is our extension.
PEFT layout: https://github.com/huggingface/peft (LoraConfig, subtract_mutated_init for the PiSSA export).

Dimension letters: B batch, T tokens, D hidden, F MLP width, V vocabulary. One weight W is (out, in), (F, D) or
(D, F), y = x Wᵀ; R = min(out, in) singular values, r the LoRA rank, k protected components, "..." = (B, T).
Weight names are Hugging Face's without ".weight" ("model.layers.0.mlp.down_proj").
"""
import hashlib
import json
import math
import shutil
import warnings
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from tasks import atomic_save_file, atomic_write_json

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # the one place default targets are named
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache" / "svd"
U32 = 2.0 ** -24  # float32 unit roundoff: merge checks and the float32 leakage bound are multiples of it

class PaloraError(ValueError):
    """Bad input (a file, a shape, a setting); the message names the file or weight and the problem."""
    expected = True  # bad input: cli.run prints it as one line, exit 2

def wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32: bfloat16 weights are decomposed, merged and projected in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))

def find_targets(model: nn.Module, targets=MLP_TARGETS) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every linear layer whose last name part is in targets."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    valid = sorted({n.rpartition(".")[2] for n in linears})
    for t in targets:
        if t not in valid:
            raise PaloraError(f"unknown target {t!r}: the model's linear layers are {', '.join(valid)}")
    chosen = {n: m for n, m in linears.items() if n.rpartition(".")[2] in targets}
    for n, m in chosen.items():
        if m.bias is not None:  # Llama and Mistral have none; the layers below would silently drop it
            raise PaloraError(f"{n} has a bias: palora's layers adapt bias-free linear layers only")
    return chosen

def replace(model: nn.Module, name: str, module: nn.Module):
    """Swap child `name` for `module` on its parent, as gpt-fast's quantize.py swaps nn.Linear children."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)

def frozen_linear(W: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding W (out, in), frozen: a merged weight is the next stage's base."""
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(W, requires_grad=False)
    return layer

def save_tensors(tensors: dict, path, metadata: dict):
    """safetensors written atomically (temporary file, then rename: a crash never leaves half a file)."""
    atomic_save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata)

def read_tensors(path, identity: str | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; one made for another checkpoint than `identity` is refused."""
    try:
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PaloraError(f"{path}: unreadable safetensors file ({e})") from e
    if identity is not None and meta.get("checkpoint") != identity:
        raise PaloraError(f"{path}: made for checkpoint {meta.get('checkpoint')!r}, the model is {identity!r}")
    return tensors, meta

def sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:  # the raw bytes in the stored dtype (a uint8 view: numpy has no bfloat16)
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# -----------------------------------------------------------------------------
# SVD: once per weight, float32, cached

def svd(W: torch.Tensor):
    """W = U diag(s) Vh, thin: U (out, R) output side, s (R,) descending, Vh (R, in) input side."""
    return tuple(t.contiguous() for t in torch.linalg.svd(wide(W.detach()), full_matrices=False))  # LAPACK: column-major

def cached_svd(W: torch.Tensor, path: Path, identity: str, name: str):
    """svd(W) from `path` if its metadata matches this weight, else computed and written there.

    Cache policy: factors of other weights (identity, name, shape or W's checksum differ: stale or foreign) are
    derived data, recomputed and overwritten with a warning; a file whose factors fail their own checksum, or
    that does not parse, is corrupted: an error, since that points at a disk or writer problem.
    """
    want = {"checkpoint": identity, "name": name, "shape": f"{W.shape[0]},{W.shape[1]}", "weight_sha256": sha256(W)}
    if path.exists():
        tensors, meta = read_tensors(path)
        stale = [k for k, v in want.items() if meta.get(k) != v]
        if stale:
            warnings.warn(f"{path}: stale SVD cache ({', '.join(stale)} differ); recomputing")
        elif set(tensors) != {"U", "s", "Vh"} or sha256(*(tensors[k] for k in ("U", "s", "Vh"))) != meta["factors_sha256"]:
            raise PaloraError(f"{path}: corrupted SVD cache (the factors fail their checksum); delete the file")
        else:
            return tensors["U"], tensors["s"], tensors["Vh"]
    U, s, Vh = (t.cpu() for t in svd(W))
    save_tensors({"U": U, "s": s, "Vh": Vh}, path, {**want, "factors_sha256": sha256(U, s, Vh)})
    return U, s, Vh

def compute_svds(model: nn.Module, targets=MLP_TARGETS, cache_dir=DEFAULT_CACHE, identity: str | None = None) -> dict:
    """name -> (U, s, Vh) on the CPU, cached as cache_dir/<identity>/<name>.safetensors (identity defaults to
    model.identity; with none, or cache_dir=None, nothing is cached)."""
    identity = identity or getattr(model, "identity", None)
    return {n: tuple(t.cpu() for t in svd(m.weight)) if cache_dir is None or identity is None
            else cached_svd(m.weight, Path(cache_dir) / identity / f"{n}.safetensors", identity, n)
            for n, m in find_targets(model, targets).items()}


# -----------------------------------------------------------------------------
# SVF: stage one, a trainable vector z per weight

def multiplier(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """m = z · c, c = Σs / Σ(s ⊙ z): the factor on each singular value (Σ s ⊙ m = Σ s, so z ~ a·z for a > 0)."""
    return z * (s.sum() / (s * z).sum())  # (R,)

def svf_weight(U, s, Vh, z) -> torch.Tensor:
    """W' = U diag(s ⊙ m) Vh: (out, R) ⊙ (R,) @ (R, in) -> (out, in)."""
    return (U * (s * multiplier(s, z))) @ Vh

def expert_svds(svds: dict, z: dict) -> dict:
    """SVD of each merged expert W', (U, s ⊙ m, Vh): U, Vh are W's, only s changes. Kept in the base's order, so
    indices still name the same components; whoever needs the largest ones sorts by |s ⊙ m|."""
    return {n: (U, s * multiplier(s, z[n].to(s)), Vh) if n in z else (U, s, Vh) for n, (U, s, Vh) in svds.items()}

class SVFLinear(nn.Module):
    """y = ((x Vhᵀ) ⊙ (s ⊙ m)) Uᵀ = x W'ᵀ, m = z · Σs / Σ(s ⊙ z); W' is never formed.

    U (out, R), s (R,), Vh (R, in) are frozen buffers that replace W (not kept beside it: (out + in) R numbers
    against W's out · in, 1.25x for the MLP's 4:1 shapes). z (R,), initialised at 1 (W' = W), is the only
    parameter. U and Vh may be bfloat16 (CUDA autocast); s and z stay float32.
    """

    def __init__(self, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = U.shape[0], Vh.shape[1]
        self.register_buffer("U", U, persistent=False)  # non-persistent: the layer's state_dict is z alone
        self.register_buffer("s", wide(s), persistent=False)
        self.register_buffer("Vh", Vh, persistent=False)
        self.z = nn.Parameter(torch.ones_like(self.s) if z is None else z.detach().to(self.s).clone())

    def forward(self, x):
        h = F.linear(x, self.Vh)  # x Vhᵀ: (..., in) @ (in, R) -> (..., R), coordinates on the right singular vectors
        h = h * (self.s * multiplier(self.s, self.z)).to(h.dtype)  # (..., R) ⊙ (R,)
        return F.linear(h, self.U)  # h Uᵀ: (..., R) @ (R, out) -> (..., out)

def add_svf(model: nn.Module, svds: dict, z: dict | None = None) -> dict[str, nn.Parameter]:
    """Replace each weight named in svds by an SVFLinear (z from `z`, else ones); returns name -> z."""
    layers = {n: m for n, m in model.named_modules() if n in svds and isinstance(m, nn.Linear)}
    missing = sorted(set(svds) - set(layers)) + sorted(set(z or svds) ^ set(svds))
    if missing:
        raise PaloraError(f"no nn.Linear, SVD or z for {', '.join(missing[:3])}")
    zs = {}
    for name, layer in layers.items():
        (U, s, Vh), W = svds[name], layer.weight
        if z is not None and z[name].shape != s.shape:
            raise PaloraError(f"{name}: z has shape {tuple(z[name].shape)}, the weight has {len(s)} singular values")
        new = SVFLinear(U.to(W.device, W.dtype), s.to(W.device), Vh.to(W.device, W.dtype), None if z is None else z[name])
        replace(model, name, new)
        zs[name] = new.z
    return zs

@torch.no_grad()
def merge_svf(model: nn.Module) -> nn.Module:
    """Replace each SVFLinear by a frozen nn.Linear holding W' (float32, stored in U's dtype). Checked: x W'ᵀ equals
    the factored forward within 2 (R + in) u ||x|| ||W'||₂ (first-order rounding); a wrong c would be O(1) off."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, SVFLinear)]:
        U, Vh, sm = wide(layer.U), wide(layer.Vh), layer.s * multiplier(layer.s, layer.z)
        W = (U * sm) @ Vh  # W' (out, in)
        x = torch.randn(8, W.shape[1], device=W.device, dtype=W.dtype, generator=torch.Generator(W.device).manual_seed(0))
        err = (x @ W.T - ((x @ Vh.T) * sm) @ U.T).norm() / (x.norm() * sm.abs().max())  # (8, in) -> (8, R) -> (8, out)
        assert err <= 2 * (len(sm) + W.shape[1]) * U32, f"{name}: merged W' is {err:.1e} off the factored form"
        replace(model, name, frozen_linear(W.to(layer.U.dtype)))
    return model

def save_svf(path, model_or_z, metadata: dict | None = None):
    """z vectors keyed by weight name, with string metadata; the checkpoint identity ("checkpoint", from the model
    or the metadata) is required: it is how a z file for another checkpoint gets refused."""
    z = model_or_z if isinstance(model_or_z, dict) else {
        n: m.z for n, m in model_or_z.named_modules() if isinstance(m, SVFLinear)}
    meta = {"format": "palora-svf", "checkpoint": getattr(model_or_z, "identity", None) or "",
            "targets": ",".join(sorted({n.rpartition(".")[2] for n in z})), **{k: str(v) for k, v in (metadata or {}).items()}}
    if not meta["checkpoint"]:
        raise PaloraError(f"{path}: the metadata needs the checkpoint identity under 'checkpoint'")
    save_tensors({n: t.float() for n, t in z.items()}, path, meta)

def load_svf(path, identity: str | None = None, model: nn.Module | None = None) -> tuple[dict, dict]:
    """(z: name -> (R,), metadata). With a model, identity defaults to model.identity and each z must have as many
    entries as its weight has singular values: both fail here, before any training."""
    z, meta = read_tensors(path, identity or getattr(model, "identity", None))
    if model is not None:
        linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, SVFLinear))}
        for name, t in z.items():
            R = min(linears[name].out_features, linears[name].in_features) if name in linears else None
            if t.shape != (R,):
                raise PaloraError(f"{path}: z for {name} has shape {tuple(t.shape)}, the model's weight has R = {R}")
    return z, meta


# -----------------------------------------------------------------------------
# the probe: which components the skill moved

def select(scores: dict, fraction=None, k=None, threshold=None, global_fraction=None) -> dict:
    """name -> indices of the top round(fraction · R) (or k) scores of each matrix; or of the scores above one
    threshold for all, or above the quantile that keeps global_fraction of all components (the protected rank
    then adapts to each matrix)."""
    if sum(x is not None for x in (fraction, k, threshold, global_fraction)) != 1:
        raise PaloraError("give exactly one of fraction, k, threshold, global_fraction")
    for label, f in (("fraction", fraction), ("global_fraction", global_fraction)):
        if f is not None and not 0 < f < 1:
            raise PaloraError(f"probe {label} must be in (0, 1), got {f}")
    if global_fraction is not None:  # the threshold is the pooled scores' quantile (ties at it are all kept)
        flat = torch.cat(list(scores.values()))
        threshold = torch.topk(flat, max(1, round(global_fraction * len(flat)))).values[-1].item()
        return {n: torch.nonzero(sc >= threshold).flatten() for n, sc in scores.items()}
    if threshold is not None:
        return {n: torch.nonzero(sc > threshold).flatten() for n, sc in scores.items()}
    out = {}
    for n, sc in scores.items():
        kn = k if k is not None else max(1, round(fraction * len(sc)))
        if not 0 <= kn <= len(sc):
            raise PaloraError(f"probe selects {kn} components of {n}, which has rank {len(sc)}")
        out[n] = torch.topk(sc, kn).indices
    return out

def probe(svds: dict, experts, score="delta", fraction=None, k=None, threshold=None, global_fraction=None) -> dict:
    """name -> S, int64 ascending: indices into the base weight's spectrum (descending s) of the components the
    SVF expert(s) moved most. score "delta" = |m - 1| (default: blind to where a component sits, since the skill
    is spread over the spectrum), "energy" = s ⊙ |m - 1|. Several experts (a list of name -> z): the union."""
    protected = {}
    for z in [experts] if isinstance(experts, dict) else experts:
        for n, t in z.items():
            if n not in svds or t.shape != svds[n][1].shape:
                raise PaloraError(f"expert z for {n}: shape {tuple(t.shape)} does not match the SVD of that weight")
        delta = {n: (multiplier(svds[n][1], t.to(svds[n][1])) - 1).abs() for n, t in z.items()}  # |m - 1|, (R,)
        scores = {n: d * svds[n][1] if score == "energy" else d for n, d in delta.items()}
        for n, S in select(scores, fraction, k, threshold, global_fraction).items():
            protected[n] = torch.cat([protected.get(n, S[:0]), S])
    return {n: torch.unique(S).long() for n, S in protected.items()}  # unique() also sorts

def probe_report(protected: dict, svds: dict) -> list[dict]:
    """A row per matrix: how many components are protected and where they sit (position 0 = largest singular
    value, 1 = smallest; shares in the top, middle and bottom thirds of the spectrum)."""
    rows = []
    for n, S in protected.items():
        R, nan = len(svds[n][1]), float("nan")
        pos = S.double() / max(R - 1, 1)
        thirds = torch.bincount((pos * 3).clamp(max=2).long(), minlength=3).double() / max(len(S), 1)
        rows.append({"name": n, "layer": next((int(p) for p in n.split(".") if p.isdigit()), -1),
                     "matrix": n.rpartition(".")[2], "count": len(S), "rank": R, "fraction": len(S) / R,
                     "mean_pos": pos.mean().item() if len(S) else nan, "median_pos": pos.median().item() if len(S) else nan,
                     "top": thirds[0].item(), "middle": thirds[1].item(), "bottom": thirds[2].item()})
    return rows

def protected_bases(svd_: tuple, S: torch.Tensor):
    """U_S = U[:, S] (out, k), output-side basis; V_S = Vh[S]ᵀ (in, k), input-side basis; both orthonormal."""
    U, _, Vh = svd_
    return U[:, S].contiguous(), Vh[S].T.contiguous()


# -----------------------------------------------------------------------------
# stage two: LoRA whose update cannot reach the protected subspace

def project_out(B: torch.Tensor, U_S) -> torch.Tensor:
    """B - U_S (U_Sᵀ B), output side: (k, out) @ (out, r) -> (k, r); (out, k) @ (k, r) -> (out, r)."""
    return B if U_S is None else B - U_S @ (U_S.T @ B)

def project_in(A: torch.Tensor, V_S) -> torch.Tensor:
    """A - (A V_S) V_Sᵀ, input side: (r, in) @ (in, k) -> (r, k); (r, k) @ (k, in) -> (r, in)."""
    return A if V_S is None else A - (A @ V_S) @ V_S.T

class LoRALinear(nn.Module):
    """y = x Wᵀ + (alpha/r) (x A_pᵀ) B_pᵀ: dW = (alpha/r) B_p A_p = (I - U_S U_Sᵀ) B A (I - V_S V_Sᵀ) · alpha/r.

    W (out, in) frozen; A (r, in), B (out, r) trained; U_S (out, k), V_S (in, k) frozen orthonormal buffers (None =
    unprotected). B_p, A_p are recomputed from A, B at every forward, so U_Sᵀ dW = 0 = dW V_S whatever the optimizer
    does; the dense (out, out) and (in, in) projectors are never formed. `moved` = (A0, B0) when the init took
    (alpha/r) B0 A0 out of W (PiSSA, MiLoRA), kept for the export.
    """

    def __init__(self, weight, A, B, alpha: float, U_S=None, V_S=None, moved=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.scale = A.shape[0], alpha, alpha / A.shape[0]
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.A, self.B = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())
        for name, t in (("U_S", U_S), ("V_S", V_S), ("A0", moved and moved[0]), ("B0", moved and moved[1])):
            self.register_buffer(name, None if t is None else t.detach().to(A).clone())

    def projected(self):
        """(A_p, B_p) in the factors' precision: autocast off, as a bfloat16 projection would leak ~1e-2."""
        with torch.autocast(self.A.device.type, enabled=False):
            return project_in(self.A, self.V_S), project_out(self.B, self.U_S)

    def forward(self, x):
        A, B = self.projected()
        h = F.linear(x, A.to(x.dtype))  # x A_pᵀ: (..., in) @ (in, r) -> (..., r)
        return F.linear(x, self.weight) + self.scale * F.linear(h, B.to(x.dtype))  # (..., r) @ (r, out) -> (..., out)

def delta_weight(layer: LoRALinear) -> torch.Tensor:
    """dW = (alpha/r) B_p A_p: (out, r) @ (r, in) -> (out, in)."""
    A, B = layer.projected()
    return layer.scale * (B @ A)

def leakage(dW: torch.Tensor, U_S=None, V_S=None) -> tuple[float, float]:
    """(||U_Sᵀ dW|| / ||dW||, ||dW V_S|| / ||dW||), Frobenius: the update's share on the protected output (U) and
    input (V) directions; 0 for PALoRA up to rounding (bounds in tests/test_palora.py), measured for the others."""
    norm = dW.norm()
    out = dW[:0] if U_S is None else U_S.T.to(dW) @ dW  # (k, out) @ (out, in) -> (k, in)
    inp = dW[:, :0] if V_S is None else dW @ V_S.to(dW)  # (out, in) @ (in, k) -> (out, k)
    return tuple(0.0 if norm == 0 else (t.norm() / norm).item() for t in (out, inp))


# -----------------------------------------------------------------------------
# methods: one small initialisation per value of `method`

class Target(NamedTuple):
    """What an initialisation may use for one weight: W (out, in), its SVD, the probe's S, an input basis V_act."""
    W: torch.Tensor
    svd: tuple | None
    S: torch.Tensor | None
    V_act: torch.Tensor | None

def lora_factors(t: Target, r: int, generator):
    """A (r, in) ~ U(±1/√in), peft's kaiming_uniform_(a=√5); B (out, r) = 0, so dW = 0 at the start."""
    (out, inp), dtype = t.W.shape, torch.promote_types(t.W.dtype, torch.float32)
    A = torch.empty(r, inp, dtype=dtype).uniform_(-1 / math.sqrt(inp), 1 / math.sqrt(inp), generator=generator)
    return A.to(t.W.device), torch.zeros(out, r, dtype=dtype, device=t.W.device)

def init_lora(t: Target, r, alpha, generator):
    """Plain LoRA: nothing protected."""
    return LoRALinear(t.W, *lora_factors(t, r, generator), alpha)

def init_palora(t: Target, r, alpha, generator):
    """PALoRA: the probe's S protected on both sides."""
    return LoRALinear(t.W, *lora_factors(t, r, generator), alpha, *protected_bases(t.svd, t.S.to(t.svd[0].device)))

def init_topk(t: Target, r, alpha, generator):
    """OPLoRA: as many components as the probe protects, but those of largest singular value of the adapted W."""
    return init_palora(t._replace(S=torch.argsort(t.svd[1].abs(), descending=True)[: len(t.S)]), r, alpha, generator)

def init_palora_act(t: Target, r, alpha, generator):
    """Ours: output side from the probe (U_S), input side from the skill's activations (V_act, activation_bases)."""
    return LoRALinear(t.W, *lora_factors(t, r, generator), alpha, protected_bases(t.svd, t.S)[0], t.V_act)

def init_spectral(t: Target, r, alpha, generator, largest: bool):
    """PiSSA (largest) / MiLoRA (smallest), as peft: A = √(s/scale) Vh[idx] (r, in), B = U[:, idx] √(s/scale)
    (out, r), so scale · B A = U[:, idx] diag(s) Vh[idx]; the frozen residual is W - scale · B A."""
    U, s, Vh = (x.to(t.W.device) for x in t.svd)
    idx = torch.argsort(s.abs(), descending=largest)[:r]
    root = (s[idx].abs() * r / alpha).sqrt()  # an expert's s ⊙ m can be negative: its sign goes into B
    A, B = root[:, None] * Vh[idx], U[:, idx] * (root * s[idx].sign())  # (r, in), (out, r)
    W0 = wide(t.W) - (alpha / r) * (B @ A).to(wide(t.W))  # (out, r) @ (r, in) -> (out, in)
    return LoRALinear(W0.to(t.W.dtype), A, B, alpha, moved=(A, B))

METHODS = {"lora": init_lora, "palora": init_palora, "topk": init_topk, "palora_act": init_palora_act,
           "pissa": partial(init_spectral, largest=True), "milora": partial(init_spectral, largest=False)}
NEEDS = {"svds": ("palora", "topk", "palora_act", "pissa", "milora"), "protected": ("palora", "topk", "palora_act"),
         "input_bases": ("palora_act",)}

def add_lora(model, method: str, r: int, alpha: float, svds=None, protected=None, targets=MLP_TARGETS,
             input_bases=None, seed: int = 0) -> dict[str, LoRALinear]:
    """Replace each target nn.Linear by the LoRALinear METHODS[method] builds; returns name -> layer.

    svds: name -> SVD of the weight being adapted (expert_svds(...) on an SVF expert); protected: the probe's
    name -> S (palora, topk, palora_act); input_bases: name -> V_S (in, k) (palora_act).
    """
    if method not in METHODS:
        raise PaloraError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    layers, generator = find_targets(model, targets), torch.Generator().manual_seed(seed)
    given = {"svds": svds or {}, "protected": protected or {}, "input_bases": input_bases or {}}
    for need, methods in NEEDS.items():
        missing = sorted(set(layers) - set(given[need])) if method in methods else []
        if missing:
            raise PaloraError(f"method {method} needs {need} for {missing[0]} and {len(missing) - 1} more")
    new = {}
    for name, layer in layers.items():
        t = Target(layer.weight.detach(), *(given[k].get(name) for k in ("svds", "protected", "input_bases")))
        new[name] = METHODS[method](t, r, alpha, generator)
        replace(model, name, new[name])
    return new

@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a frozen nn.Linear holding W + dW, summed in float32 (or float64)."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        replace(model, name, frozen_linear((wide(layer.weight) + delta_weight(layer)).to(layer.weight.dtype)))
    return model

def lora_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable tensors, "<weight name>.A" and "<weight name>.B" of every LoRALinear."""
    return {f"{n}.{p}": getattr(m, p) for n, m in model.named_modules() if isinstance(m, LoRALinear) for p in "AB"}

def activation_covariances(model: nn.Module, names, run) -> dict[str, torch.Tensor]:
    """name -> C = Σ xᵀ x (in, in) over the input rows each layer sees while run() does forward passes on the
    skill's examples (padding rows count too: pass unpadded or lightly padded batches)."""
    covs = {}

    def accumulate(name, module, args):
        x = wide(args[0].detach().flatten(0, -2))  # (..., in) -> (N, in)
        covs[name] = covs.get(name, 0) + x.T @ x  # (in, N) @ (N, in) -> (in, in)
    hooks = [model.get_submodule(n).register_forward_pre_hook(partial(accumulate, n)) for n in names]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return covs

def activation_bases(covs: dict, counts: dict) -> dict[str, torch.Tensor]:
    """name -> V_S (in, k): the top-k eigenvectors of C, the input directions the skill uses most, so that
    dW x ≈ 0 on the skill's inputs (k = counts[name], e.g. the probe's count for that weight)."""
    eig = {n: torch.linalg.eigh(C.double())[1].float() for n, C in covs.items()}  # ascending eigenvalues, (in, in)
    return {n: V[:, V.shape[1] - counts[n]:].flip(-1).contiguous() for n, V in eig.items()}


# -----------------------------------------------------------------------------
# export: PEFT adapters, merged HF checkpoints

def export_factors(layer: LoRALinear):
    """(A, B, alpha) of a plain LoRA giving the layer's dW on its original base. PALoRA, top-k: the projections
    folded in (A_p, B_p), the same dW exactly. PiSSA, MiLoRA (peft's subtract_mutated_init): W - W0 = scale B0 A0,
    so dW on W is scale (B A - B0 A0) = scale [B | -B0] [A ; A0], rank 2r with alpha doubled to keep alpha/r."""
    A, B = layer.projected()
    if layer.A0 is None:
        return A, B, layer.alpha
    return torch.cat([A, layer.A0]), torch.cat([B, -layer.B0], dim=1), 2 * layer.alpha  # (2r, in), (out, 2r)

def save_peft(model: nn.Module, out_dir, base_model_name_or_path: str, metadata: dict | None = None):
    """adapter_config.json and adapter_model.safetensors in peft's layout (keys such as
    base_model.model.model.layers.0.mlp.down_proj.lora_A.weight), which peft and vLLM load as they are."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    factors = {n: export_factors(m) for n, m in layers.items()}
    (r, alpha), = {(A.shape[0], a) for A, B, a in factors.values()}  # peft's config has one rank and one alpha
    tensors = {f"base_model.model.{n}.lora_{ab}.weight": t.float() for n, f in factors.items() for ab, t in zip("AB", f)}
    short = sorted({n.rpartition(".")[2] for n in layers})  # short names if they match exactly these layers
    matched = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and n.rpartition(".")[2] in short}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": r, "lora_alpha": alpha, "target_modules": short if matched == set(layers) else sorted(layers),
              "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    meta = {"format": "pt", **({"checkpoint": model.identity} if getattr(model, "identity", None) else {})}
    save_tensors(tensors, Path(out_dir) / "adapter_model.safetensors", {**meta, **{k: str(v) for k, v in (metadata or {}).items()}})
    atomic_write_json(Path(out_dir) / "adapter_config.json", config)

def load_peft(model: nn.Module, adapter_dir) -> dict[str, LoRALinear]:
    """Load a plain peft LoRA adapter onto the model's nn.Linear layers (nothing protected); name -> layer."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for key, want in {"peft_type": "LORA", "fan_in_fan_out": False, "bias": "none", "use_dora": False,
                      "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}.items():
        if (config.get(key) or want) != want:
            raise PaloraError(f"{adapter_dir / 'adapter_config.json'}: {key} = {config[key]!r} is not supported")
    tensors, meta = read_tensors(adapter_dir / "adapter_model.safetensors")
    identity = getattr(model, "identity", None)
    if identity and meta.get("checkpoint", identity) != identity:
        raise PaloraError(f"{adapter_dir}: adapter made for checkpoint {meta['checkpoint']!r}, the model is {identity!r}")
    linears, new = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}, {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        A, B, layer = tensors[key], tensors[key.replace("lora_A", "lora_B")], linears.get(name)
        if layer is None or A.shape != (config["r"], layer.in_features) or B.shape != (layer.out_features, config["r"]):
            raise PaloraError(f"{adapter_dir}: {name} has A {tuple(A.shape)}, B {tuple(B.shape)}: the model does not match")
        new[name] = LoRALinear(layer.weight, A.to(layer.weight.device), B.to(layer.weight.device), config["lora_alpha"])
        replace(model, name, new[name])
    return new

def save_merged_checkpoint(model: nn.Module, tokenizer_folder, out_dir):
    """An HF folder that transformers loads: the SVF expert merged (merge_svf: float32, checked) into
    model.safetensors with exactly the keys of the model's own checkpoint (a tied lm_head is not written twice),
    config.json from model.folder, every other non-weight file from tokenizer_folder."""
    merge_svf(model)
    state, src, keys = model.state_dict(), Path(model.folder), {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            keys.update({k: g.get_slice(k).get_shape() for k in g.keys()})
    for k, shape in keys.items():
        if k not in state or list(state[k].shape) != list(shape):
            raise PaloraError(f"{src}: tensor {k} {shape} has no counterpart of that shape in the model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(tokenizer_folder).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".gguf")):
            shutil.copyfile(f, out_dir / f.name)
    shutil.copyfile(src / "config.json", out_dir / "config.json")
    save_tensors({k: state[k] for k in keys}, out_dir / "model.safetensors", {"format": "pt"})
