"""What train_svf.py and inject.py share: a CLI made from a config dataclass, device and dtype choice,
a data order that is a pure function of (seed, step), the answer-only loss, and training state saved as
safetensors (never pickle) so that an interrupted run resumes bit-for-bit.

There is no Trainer here on purpose: each script keeps its own loop, top to bottom (STYLE.md).
"""
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tasks import atomic_save_file, atomic_write_json, atomic_write_text

# -----------------------------------------------------------------------------
# configuration: cli.parse_config builds the parser; the resolved config is saved beside the outputs


def save_config(cfg, path):
    """The resolved configuration, as JSON beside the outputs, so a run can be reproduced from its folder."""
    atomic_write_json(path, dataclasses.asdict(cfg))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bfloat16 on CUDA (mixed precision: frozen weights bf16, trainable vectors fp32), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# -----------------------------------------------------------------------------
# data order and loss


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples in batch `step`: a fresh permutation per epoch, seeded by (seed, epoch).

    Being a pure function of the step, the data order needs no saved state: a resumed run sees exactly the
    batches the uninterrupted run would have seen.
    """
    per_epoch = max(1, n_examples // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=g)
    return order[i * batch_size:(i + 1) * batch_size].tolist()


def answer_loss(model, tokens, labels, attention_mask):
    """Mean next-token cross-entropy over the answer tokens only (labels = -100 on the prompt and padding).

    tokens, labels, attention_mask: (B, T). The logits at position t predict token t+1.
    """
    logits = model(tokens, attention_mask=attention_mask)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def check_finite(loss: torch.Tensor, step: int):
    """step: the 0-based loop index; reported 1-based, as metrics.jsonl and the checkpoints count steps."""
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"step {step + 1}: loss is {loss.item()}; stopping, the last good checkpoint is kept")


# -----------------------------------------------------------------------------
# training state: parameters, Adam(W) moments and RNG, as one safetensors file written atomically


def save_state(path, params: dict, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None):
    """params: name -> Parameter (the trainable ones). The optimizer's per-parameter state is stored under
    `<kind>/<name>` so the file is self-describing and loads without pickle."""
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    by_id = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{key}/{by_id[id(p)]}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"step": str(step), "extra": json.dumps(extra or {})}
    atomic_save_file(tensors, path, metadata=meta)


def load_state(path, params: dict, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore what save_state wrote into `params` and `optimizer`; returns (step, extra)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks parameters {missing[:3]} (a checkpoint of another run?)")
    with torch.no_grad():
        for n, p in params.items():
            if tensors[f"param/{n}"].shape != p.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(tensors[f'param/{n}'].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[f"param/{n}"])
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            state = {}
            for key, value in tensors.items():
                kind, _, tensor_name = key.partition("/")
                if tensor_name == name and kind not in ("param", "rng"):
                    state[kind] = value.to(p.device) if kind != "step" else value
            if state:
                optimizer.state[p] = state
    torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"]), json.loads(meta["extra"])


def restart_metrics(path: Path, start: int):
    """Keep the metrics.jsonl rows of steps up to `start` (the resume point; 0: a fresh run keeps none): the rows
    after it are about to be redone."""
    rows = path.read_text().splitlines() if start and path.exists() else []
    atomic_write_text(path, "".join(r + "\n" for r in rows if json.loads(r)["step"] <= start))


def parse_targets(text: str) -> tuple[str, ...]:
    """"gate_proj, up_proj" -> ("gate_proj", "up_proj"); an empty list is an error."""
    from cli import ConfigError

    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise ConfigError(f"--targets {text!r}: no target name in it")
    return targets


def open_run(out: Path, cfg, resume: bool, overwrite: bool, ignore=("resume", "overwrite", "device", "out")):
    """Stand-in until the run-folder guard lands: create out, refuse a non-empty one without --resume."""
    from cli import ConfigError

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"{out}: not empty; pass --resume to continue it or --overwrite")
    if resume and not (out / "state.safetensors").exists():
        raise ConfigError(f"{out / 'state.safetensors'}: nothing to resume from")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    return out
