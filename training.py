"""What train_svf.py and inject.py share: the run folder (a lock, no silent overwrite, resume only
of the same run), device and dtype choice, a data order and a sampling generator that are pure
functions of (seed, step), the answer-only loss, and training state saved as safetensors (never
pickle), so that an interrupted run resumes bit-for-bit.

There is no Trainer here on purpose: each script keeps its own loop, top to bottom (STYLE.md).
"""

import contextlib
import dataclasses
import errno
import fcntl
import gc
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import tasks
from checkpoints import read_json
from cli import ConfigError
from model import ModelArgs, is_fsdp, layer_shapes
from tasks import IGNORE_INDEX, DataError, atomic_save_file, atomic_write_json, atomic_write_text

# -----------------------------------------------------------------------------
# configuration: cli.parse_config builds the parser; the resolved config is saved beside the outputs


def parse_targets(text: str) -> tuple[str, ...]:
    """'gate_proj, up_proj,' -> ('gate_proj', 'up_proj'): in order, blanks and repeats dropped."""
    targets = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not targets:
        raise ConfigError(f"--targets: no target name in {text!r}")
    return targets


def option(default, help: str, **metadata):
    """A config field: its default, --help text and cli metadata (choices; bounds gt ge lt le)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def save_config(cfg, path):
    """The resolved configuration, as JSON beside the outputs: a run reproduces from its folder."""
    atomic_write_json(path, dataclasses.asdict(cfg))


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N -> the device; anything else, or a GPU this machine lacks, is a
    ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists twenty device types we do not run on
        raise ConfigError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: palora runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def checkpoint_args(folder: Path) -> ModelArgs:
    """The checkpoint's sizes from its config.json alone: what a flag is checked against before
    the weights load."""
    path = Path(folder) / "config.json"
    return ModelArgs.from_hf_config(read_json(path), source=path)


def check_context(folder: Path, tokens: dict):
    """--flag -> a token count: each must fit the checkpoint's context (its config.json, read
    before the model loads), so that `--max-new-tokens 100000` is refused, never allocated as a
    KV cache of that length per row."""
    context = checkpoint_args(folder).max_position_embeddings
    for flag, n in tokens.items():
        if n > context:
            raise ConfigError(f"{flag}: {n} tokens do not fit the model's context ({context})")


def check_targets(folder: Path, targets: tuple):
    """Every --targets name a linear layer of the checkpoint (config.json's, before the weights
    load), in palora.find_targets's words."""
    shapes = layer_shapes(checkpoint_args(folder))
    valid = sorted(
        {name.rpartition(".")[2] for name, s in shapes.items() if len(s) == 2} | {"lm_head"}
    )
    for t in targets:
        if t not in valid:
            raise ConfigError(
                f"unknown target {t!r}: the model's linear layers are {', '.join(valid)}"
            )


def check_rank(folder: Path, rank: int, targets: tuple):
    """--rank at most min(out, in) of every target weight (config.json's sizes, before the weights
    load): factors wider than their matrix add memory (A is r x in, B out x r), never a direction.
    The names are checked first (check_targets)."""
    check_targets(folder, targets)
    per_layer = layer_shapes(checkpoint_args(folder))
    shapes = {name.rpartition(".")[2]: shape for name, shape in per_layer.items()}
    for t in targets:
        shape = shapes.get(t, ())
        if len(shape) == 2 and rank > min(shape):
            out, in_ = shape
            raise ConfigError(
                f"--rank: {rank} is above the rank of {t} ({out} x {in_}): at most {min(shape)}"
            )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bfloat16 on CUDA (frozen weights bf16, trainable vectors fp32), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 autocast on CUDA when the frozen weights are bfloat16; nothing otherwise."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# the run folder: one run at a time, never overwritten by accident, resumed only by its own run

LOCKS = {}  # resolved folder -> its open .lock file, locked until this process exits


