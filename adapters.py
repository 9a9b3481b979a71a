"""Everything on disk for a method, and the one place that says what `--method` means.

Files, each safetensors with the checkpoint identity (checkpoints.identity) in its metadata, passed
explicitly: a file made for another checkpoint is refused, naming it.
- the SVD cache: <cache>/<identity>/<weight name>.safetensors, U, s, Vh with checksums;
- an SVF expert: z vectors by weight name (train_svf.py);
- a probe: the int64 indices a run protects in each matrix (inject.py);
- a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that peft and vLLM load
  as is;
- imsm.safetensors (IMSM's LoRA and gate) and smf.safetensors (SMF's memory layers);
- a merged Hugging Face folder, from a model the caller has merged.
The dispatch: RECORDS, one Method record per --method value (METHODS: their names): what attaches
it to a model (the module that trains and answers, and its name -> trainable Parameter), its
optimizer and training step, how its run is saved and loaded, and what it protects. attach,
optimizer, step, save_run and load_run look the record up; inject.py and evaluate.py ask its
fields, never the name, so a new method is its module, its functions here and one entry.
expert_model and run_model: the model a user asks (model.py --svf, --run) or exports (export.py),
built as evaluate.py builds its rows.
"""

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import checkpoints
import imsm
import model as model_lib
import palora
import smf
from palora import PaloraError
from tasks import atomic_save_file, atomic_write_bytes, atomic_write_json
from training import answer_loss, is_main, whole

REPO = Path(__file__).resolve().parent
SVD_CACHE = "cache/svd"  # default of every script's --svd-cache, relative to the repository
PEFT_FILE, IMSM_FILE, SMF_FILE = "adapter_model.safetensors", "imsm.safetensors", "smf.safetensors"


def save_tensors(tensors: dict, path, metadata: dict):
    """safetensors written atomically (a crash never leaves half a file); metadata values as
    strings."""
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
    """palora.svd(W) from `path` if its metadata matches this weight, else computed and written
    there.

    Factors of another weight (identity, name, shape or W's checksum differ) are stale derived
    data, recomputed with a warning; factors failing their own checksum are an error (a disk or
    writer fault).
    """
    want = {
        "checkpoint": identity,
        "name": name,
        "shape": f"{W.shape[0]},{W.shape[1]}",
        "weight_sha256": digest(W),
    }
    if path.exists():
        tensors, meta = read_tensors(path)
        stale = [k for k, v in want.items() if meta.get(k) != v]
        if stale:
            warnings.warn(
                f"{path}: stale SVD cache ({', '.join(stale)} differ); recomputing", stacklevel=2
            )
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
    """name -> (U, s, Vh) on the CPU, cached in cache/<identity>/<name>.safetensors ("": no
    cache)."""
    if not cache:
        return palora.svds(model, targets)
    folder = REPO / cache / identity
    layers = palora.find_targets(model, targets)
    missing = sum(not (folder / f"{n}.safetensors").exists() for n in layers)
    bar = tqdm(total=len(layers), desc="SVD", unit="matrix", leave=None, disable=missing == 0)
    out = {}
    for n, m in layers.items():  # a bar only when some are computed (20-30 s on SmolLM2's 90)
        out[n] = cached_svd(m.weight, folder / f"{n}.safetensors", identity, n)
        bar.update()
    bar.close()
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
            raise PaloraError(
                f"{path}: z for {name} has shape {tuple(t.shape)}, the model's "
                f"weight has R = {linears.get(name)}"
            )
    return z, meta


def save_probe(path, protected: dict, identity: str, metadata: dict):
    save_tensors(protected, path, {"format": "palora-probe", "checkpoint": identity, **metadata})


def load_probe(path, identity: str, ranks: dict) -> tuple[dict, dict]:
    """(name -> int64 indices, metadata), each matrix of `ranks` (name -> R) present, its indices
    1-D integers in [0, R) without repeats; anything else names the file and the matrix."""
    protected, meta = read_tensors(path, identity)
    for name in sorted(set(protected) | set(ranks)):
        S = protected.get(name)
        if name not in ranks or S is None:
            raise PaloraError(f"{path}: {name} is {'missing' if S is None else 'not a target'}")
        ok = S.dtype == torch.int64 and S.dim() == 1 and len(S.unique()) == len(S)
        if not ok or (len(S) and not 0 <= S.min() <= S.max() < ranks[name]):
            raise PaloraError(
                f"{path}: {name} does not hold distinct int64 indices in [0, {ranks[name]})"
            )
    return protected, meta


