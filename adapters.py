"""Everything on disk for a method, and the one place that says what `--method` means.

Files, each safetensors with the checkpoint identity (checkpoints.identity) in its metadata, passed
explicitly: a file made for another checkpoint is refused, naming it.
- the SVD cache: <cache>/<identity>/<weight name>.safetensors, U, s, Vh with checksums;
- an SVF expert: z vectors by weight name (train_svf.py);
- a probe: the int64 indices a run protects in each matrix (inject.py);
- a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that peft and vLLM load as is;
- a merged Hugging Face folder, from a model the caller has merged.
The dispatch: METHODS, attach (put a method on a model, get name -> trainable Parameter), save_run and
load_run. One if/elif on the method; a new method is a module plus one branch in each.
"""

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

import palora
from palora import PaloraError
from tasks import atomic_save_file, atomic_write_json

REPO = Path(__file__).resolve().parent
SVD_CACHE = "cache/svd"  # default of every script's --svd-cache, relative to the repository
METHODS = tuple(palora.METHODS)  # the values of --method, in table order


def save_tensors(tensors: dict, path, metadata: dict):
    """safetensors written atomically (a crash never leaves half a file); metadata values as strings."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # unshared
    atomic_save_file(tensors, path, {k: str(v) for k, v in metadata.items()})


def read_tensors(path, identity: str | None = None) -> tuple[dict, dict]:
    """(tensors, metadata); a file made for another checkpoint than `identity` is refused."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PaloraError(f"{path}: unreadable safetensors file ({e})") from None
    if identity is not None and meta.get("checkpoint") != identity:
        made = meta.get("checkpoint")
        raise PaloraError(f"{path}: made for checkpoint {made!r}, the model is {identity!r}")
    return tensors, meta


def digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' raw bytes in their stored dtype (through uint8: numpy has no bf16)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# -----------------------------------------------------------------------------
# the SVD cache


def cached_svd(W: torch.Tensor, path: Path, identity: str, name: str):
    """palora.svd(W) from `path` if its metadata matches this weight, else computed and written there.

    Factors of another weight (identity, name, shape or W's checksum differ) are stale derived data,
    recomputed with a warning; factors failing their own checksum are an error (a disk or writer fault).
    """
    want = {"checkpoint": identity, "name": name, "shape": f"{W.shape[0]},{W.shape[1]}",
            "weight_sha256": digest(W)}
    if path.exists():
        tensors, meta = read_tensors(path)
        stale = [k for k, v in want.items() if meta.get(k) != v]
        if stale:
            warnings.warn(f"{path}: stale SVD cache ({', '.join(stale)} differ); recomputing",
                          stacklevel=2)
        elif set(tensors) != {"U", "s", "Vh"}:
            raise PaloraError(f"{path}: corrupted SVD cache (not U, s, Vh); delete the file")
        elif digest(tensors["U"], tensors["s"], tensors["Vh"]) != meta.get("factors_sha256"):
            raise PaloraError(f"{path}: corrupted SVD cache (checksum); delete the file")
        else:
            return tensors["U"], tensors["s"], tensors["Vh"]
    U, s, Vh = (t.cpu() for t in palora.svd(W))
    save_tensors({"U": U, "s": s, "Vh": Vh}, path, {**want, "factors_sha256": digest(U, s, Vh)})
    return U, s, Vh


def svds(model: nn.Module, targets, identity: str, cache=SVD_CACHE) -> dict:
    """name -> (U, s, Vh) on the CPU, cached in cache/<identity>/<name>.safetensors ("": no cache)."""
    if not cache:
        return palora.svds(model, targets)
    folder = REPO / cache / identity
    out = {}
    for n, m in palora.find_targets(model, targets).items():
        out[n] = cached_svd(m.weight, folder / f"{n}.safetensors", identity, n)
    return out


# -----------------------------------------------------------------------------
# SVF experts and probes


def save_svf(path, z: dict, identity: str, metadata: dict | None = None):
    """z vectors keyed by weight name; metadata records the checkpoint identity and the targets."""
    kinds = ",".join(sorted({palora.matrix_kind(n) for n in z}))
    meta = {"format": "palora-svf", "checkpoint": identity, "targets": kinds, **(metadata or {})}
    save_tensors({n: t.float() for n, t in z.items()}, path, meta)