def lock(out: Path):
    """An exclusive flock on out/.lock; the kernel drops it when the process dies: no stale lock.
    A symlink at .lock is refused: opening it would create or lock a file outside the folder."""
    if out.resolve() in LOCKS:  # this process holds it already (a second run in the same process)
        return
    path = out / ".lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:  # ELOOP: O_NOFOLLOW met a symlink
            raise
        raise ConfigError(f"{path}: a symlink; a run's lock is a plain file in --out") from None
    f = os.fdopen(fd, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{out}: another run holds this folder") from None
    LOCKS[out.resolve()] = f


def read_saved_config(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise ConfigError(f"{path}: unreadable run config ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: a run config is a JSON object")
    return saved


def config_changes(saved: dict, now: dict, ignore) -> list[str]:
    """Every field that differs, as '--lr 0.005 -> 0.001'; fields in `ignore` may differ."""
    names = sorted((saved.keys() | now.keys()) - set(ignore))
    flags = {n: "--" + n.replace("_", "-") for n in names}
    changed = [n for n in names if saved.get(n) != now.get(n)]
    return [f"{flags[n]} {saved.get(n)} -> {now.get(n)}" for n in changed]


def state_metadata(path: Path) -> dict:
    """The string metadata of a state file; a truncated or corrupt file is one error naming it."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        int(meta["step"])
    except Exception as e:  # safetensors' SafetensorError, a missing or non-integer step
        raise ConfigError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None
    return meta


def check_resume(out: Path, now: dict, ignore):
    """Resume only the run that made the folder: same config.json, a state saved under it."""
    state = out / "state.safetensors"
    if not state.exists():
        raise ConfigError(f"{state}: nothing to resume from (start again with --overwrite)")
    saved = read_saved_config(out / "config.json")
    changes = config_changes(saved, now, ignore)
    if changes:
        raise ConfigError(f"{out}: --resume with other settings: {', '.join(changes)}")
    meta = state_metadata(state)
    changes = config_changes(json.loads(meta.get("config", "{}")) or saved, saved, ignore)
    if changes:  # a state left by an older run in this folder: never continue it
        raise ConfigError(f"{state}: saved by another run than config.json: {', '.join(changes)}")


def empty(out: Path):
    """Remove everything in a run folder but its lock; the state first, so that no half-emptied
    folder holds a state without its config."""
    (out / "state.safetensors").unlink(missing_ok=True)
    for p in out.iterdir():
        if p.name == ".lock":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# the fields a resumed run may change: where and how it runs, not what it computes
RUN_ONLY = ("resume", "overwrite", "device", "out", "parallel")
# what every run config open_run writes holds, whatever the script
RUN_KEYS = {"out", "resume", "overwrite"}


def is_run_config(saved, cfg) -> bool:
    """config.json written by open_run for a run of cfg's script: the run keys, and no key that is
    not one of cfg's fields (an option added since may be missing). An HF checkpoint's config.json,
    another script's run or a user's file is not one."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    return isinstance(saved, dict) and RUN_KEYS <= saved.keys() <= fields


def own_tmps(out: Path) -> list[Path]:
    """The files a killed atomic write of this run left at the folder's top level."""
    return [p for p in out.iterdir() if tasks.TMP_NAME.fullmatch(p.name) and p.is_file()]


def refuse_inputs(out: Path, inputs):
    """--out may not be, nor hold, the checkpoint, the expert or a data file this run reads."""
    real = out.resolve()
    for name in inputs:
        path = Path(name)
        if not name or not path.exists():  # an unset path flag, or "none"
            continue
        if path.resolve() == real or real in path.resolve().parents:
            raise ConfigError(f"--out: {out} holds {path}, which this run reads")


def check_fresh(out: Path, cfg, overwrite: bool):
    """A fresh run in `out`: refuse it unless the folder is empty, or holds only a run config of
    this script (a run killed before it trained), or --overwrite and it is a run folder of this
    script. Reads only: a refused folder is left as it was."""
    skip = {".lock", "config.json", *(p.name for p in own_tmps(out))}
    held = sorted(p.name for p in out.iterdir() if p.name not in skip)
    config = out / "config.json"
    if config.exists() or config.is_symlink():
        if not is_run_config(read_saved_config(config), cfg):
            raise ConfigError(
                f"{config}: not a run config of this script; this folder is not its run "
                f"folder (pick another --out)"
            )
    if held and not overwrite:
        raise ConfigError(
            f"{out}: not empty ({', '.join(held[:3])}); pass --resume to continue "
            f"the run in it or --overwrite to start it again"
        )
    if held and not config.exists():
        raise ConfigError(
            f"{out}: holds no config.json, so it is not a run folder; "
            f"--overwrite empties run folders only"
        )


def accept(out: Path, cfg, resume: bool, overwrite: bool, ignore):
    """Refuse `out` as this run's folder (ConfigError) or return; reads only."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise ConfigError(f"--out: {out} is not a folder")
    if resume:
        check_resume(out, dataclasses.asdict(cfg), ignore)
    elif out.is_dir():
        check_fresh(out, cfg, overwrite)


def open_run(out: Path, cfg, resume: bool, overwrite: bool, ignore=RUN_ONLY, inputs=()) -> Path:
    """Make `out` this process's run folder and return it.

    First the folder is accepted or refused, before anything in it is written or removed (a
    refused folder that did not exist is not created). Fresh run: the folder must be empty (a lone
    config.json of this script, a run killed before it trained, counts as empty), else --overwrite
    empties it, but only a run folder of this script (its config.json says so), so that neither
    `--out ~` nor a checkpoint folder is ever emptied. Resume: the folder's config.json and the
    config stored in its state must equal `cfg` but for the fields in `ignore`. Never a folder that
    is or holds one of `inputs` (the checkpoint, the expert, the data files).

    Then out/.lock is locked (ConfigError if another process holds it), the checks are made again
    under the lock, the orphan tmp files of killed atomic writes at its top level are removed, and
    a fresh run writes config.json, before any state.
    """
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    refuse_inputs(out, inputs)
    accept(out, cfg, resume, overwrite, ignore)
    out.mkdir(parents=True, exist_ok=True)
    lock(out)
    accept(out, cfg, resume, overwrite, ignore)  # what another process did before we locked
    for tmp in own_tmps(out):  # only a killed write leaves one; the lock says none is running
        tmp.unlink()
    if resume:
        return out
    if any(p.name not in (".lock", "config.json") for p in out.iterdir()):
        empty(out)
    atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
    return out


# -----------------------------------------------------------------------------
# data order, sampling and loss


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples in batch `step`: a fresh permutation per epoch, seeded by (seed,
    epoch). Being a pure function of the step, the data order needs no saved state: a resumed run
    sees exactly the batches the uninterrupted run would have seen.
    """
    per_epoch = max(1, n_examples // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=g)
    return order[i * batch_size : (i + 1) * batch_size].tolist()


def lr_factor(step: int, steps: int, warmup: float, schedule: str) -> float:
    """The learning rate's multiplier at 0-based `step` of the `steps` planned: 'cosine' rises
    linearly over the first `warmup` share of them, then falls along a half cosine to 0.1 at the
    last; 'constant' is 1 throughout. A pure function of the step, like batch_indices: a resumed
    run follows the same schedule with no saved state."""
    if schedule == "constant":
        return 1.0
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = (step - n_warm) / max(1, steps - n_warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, device, rank: int = 0) -> torch.Generator:
    """The random stream of step `step` on `device`, a pure function of (seed, step) like
    batch_indices: sampling resumes exactly on CUDA as on the CPU, with no RNG state saved.
    rank: under torchrun each rank samples its own questions from its own stream."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step + 2**40 + rank * 2**32)


def shared_columns(tokens, attention_mask, keep) -> int:
    """How many first columns of a batch of 2+ rows hold the same real token in every row and
    predict no answer token (a chat template's system turn), at least one token of each row left:
    those a prefix cache can hold."""
    if tokens.shape[0] < 2:
        return 0
    same = (tokens == tokens[:1]).all(0) & attention_mask.bool().all(0) & ~keep.any(0)  # (T,)
    shortest = int(attention_mask.sum(1).min())
    return max(0, min(int(same.long().cumprod(0).sum()), shortest - 1))


def length_groups(lengths) -> list:
    """Row indices in at most two groups by length, split where the padded area (rows x longest
    row, summed) is least: a batch of short facts and long replayed examples pads less."""
    order = lengths.argsort()
    L = lengths[order].tolist()
    B = len(L)
    area = [k * L[k - 1] + (B - k) * L[-1] for k in range(1, B + 1)]  # first group: k rows
    k = max(k for k in range(1, B + 1) if area[k - 1] == min(area))  # a tie: one group
    return [order[:k], order[k:]] if k < B else [order]


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to float32 for the softmax; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def answer_loss(model, tokens, labels, attention_mask, total=None, pack=False):
    """Mean next-token cross-entropy over the answer tokens only (labels = IGNORE_INDEX on the
    prompt and padding). tokens, labels, attention_mask: (B, T), right-padded (mask None: no
    padding). Logits at t predict token t+1. total: divide the summed loss by this instead of the
    batch's answer-token count (under torchrun, shard_total's: the global batch's mean, whatever
    the process count).
    pack=True: less padding and less repeated work, the same loss to float rounding. The columns
    every row opens with (a chat template's system turn) run once, in one row (prefix_cache), and
    the rows run in two length groups (length_groups), each cut to its longest row. Not under
    FSDP2, where every rank must make the same forwards, nor on a batch padded on the left."""
    target = labels.roll(-1, dims=1)  # target[:, t] = labels[:, t + 1]: the token t predicts
    target[:, -1] = IGNORE_INDEX  # the last position predicts nothing
    keep = target != IGNORE_INDEX  # (B, T): the N positions that predict an answer token
    count = keep.sum() if total is None else total
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    if not pack or is_fsdp(model) or not right_padded:
        logits = model(tokens, attention_mask=attention_mask, keep=keep)  # (N, V)
        return F.cross_entropy(at_least_float32(logits), target[keep], reduction="sum") / count
    core = getattr(model, "module", model)  # DDP keeps the Transformer in .module
    n = shared_columns(tokens, mask, keep)
    prefix = core.prefix_cache(tokens[:1, :n]) if n else None
    lengths = mask.sum(1)  # right padding: row b's tokens are columns 0..lengths[b]-1
    loss = 0
    for rows in length_groups(lengths):
        T = int(lengths[rows].max())
        cache = core.new_cache(len(rows), T, prefix) if n else None
        cols = slice(n, T)
        group_keep = keep[rows, cols]  # (b, T - n)
        logits = model(tokens[rows, cols], mask[rows, :T], cache, n, keep=group_keep)
        loss = loss + F.cross_entropy(
            at_least_float32(logits), target[rows, cols][group_keep], reduction="sum"
        )
    return loss / count


def check_finite(loss: torch.Tensor, step: int, params: dict | None = None):
    """The loss and (given) every parameter finite, else stop: a non-finite state is never saved.
    step: the 0-based loop index; reported 1-based, as metrics.jsonl and checkpoints count steps."""
    what = f"loss is {loss.item()}" if not math.isfinite(loss.item()) else None
    bad = [n for n, p in (params or {}).items() if not torch.isfinite(p).all()]
    if bad:
        what = what or f"{bad[0]} is not finite ({len(bad)} parameters)"
    if what:
        raise FloatingPointError(f"step {step + 1}: {what}; stopping, the last good state is kept")


# -----------------------------------------------------------------------------
# torchrun: data parallel over processes, as nanoGPT's train.py (environment, main process)
#
#     torchrun --standalone --nproc_per_node 2 train_svf.py ...   (any script, unchanged)
#
# The GLOBAL batch (--batch-size) is the same whatever the process count W: batch_indices picks it,
# each rank takes its slice (shard) and divides its summed loss by N / W, N the global batch's
# answer tokens (shard_total); DDP averages gradients over W ranks, so every rank steps with the
# gradient one process would have. No seed offset: every rank draws the same initialisation, and
# sampling takes a per-rank stream (step_generator's rank). Rank 0 alone writes files; every rank
# holds the whole trainable state (DDP), so the state rank 0 saves resumes under any W.
#
# --parallel fsdp (FSDP2, wrap(model, "fsdp")): each rank holds a shard of every parameter and every
# forward all-gathers them, a collective, so every rank must run as many forwards. Evaluation then
# answers every item on every rank (no shard, no gather) and model.generate stops when all ranks'
# rows are done. Exports and the state are gathered whole on every rank (full, whole), rank 0
# writes them; a state loads into the shards (placed), so it resumes under any W and either mode.


def setup_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group (gloo on the CPU, nccl on CUDA, each rank on its
    cuda:LOCAL_RANK) and return this rank's device. Without torchrun (no WORLD_SIZE): `device`."""
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return rank() == 0


def barrier():
    if world() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block, then the others do: rank 0 computes and writes a cache (the SVD
    factors) that the others read, so each SVD is computed once. (A rank that fails ends the
    run: torchrun stops the others, so none waits forever at the barrier.)"""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(items: list) -> list:
    """This rank's contiguous slice of a global batch: rank r of W takes [r n/W, (r + 1) n/W)."""
    n, W, r = len(items), world(), rank()
    if n < W:
        raise ConfigError(f"a batch of {n} does not split over {W} processes (--batch-size >= {W})")
    return items[r * n // W : (r + 1) * n // W]


def all_sum(x: float) -> float:
    """Σ of x over the ranks (float64; on the GPU under nccl, which reduces no CPU tensor)."""
    if world() == 1:
        return x
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def shard_total(labels: torch.Tensor) -> float | None:
    """answer_loss's divisor for this rank's labels (B, T): N / W, N = the global batch's answer
    tokens. DDP and FSDP average gradients over the W ranks, so the step is that of the global
    batch's mean over its N tokens. None without torchrun: the batch's own mean."""
    if world() == 1:
        return None
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return all_sum(n) / world()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (the sharded evaluation's scores)."""
    if world() == 1:
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def answer_all(model, tokenizer, questions, max_new_tokens, batch_size, how, desc="answering"):
    """Greedy answers (tasks.answer) to every question, in order, on every rank: the held-out
    evaluation's and the recall check's. Under torchrun ("ddp") each rank answers every W-th
    question on the unwrapped model and the answers are gathered; under "fsdp" every rank answers
    them all (each forward is a collective), nothing to gather."""
    if how == "fsdp" or world() == 1:
        mine = list(range(len(questions)))
    else:
        mine = list(range(rank(), len(questions), world()))
    answers = []
    if mine:
        answers = tasks.answer(
            unwrap(model),
            tokenizer,
            [questions[i] for i in mine],
            max_new_tokens,
            batch_size,
            desc=desc,
            quiet=not is_main(),
        )
    if how == "fsdp":
        return answers
    return [a for _, a in sorted(gather(list(zip(mine, answers))))]


def wrap(model, how: str = "ddp"):
    """The model to train with, after surgery (SVF or LoRA layers in place, trainable parameters
    chosen). Without torchrun: `model`. "ddp": DistributedDataParallel; the frozen parameters (W,
    the factors U, s, Vh, the bases U_S, V_S) are synced once at wrapping, never reduced. "fsdp":
    FSDP2, fully_shard per block then the root (in place: returns `model`); it shards every
    parameter, frozen ones included, so memory per rank falls with the rank count; it replaces the
    parameters by sharded ones: build the optimizer on those read after wrapping."""
    if world() == 1:
        return model
    if how == "ddp":
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, ids, broadcast_buffers=False)
    if how != "fsdp":
        raise ConfigError(f"unknown wrapping {how!r}: ddp or fsdp")
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    # FSDP2 allocates each unit's buffers for the whole parameters at its first gather and keeps
    # them; made inside generate's inference_mode (an evaluation before any training step), they
    # could not be written outside it: allocate them here, one unit at a time, outside it
    for unit in [*model.model.layers, model]:
        unit.unshard()
        unit.reshard()
    return model


def sharded(t) -> bool:
    """t is an FSDP2 shard (a DTensor). They exist under torchrun only: the import (~1 s) too."""
    if world() == 1:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (full_tensor is a collective: every rank calls it, in
    the same order); any other tensor as it is."""
    return t.full_tensor().detach() if sharded(t) else t


def placed(saved: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole saved tensor laid out as p: this rank's shard of it when p is an FSDP2 shard (every
    rank holds the whole saved tensor: nothing is sent), else saved on p's device."""
    saved = saved.to(p.device)
    if not sharded(p):
        return saved
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(saved, p.device_mesh, p.placements, src_data_rank=None)


@contextlib.contextmanager
def whole(module):
    """Inside the block, module's own FSDP2-sharded parameters (not its children's) are whole
    tensors; the shards are put back after. A collective: every rank enters. An export gathers one
    layer at a time, so it needs no more memory than a forward. Without FSDP2: nothing happens."""
    shards = {n: p for n, p in module.named_parameters(recurse=False) if sharded(p)}
    for n, p in shards.items():
        setattr(module, n, nn.Parameter(full(p), requires_grad=False))
    try:
        yield module
    finally:
        for n, p in shards.items():
            setattr(module, n, p)


def unwrap(model):
    """The Transformer inside a DDP wrapper (evaluation and export need no gradient sync)."""
    return getattr(model, "module", model)


def teardown():
    """Leave torchrun's process group (at the end of a script's run). Objects in reference cycles
    that hold the group (a DDP wrapper) were freed at interpreter exit, after it, and aborted the
    process now and then ("terminate called without an active exception": 6 of 48 launches of
    test_fsdp2_gives_ddp_adapter's driver); collected first, 0 of 40; it came back once in a
    full test run (2026-12-01, rank 1 of an fsdp train_svf.py), so the ranks now also leave
    together, after a barrier (called on the success path only: a failed rank never gets here)."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# training state: parameters, Adam(W) moments and RNG, as one safetensors file written atomically


def save_state(path, params: dict, optimizer, step: int, extra: dict | None = None, config=None):
    """params: name -> Parameter (the trainable ones). The optimizer's per-parameter state is stored
    under `<kind>/<name>`, so the file is self-describing and loads without pickle. config (a
    dataclass) is stored too: open_run refuses to resume a state saved under another config.
    Non-finite parameters raise: the last saved state stays the last finite one.
    Every rank calls it: FSDP2 shards are gathered whole (a collective), then rank 0 alone writes;
    the file is the same under any process count and --parallel, and resumes under any."""
    tensors = {f"param/{n}": full(p).detach().cpu().contiguous() for n, p in params.items()}
    bad = [n for n in params if not torch.isfinite(tensors[f"param/{n}"]).all()]
    if bad:
        raise FloatingPointError(f"{path}: not saved, {bad[0]} is not finite")
    by_id = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                value = full(torch.as_tensor(value)).detach().cpu().contiguous()
                tensors[f"{key}/{by_id[id(p)]}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    if not is_main():
        return
    meta = {"step": str(step), "extra": json.dumps(extra or {})}
    if config is not None:
        meta["config"] = json.dumps(dataclasses.asdict(config))
    atomic_save_file(tensors, path, metadata=meta)


def load_state(path, params: dict, optimizer) -> tuple[int, dict]:
    """Restore what save_state wrote into `params` and `optimizer`; returns (step, extra). Under
    FSDP2 each rank reads the whole file and keeps its shard of every tensor (placed)."""
    meta = state_metadata(Path(path))
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a file cut after its header
        raise ConfigError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise ConfigError(f"{path}: lacks parameters {missing[:3]} (a checkpoint of another run?)")
    with torch.no_grad():
        for n, p in params.items():
            saved = tensors[f"param/{n}"]
            if saved.shape != p.shape:
                shapes = f"{tuple(saved.shape)}, expected {tuple(p.shape)}"
                raise ConfigError(f"{path}: {n} has shape {shapes}")
            p.copy_(placed(saved, p))
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            state = {}
            for key, value in tensors.items():
                kind, _, tensor_name = key.partition("/")
                if tensor_name == name and kind not in ("param", "rng"):
                    state[kind] = placed(value, p) if kind != "step" else value
            if not state.get("step", torch.zeros(())).is_floating_point():
                state["step"] = int(state["step"])  # SparseAdam's int: beta ** tensor rounds apart
            if state:
                optimizer.state[p] = state
    torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"]), json.loads(meta["extra"])


def restart_metrics(path: Path, start: int) -> list[dict]:
    """Keep the metrics.jsonl rows of steps up to `start` (the resume point; 0: a fresh run keeps
    none): the rows after it are about to be redone. Returns the kept rows; a torn or malformed line
    is a DataError naming the file and line."""
    lines = path.read_text().splitlines() if start and path.exists() else []
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            row["step"] + 0  # noqa: B018 (a row without an integer step is malformed too)
        except (ValueError, TypeError, KeyError) as e:
            problem = f"malformed metrics row, torn by a killed write? ({e})"
            raise DataError(f"{path}:{n}: {problem}") from None
        rows.append(row)
    kept = [r for r in rows if r["step"] <= start]
    if not is_main():  # under torchrun rank 0 rewrites the file; the others only read it
        return kept
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return kept