def expected_probe(meta: dict, target_svds: dict, identity: str, method: str):
    """(the probe's S, the set `method` protects) recomputed from what a probe file's metadata
    records: the SVF expert files, the selection rule, the score and the seed (inject.make_base's
    steps)."""
    experts = [load_svf(p, identity)[0] for p in json.loads(meta["svf"])]
    names = list(target_svds)
    probes = [{n: z[n] for n in names if n in z} for z in experts]
    S = palora.probe(target_svds, probes, tuple(json.loads(meta["selection"])), meta["score"])
    expert = palora.expert_svds(target_svds, experts[0])
    if method == "palora_act":  # its output side, recorded since --output-side (before: probe)
        method = meta.get("output_side", "probe")
    return S, palora.same_count(method, S, expert, int(meta["seed"]))


# -----------------------------------------------------------------------------
# PEFT adapters and merged checkpoints

PEFT_FIXED = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "inference_mode": True,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


def save_peft(model: nn.Module, out, base: str, identity: str, metadata: dict):
    """adapter_config.json and adapter_model.safetensors in peft's layout (keys such as
    base_model.model.model.layers.0.mlp.down_proj.lora_A.weight); the projections folded in.
    Under torchrun every rank calls it (FSDP2 gathers each layer whole), rank 0 alone writes."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, palora.LoRALinear)}
    factors = {}
    for n, m in layers.items():
        with whole(m):  # FSDP2: this layer's A, B, U_S, V_S whole on every rank, one at a time
            factors[n] = palora.export_factors(m)
    if not is_main():
        return
    ((r, alpha),) = {
        (A.shape[0], a) for A, B, a in factors.values()
    }  # peft has one rank, one alpha
    tensors = {}
    for n, (A, B, _) in factors.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = A.float()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B.float()
    kinds = sorted({palora.matrix_kind(n) for n in layers})  # short names if they match exactly
    matched = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, palora.LoRALinear)) and palora.matrix_kind(n) in kinds
    }
    config = {
        **PEFT_FIXED,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": kinds if matched == set(layers) else sorted(layers),
    }
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
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise PaloraError(f"{config_path}: unreadable ({e})") from None
    for key in (
        "peft_type",
        "fan_in_fan_out",
        "bias",
        "use_dora",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
    ):
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
        A, B = A.to(W.device), B.to(W.device)
        new[name] = palora.LoRALinear(W, A, B, config["lora_alpha"], like=type(layer))
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
    if out.is_symlink():  # its files would be written wherever it points
        raise PaloraError(f"{out}: a symlink; the merged model is written to a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(checkpoint).iterdir():
        weights = (".safetensors", ".safetensors.index.json", ".gguf")
        if f.is_file() and not f.name.endswith(weights):  # a symlink planted there is replaced
            atomic_write_bytes(out / f.name, f.read_bytes())
    save_tensors({k: state[k] for k in keys}, out / "model.safetensors", {"format": "pt"})


# -----------------------------------------------------------------------------
# IMSM and SMF runs: their trained tensors with the settings that rebuild the modules


def copy_into(params: dict, tensors: dict, path):
    """Load a file's tensors into name -> Parameter: the same names and shapes, else the file is
    named."""
    odd = sorted(params.keys() ^ tensors.keys())
    if odd:
        raise PaloraError(f"{path}: tensor {odd[0]} is in only one of the file and the model")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                shapes = f"{tuple(tensors[name].shape)}, the model's is {tuple(p.shape)}"
                raise PaloraError(f"{path}: {name} has shape {shapes}")
            p.copy_(tensors[name])


def save_imsm(siamese: imsm.Siamese, path, identity: str, metadata: dict):
    """LoRA A/B and gate A/B, float32, with the targets, r, alpha and gate rank."""
    meta = {
        "format": "imsm",
        "checkpoint": identity,
        "targets": ",".join(siamese.targets),
        "r": siamese.r,
        "alpha": siamese.alpha,
        "gate_rank": siamese.gate.A.shape[0],
        **metadata,
    }
    save_tensors({n: p.float() for n, p in imsm.trainable(siamese).items()}, path, meta)


def load_imsm(model, path, identity: str) -> imsm.Siamese:
    """The Siamese of a saved run on `model` (changed in place)."""
    tensors, meta = read_tensors(path, identity)
    if meta.get("format") != "imsm":
        raise PaloraError(f"{path}: not an IMSM run (format {meta.get('format')!r})")
    targets = tuple(meta["targets"].split(","))
    r, alpha, gate_rank = int(meta["r"]), float(meta["alpha"]), int(meta["gate_rank"])
    siamese = imsm.Siamese(model, targets, r, alpha, gate_rank)
    copy_into(imsm.trainable(siamese), tensors, path)
    return siamese


def memory_tensors(model) -> dict:
    """ "<memory name>.<W_q|K|V|W_o>" -> Parameter of every SMF memory layer."""
    mems = smf.memories(model)
    return {f"{n}.{p}": t for n, m in mems.items() for p, t in m.named_parameters()}


def save_smf(model, path, identity: str, metadata: dict):
    """Every memory tensor, with the blocks, slots, top-k and value width."""
    mems = smf.memories(model)
    first = next(iter(mems.values()))
    meta = {
        "format": "smf",
        "checkpoint": identity,
        "layers": ",".join(n.split(".")[2] for n in mems),  # model.layers.<i>.mlp.memory
        "n_slots": first.V.shape[0],
        "k": first.k,
        "value_dim": first.V.shape[1],
        **metadata,
    }
    save_tensors(memory_tensors(model), path, meta)


def load_smf(model, path, identity: str) -> dict:
    """The memory layers of a saved run, added to `model`: name -> smf.MemoryLayer."""
    tensors, meta = read_tensors(path, identity)
    if meta.get("format") != "smf":
        raise PaloraError(f"{path}: not an SMF run (format {meta.get('format')!r})")
    layers = [int(i) for i in meta["layers"].split(",")]
    sizes = int(meta["n_slots"]), int(meta["k"])
    mems = smf.add_memory(model, layers, *sizes, value_dim=int(meta["value_dim"]))
    copy_into(memory_tensors(model), tensors, path)
    return mems


# -----------------------------------------------------------------------------
# the dispatch: what --method means


@dataclass
class Memory:
    """SMF's settings (inject.py's --smf-* flags) and its background corpus: unpadded token id lists
    (the skill's and known examples) that set the keys and that slots are ranked against."""

    slots: int = smf.SLOTS
    top_k: int = smf.TOP_K
    top_t: int = smf.TOP_T
    score: str = "tfidf"
    corpus: list = field(default_factory=list)
    background: dict = field(default_factory=dict)  # name -> smf.Access, filled by attach

    def __post_init__(self):  # a bad size fails here, before any model is loaded
        smf.check_sizes(self.slots, self.top_k)
        if self.top_t < 1 or self.score not in ("tfidf", "kl"):
            raise smf.SMFError(
                f"SMF top-T must be >= 1 and the score tfidf or kl, got "
                f"{self.top_t}, {self.score!r}"
            )


# One record per method: what attaches it, trains it, saves and loads it, and what it protects.
# Each script asks the record, never the name: a new method is its module, its small functions
# here (one signature per role, so unused arguments are accepted), and one entry in RECORDS.


def attach_lora(method: str, model, r, alpha, seed, svds, protected, input_bases, memory):
    """The LoRA family: palora.add_lora's layers on the targets svds names; the model trains."""
    return model, palora.add_lora(model, method, r, alpha, svds, protected, input_bases, seed)


def attach_imsm(model, r, alpha, seed, svds, protected, input_bases, memory):
    """IMSM's Siamese around the model, LoRA on the kinds of matrix svds names; the gate's rank is
    r: 5 D r parameters."""
    kinds = tuple(sorted({palora.matrix_kind(n) for n in svds}))
    siamese = imsm.Siamese(model, kinds, r, alpha, gate_rank=r, seed=seed)
    return siamese, imsm.trainable(siamese)


def attach_smf(model, r, alpha, seed, svds, protected, input_bases, memory):
    """SMF's memory beside the MLPs of smf.default_layers, keys and background accesses from
    memory.corpus."""
    if memory is None or not memory.corpus:
        raise PaloraError("smf needs a background corpus (adapters.Memory.corpus)")
    device = next(model.parameters()).device
    seqs = [torch.tensor([ids], device=device) for ids in memory.corpus]
    run = lambda: [model(x) for x in seqs]  # one row per example: no padding
    smf.add_memory(model, None, memory.slots, memory.top_k, keys_from=run, seed=seed)
    with torch.no_grad():
        memory.background = smf.accesses(model, run)
    return model, smf.trainable(model)


def adam(params: dict, lr: float, gate_lr: float) -> torch.optim.Optimizer:
    """The LoRA family: Adam on A and B."""
    return torch.optim.Adam(list(params.values()), lr=lr)


def adam_imsm(params: dict, lr: float, gate_lr: float) -> torch.optim.Optimizer:
    """IMSM's gate at its own stated gate_lr."""
    return torch.optim.Adam(imsm.param_groups(params, lr, gate_lr))


def sparse_adam(params: dict, lr: float, gate_lr: float) -> torch.optim.Optimizer:
    """SMF: SparseAdam moves exactly the value rows in the step's sparse gradient (AdamW's momentum
    would move the rows chosen earlier: a known flaw of the public reimplementations)."""
    return torch.optim.SparseAdam(list(params.values()), lr=lr)


def descend(opt, loss: torch.Tensor) -> torch.Tensor:
    """Backward and an optimizer step on loss; returns it detached."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def step_lora(module, opt, tokens, labels, mask, memory, total):
    """total: training.answer_loss's (torchrun's global batch)."""
    return descend(opt, answer_loss(module, tokens, labels, mask, total, pack=True))


def step_imsm(module, opt, tokens, labels, mask, memory, total):
    """IMSM's own loss (its prompt means over the prompt only); one process."""
    return descend(opt, imsm.loss(module, tokens, labels, mask))