def load_svf(path, identity: str, model: nn.Module | None = None) -> tuple[dict, dict]:
    """(z: name -> (R,), metadata). With a model, each z must have as many entries as its weight has
    singular values: a mismatch fails here, before any training."""
    z, meta = read_tensors(path, identity)
    if model is None:
        return z, meta
    linears = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, palora.SVFLinear)):
            linears[n] = min(m.out_features, m.in_features)
    for name, t in z.items():
        if t.shape != (linears.get(name),):
            raise PaloraError(f"{path}: z for {name} has shape {tuple(t.shape)}, the model's weight "
                              f"has R = {linears.get(name)}")
    return z, meta


def save_probe(path, protected: dict, identity: str, metadata: dict):
    save_tensors(protected, path, {"format": "palora-probe", "checkpoint": identity, **metadata})


def load_probe(path, identity: str, ranks: dict) -> tuple[dict, dict]:
    """(name -> int64 indices, metadata), each matrix of `ranks` (name -> R) present, its indices 1-D
    integers in [0, R) without repeats; anything else names the file and the matrix."""
    protected, meta = read_tensors(path, identity)
    for name in sorted(set(protected) | set(ranks)):
        S = protected.get(name)
        if name not in ranks or S is None:
            raise PaloraError(f"{path}: {name} is {'missing' if S is None else 'not a target'}")
        ok = S.dtype == torch.int64 and S.dim() == 1 and len(S.unique()) == len(S)
        if not ok or (len(S) and not 0 <= S.min() <= S.max() < ranks[name]):
            raise PaloraError(f"{path}: {name} does not hold distinct int64 indices in [0, "
                              f"{ranks[name]})")
    return protected, meta


def expected_probe(meta: dict, target_svds: dict, identity: str, method: str):
    """(the probe's S, the set `method` protects) recomputed from what a probe file's metadata records:
    the SVF expert files, the selection rule, the score and the seed (inject.make_base's steps)."""
    experts = [load_svf(p, identity)[0] for p in json.loads(meta["svf"])]
    names = list(target_svds)
    probes = [{n: z[n] for n in names if n in z} for z in experts]
    S = palora.probe(target_svds, probes, tuple(json.loads(meta["selection"])), meta["score"])
    expert = palora.expert_svds(target_svds, experts[0])
    return S, palora.same_count(method, S, expert, int(meta["seed"]))


# -----------------------------------------------------------------------------
# PEFT adapters and merged checkpoints

PEFT_FIXED = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
              "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "inference_mode": True,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {}, "alpha_pattern": {}}