def step_smf(module, opt, tokens, labels, mask, memory, total):
    """The top-T slots per layer against the background, then a step on those value rows alone."""
    args = memory.background, opt, memory.top_t, memory.score
    return torch.tensor(smf.train_step(module, tokens, labels, mask, *args)[0])


def save_lora(module, out: Path, identity: str, base: str, meta: dict):
    """A PEFT adapter; every rank calls it (FSDP2 gathers the layers), rank 0 alone writes."""
    save_peft(module, out, base, identity, meta)


def save_imsm_run(module, out: Path, identity: str, base: str, meta: dict):
    """imsm.safetensors; one process, or rank 0 under ddp."""
    if is_main():
        save_imsm(module, Path(out) / IMSM_FILE, identity, {"base": base, **meta})


def save_smf_run(module, out: Path, identity: str, base: str, meta: dict):
    """smf.safetensors; one process, or rank 0 under ddp."""
    if is_main():
        save_smf(module, Path(out) / SMF_FILE, identity, {"base": base, **meta})


def load_lora(model, run: Path, identity: str) -> tuple[nn.Module, dict]:
    """The adapter merged into the model; dW per weight in float64, (out, in)."""
    layers, _ = load_peft(model, run, identity)
    added = sum(m.A.numel() + m.B.numel() for m in layers.values())
    dW = {n: m.scale * (m.B.double() @ m.A.double()) for n, m in layers.items()}  # (out, in)
    return palora.merge_lora(model), {"added": added, "dW": dW}


def load_imsm_run(model, run: Path, identity: str) -> tuple[nn.Module, dict]:
    """Two streams and a gate: nothing to merge, no dW."""
    siamese = load_imsm(model, Path(run) / IMSM_FILE, identity)
    return siamese, {"added": imsm.added_parameters(siamese), "dW": {}}


def load_smf_run(model, run: Path, identity: str) -> tuple[nn.Module, dict]:
    """The memory layers added to the model; no dW; the slots training touched."""
    load_smf(model, Path(run) / SMF_FILE, identity)
    return model, {"dW": {}, "added": smf.added_parameters(model), "touched": smf.touched(model)}


@dataclass(frozen=True)
class Method:
    """What one --method value means to every script.

    attach(model, r, alpha, seed, svds, protected, input_bases, memory) -> (the module that trains
    and answers, name -> trainable Parameter); optimizer(params, lr, gate_lr); step(module, opt,
    tokens, labels, mask, memory, total) -> the batch's loss; save(module, out, identity, base,
    metadata) writes the run's trained part into `file` (under torchrun every rank calls it);
    load(model, run, identity) -> (the model to evaluate, info: added, dW, touched).
    protects: the sides the probe's S is kept off, 0 output (U_S), 1 input (V_S) (evaluate.py
    --verify checks them). input_bases: the input side from the skill's activations (palora_act),
    built by inject.py. background: a corpus of the skill's examples (smf). fsdp_params: the
    trained tensors read again after FSDP2's fully_shard (None: FSDP2 unsupported). A weight update
    (a LoRA layer to merge) is what a stream (inject.py --after) continues from.
    """

    attach: Callable
    optimizer: Callable
    step: Callable
    save: Callable
    load: Callable
    file: str
    protects: tuple = ()
    input_bases: bool = False
    background: bool = False
    weight_update: bool = False
    fsdp_params: Callable | None = None