def save_peft(model: nn.Module, out, base: str, identity: str, metadata: dict):
    """adapter_config.json and adapter_model.safetensors in peft's layout (keys such as
    base_model.model.model.layers.0.mlp.down_proj.lora_A.weight); the projections folded in."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, palora.LoRALinear)}
    factors = {n: palora.export_factors(m) for n, m in layers.items()}
    (r, alpha), = {(A.shape[0], a) for A, B, a in factors.values()}  # peft has one rank, one alpha
    tensors = {}
    for n, (A, B, _) in factors.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = A.float()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B.float()
    kinds = sorted({palora.matrix_kind(n) for n in layers})  # short names if they match exactly
    matched = {n for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, palora.LoRALinear)) and palora.matrix_kind(n) in kinds}
    config = {**PEFT_FIXED, "base_model_name_or_path": base, "r": r, "lora_alpha": alpha,
              "target_modules": kinds if matched == set(layers) else sorted(layers)}
    meta = {"format": "pt", "checkpoint": identity, **metadata}
    save_tensors(tensors, Path(out) / "adapter_model.safetensors", meta)
    atomic_write_json(Path(out) / "adapter_config.json", config)


def load_peft(model: nn.Module, folder, identity: str) -> tuple[dict, dict]:
    """A plain peft LoRA adapter onto the model's nn.Linear layers (nothing protected):
    (name -> LoRALinear, the adapter file's metadata)."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise PaloraError(f"{config_path}: unreadable ({e})") from None
    for key in ("peft_type", "fan_in_fan_out", "bias", "use_dora", "use_rslora", "rank_pattern",
                "alpha_pattern", "modules_to_save"):
        if (config.get(key) or PEFT_FIXED[key]) != PEFT_FIXED[key]:
            raise PaloraError(f"{config_path}: {key} = {config[key]!r} is not supported")
    tensors, meta = read_tensors(folder / "adapter_model.safetensors", identity)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    r, new = config.get("r"), {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        A, B = tensors[key], tensors.get(key.replace("lora_A", "lora_B"))
        layer = linears.get(name)
        fits = layer is not None and B is not None and A.shape == (r, layer.in_features)
        if not fits or B.shape != (layer.out_features, r):
            raise PaloraError(f"{folder}: {name}: the adapter does not fit the model")
        W = layer.weight
        new[name] = palora.LoRALinear(W, A.to(W.device), B.to(W.device), config["lora_alpha"])
        palora.replace(model, name, new[name])
    if not new:
        raise PaloraError(f"{folder}: the adapter holds no LoRA layer")
    return new, meta


def save_merged(model: nn.Module, checkpoint: Path, out: Path):
    """An HF folder that transformers loads: the model's weights (merge it first: no SVFLinear or
    LoRALinear may remain) under exactly the keys of `checkpoint`'s own files (a tied lm_head is not
    written twice), its config.json and every non-weight file (tokenizer, generation config)."""
    if any(isinstance(m, (palora.SVFLinear, palora.LoRALinear)) for m in model.modules()):
        raise PaloraError("save_merged: merge the model first (palora.merge_svf / merge_lora)")
    state, keys = model.state_dict(), {}
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            keys.update({k: g.get_slice(k).get_shape() for k in g.keys()})
    for k, shape in keys.items():
        if k not in state or list(state[k].shape) != list(shape):
            raise PaloraError(f"{checkpoint}: tensor {k} {shape} has no counterpart in the model")
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(checkpoint).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".gguf")):
            shutil.copyfile(f, out / f.name)
    save_tensors({k: state[k] for k in keys}, out / "model.safetensors", {"format": "pt"})


# -----------------------------------------------------------------------------
# the dispatch: what --method means


def attach(model, method: str, r: int, alpha: float, seed: int, svds: dict, protected=None,
           input_bases=None) -> dict[str, nn.Parameter]:
    """Put `method` on the targets that svds names; returns name -> trainable Parameter."""
    if method in palora.METHODS:
        return palora.add_lora(model, method, r, alpha, svds, protected, input_bases, seed)
    raise PaloraError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def save_run(model, method: str, out: Path, identity: str, base: str, metadata: dict):
    """The trained part of a run, in its method's format (the LoRA family: a PEFT adapter)."""
    if method in palora.METHODS:
        return save_peft(model, out, base, identity, {"method": method, **metadata})
    raise PaloraError(f"unknown method {method!r}")


def run_config(run: Path) -> dict:
    """A run's resolved config.json; a missing or unreadable one names the file."""
    path = Path(run) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (is {run} an inject.py run?)") from None
    except (OSError, ValueError) as e:
        raise PaloraError(f"{path}: unreadable ({e})") from None


def run_method(run: Path) -> str:
    """A run's method as its trained file says (trusted over config.json, which is easy to edit)."""
    method = read_tensors(Path(run) / "adapter_model.safetensors")[1].get("method")
    if method not in METHODS:
        raise PaloraError(f"{run}/adapter_model.safetensors: no known method in its metadata")
    return method


def load_run(model, run: Path, identity: str) -> tuple[nn.Module, dict]:
    """(the model to evaluate, info): the run's trained part loaded onto `model` (the merged expert),
    then merged where the method allows. info: method, added parameters, dW per weight (float64)."""
    method = run_method(run)
    if method in palora.METHODS:
        layers, _ = load_peft(model, run, identity)
        added = sum(m.A.numel() + m.B.numel() for m in layers.values())
        dW = {n: m.scale * (m.B.double() @ m.A.double()) for n, m in layers.items()}  # (out, in)
        return palora.merge_lora(model), {"method": method, "added": added, "dW": dW}
    raise PaloraError(f"unknown method {method!r}")