def lora(name: str, protects: tuple = (), input_bases: bool = False) -> Method:
    """A method of palora.METHODS: LoRALinear layers, Adam, saved as a PEFT adapter, merged on
    load; FSDP2 shards them and a stream continues from them."""
    return Method(
        attach=partial(attach_lora, name),
        optimizer=adam,
        step=step_lora,
        save=save_lora,
        load=load_lora,
        file=PEFT_FILE,
        protects=protects,
        input_bases=input_bases,
        weight_update=True,
        fsdp_params=palora.lora_params,
    )


RECORDS = {
    "palora": lora("palora", protects=(0, 1)),  # the probe's S, both sides
    "topk": lora("topk", protects=(0, 1)),  # as many of the largest (OPLoRA)
    "random": lora("random", protects=(0, 1)),  # as many at random (the control)
    "lora": lora("lora"),
    "pissa": lora("pissa"),
    "milora": lora("milora"),
    "palora_act": lora("palora_act", protects=(0,), input_bases=True),  # input side: V_act
    "imsm": Method(attach_imsm, adam_imsm, step_imsm, save_imsm_run, load_imsm_run, IMSM_FILE),
    "smf": Method(
        attach_smf, sparse_adam, step_smf, save_smf_run, load_smf_run, SMF_FILE, background=True
    ),
}
METHODS = tuple(RECORDS)  # the values of --method, in table order


def record(method: str) -> Method:
    """The record of a --method value; an unknown one names the choices."""
    if method not in RECORDS:
        raise PaloraError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return RECORDS[method]


def attach(
    model,
    method: str,
    r: int,
    alpha: float,
    seed: int,
    svds: dict,
    protected=None,
    input_bases=None,
    memory: Memory | None = None,
) -> tuple[nn.Module, dict]:
    """Put `method` on the targets that svds names -> (the module that trains and answers: the
    model itself, or imsm's Siamese around it; name -> trainable Parameter)."""
    args = (r, alpha, seed, svds, protected, input_bases, memory)
    return record(method).attach(model, *args)


def optimizer(method: str, params: dict, lr: float, gate_lr: float) -> torch.optim.Optimizer:
    """The method's optimizer: Adam on the LoRA factors, IMSM's gate at gate_lr, SMF's
    SparseAdam."""
    return record(method).optimizer(params, lr, gate_lr)


def step(method: str, module, opt, tokens, labels, mask, memory=None, total=None):
    """One training step on a batch (forward, backward, optimizer step) -> its loss."""
    return record(method).step(module, opt, tokens, labels, mask, memory, total)


def save_run(module, method: str, out: Path, identity: str, base: str, metadata: dict):
    """The trained part of a run, in its method's format (the LoRA family: a PEFT adapter). Under
    torchrun every rank calls it (FSDP2 gathers the LoRA family's layers), rank 0 alone writes."""
    meta = {"method": method, **metadata}
    return record(method).save(module, out, identity, base, meta)


def run_config(run: Path) -> dict:
    """A run's resolved config.json; a missing or unreadable one names the file."""
    path = Path(run) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (is {run} an inject.py run?)") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise PaloraError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise PaloraError(f"{path}: not an inject.py run's config (not a JSON object)")
    kinds = {"method": str, "ckpt": str, "svf": list, "targets": str}  # what the scripts read
    for key, kind in kinds.items():
        if not isinstance(config.get(key), kind):
            raise PaloraError(f"{path}: not an inject.py run's config (no {kind.__name__} {key!r})")
    if not config["svf"] or not all(isinstance(p, str) for p in config["svf"]):
        raise PaloraError(f"{path}: not an inject.py run's config ('svf' names no expert file)")
    return config


def run_file(run: Path) -> Path:
    """The file holding a run's trained part, whatever its method."""
    for name in dict.fromkeys(m.file for m in RECORDS.values()):
        if (Path(run) / name).is_file():
            return Path(run) / name
    raise FileNotFoundError(
        f"{run}: no {PEFT_FILE}, {IMSM_FILE} or {SMF_FILE} (is it a finished inject.py run?)"
    )


def run_method(run: Path) -> str:
    """A run's method as its trained file says (trusted over config.json, which is easy to edit)."""
    path = run_file(run)
    method = read_tensors(path)[1].get("method")
    if method not in METHODS:
        raise PaloraError(f"{path}: no known method in its metadata")
    return method


def load_run(model, run: Path, identity: str) -> tuple[nn.Module, dict]:
    """(the model to evaluate, info): the run's trained part loaded onto `model` (the merged
    expert), then merged where the method allows. info: method, added parameters, dW per weight
    (float64; empty where the method is no weight update: leakage is undefined), slots touched
    (SMF). A stream's round (inject.py --after) has the rounds before it merged in first."""
    method = run_method(run)
    config = Path(run) / "config.json"  # absent beside a bare adapter: no chain
    after = config.is_file() and run_config(run).get("after")
    if after:
        model, _ = load_run(model, Path(after), identity)
    model, info = record(method).load(model, run, identity)
    return model, {"method": method, **info}


# -----------------------------------------------------------------------------
# the model a user asks or exports: an expert, or a run, built as evaluate.py builds its rows


def expert_model(svf, ckpt, device=None, dtype=None, svd_cache=SVD_CACHE):
    """(model, tokenizer, identity): the checkpoint with the SVF expert file `svf` merged in from
    the base weights' SVDs (inject.make_base's merge); svf "" or None: the checkpoint alone."""
    folder = checkpoints.resolve(ckpt)
    identity = checkpoints.identity(folder)
    if svf:  # another checkpoint's expert is refused before the model loads
        read_tensors(svf, identity)
    model, tokenizer = model_lib.load(folder, device, dtype)
    if svf:
        z, _ = load_svf(svf, identity, model)
        kinds = tuple(sorted({palora.matrix_kind(n) for n in z}))
        palora.merge_expert(model, svds(model, kinds, identity, svd_cache), z)
    return model, tokenizer, identity


def check_run(run: Path, ckpt: str = "") -> Path:
    """A run inject.py finished (summary.json is written last, after the trained file), made for
    the checkpoint `ckpt` (default: the run's own) -> that checkpoint's folder. Checked before any
    model is loaded."""
    if not (Path(run) / "summary.json").is_file():
        raise FileNotFoundError(
            f"{Path(run) / 'summary.json'}: missing (is {run} a finished inject.py run?)"
        )
    folder = checkpoints.resolve(ckpt or run_config(run)["ckpt"])
    read_tensors(run_file(run), checkpoints.identity(folder))  # another checkpoint's: named
    return folder


def run_model(run, ckpt="", device=None, dtype=None, svd_cache=SVD_CACHE):
    """(the model a finished inject.py run answers with, tokenizer, load_run's info): the run's
    checkpoint (or `ckpt`, which the run must have been made for) with the run's first expert
    merged, then load_run, which merges a stream's earlier rounds first."""
    folder = check_run(run, ckpt)
    svf = run_config(run)["svf"][0]
    model, tokenizer, identity = expert_model(svf, folder, device, dtype, svd_cache)
    model, info = load_run(model, Path(run), identity)
    return model, tokenizer, info
