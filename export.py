"""Take an inject.py run's model where models are run: a merged Hugging Face folder (transformers,
vLLM), a GGUF file (llama.cpp, Ollama, LM Studio), or the run's PEFT adapter with its base.

    python export.py runs/inject-palora_act-facts-s0 facts-hf --to hf     # one merged folder
    python export.py runs/inject-palora_act-facts-s0 facts.gguf --to gguf  # float16 (--dtype f32)
    python export.py runs/inject-palora_act-facts-s0 facts-peft --to peft  # base/ + adapter/

The model is the one evaluate.py scores and `model.py --run` answers with (adapters.run_model):
the checkpoint, the run's first SVF expert merged in, a stream's earlier rounds merged
(inject.py --after), then the run's LoRA update merged (hf, gguf) or kept as the adapter on that
base (peft). IMSM (two streams mixed by a gate, per token) and SMF (memory layers beside the MLPs)
are no weight update of a Llama: no transformers, vLLM or llama.cpp model computes them, so their
runs are refused.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), written with the `gguf` package
as llama.cpp's convert_hf_to_gguf.py writes a Llama: q_proj and k_proj rows in llama.cpp's
interleaved rotary order (convert_gguf.permute_rope_rows, per query head for q and per KV head for
k: the inverse of what convert_gguf undoes on the way in); 1-D norm weights float32 in a float16
file, as llama.cpp keeps them; a tied lm_head not stored (llama.cpp reuses token_embd). The
tokenizer is written only where llama.cpp has it: byte-level BPE with SmolLM2's pre-tokenizer
(every digit alone, then GPT-2's split: llama.cpp's `smollm`), the tokens padded to the model's
vocabulary with unused entries as llama.cpp's converter pads them; the chat template from
tokenizer_config.json. convert_gguf.py reads the file back (tests/test_export.py).

OUT must not exist (hf and peft: an empty folder will do) and must not be a symlink. Everything is
written under a temporary name beside OUT and renamed at the end, so OUT is complete or absent, and
a file or folder of the user's is never written into or replaced.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import adapters
import checkpoints
import cli
from convert_gguf import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, permute_rope_rows
from model import ModelArgs

REFUSED = {  # method -> why no exported model computes it
    "imsm": "IMSM mixes a frozen and a LoRA stream with a gate, per token: no single set of Llama "
    "weights computes it, so transformers, vLLM and llama.cpp cannot run it",
    "smf": "SMF adds memory layers beside the MLPs, which no Llama architecture in transformers, "
    "vLLM or llama.cpp has",
}
SMOLLM_PRE = [  # tokenizer.json's pre_tokenizer for llama.cpp's `smollm` (convert_gguf's reader)
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
]
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType


def parse_args(argv=None):
    parser = cli.Parser(
        description="Export an inject.py run's model: merged HF folder, GGUF file or PEFT adapter.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", help="a finished inject.py run folder")
    parser.add_argument("out", help="the folder (hf, peft) or file (gguf) to write; must not exist")
    parser.add_argument("--to", required=True, choices=["hf", "gguf", "peft"])
    parser.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="gguf's weights")
    parser.add_argument("--ckpt", default="", help="the checkpoint (default: the run's own)")
    parser.add_argument("--svd-cache", default=adapters.SVD_CACHE, help="cached SVD factors")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# checks, then writing under a temporary name beside OUT


def check_out(out: Path, to: str):
    """OUT new (or, for a folder, empty) and not a symlink: else a ConfigError naming it."""
    if out.is_symlink():
        raise cli.ConfigError(
            f"{out}: a symlink; export writes a new file or folder, not through one"
        )
    if to == "gguf" and out.exists():
        raise cli.ConfigError(f"{out}: exists; export never replaces a file (pick another name)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise cli.ConfigError(f"{out}: not an empty folder; export writes a new or empty one")


def check_run(run: Path, ckpt: str) -> Path:
    """A finished run, made for the checkpoint, of a method an exported model computes -> the
    checkpoint's folder."""
    folder = adapters.check_run(run, ckpt)
    method = adapters.run_method(run)
    if method in REFUSED:
        raise cli.ConfigError(f"{run}: an {method} run cannot be exported: {REFUSED[method]}")
    return folder


@contextmanager
def staged_folder(out: Path):
    """A temporary folder beside `out`, renamed to `out` when the block ends without error. The
    rename replaces nothing but an empty folder: a folder filled meanwhile is an error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes it private; a model is not a secret
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(tmp, out)
    except OSError as e:
        raise cli.ConfigError(f"{out}: could not put the export there ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left only by a failure


@contextmanager
def staged_file(out: Path):
    """A temporary file name beside `out`, hard-linked to `out` when the block ends without error:
    a link fails where `out` exists, so no file is ever replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.link(tmp, out)
    except FileExistsError:
        raise cli.ConfigError(f"{out}: exists; export never replaces a file") from None
    finally:
        tmp.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# the three targets


def export_hf(run: Path, out: Path, args) -> str:
    """The run's model merged, as an HF folder (adapters.save_merged: the checkpoint's own keys,
    config and tokenizer files) -> the lines that load it."""
    model, _, _ = adapters.run_model(run, args.ckpt, "cpu", torch.float32, args.svd_cache)
    folder = checkpoints.resolve(args.ckpt or adapters.run_config(run)["ckpt"])
    with staged_folder(out) as tmp:
        adapters.save_merged(model, folder, tmp)
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out.resolve())!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(out.resolve())!r})\n"
    )


def base_model(run: Path, args):
    """The model the run's adapter applies to: its expert merged, a stream's earlier rounds merged
    (load_run of the run it continued) -> (model, checkpoint folder)."""
    config = adapters.run_config(run)
    ckpt = args.ckpt or config["ckpt"]
    model, _, identity = adapters.expert_model(
        config["svf"][0], ckpt, "cpu", torch.float32, args.svd_cache
    )
    if config.get("after"):
        model, _ = adapters.load_run(model, Path(config["after"]), identity)
    return model, checkpoints.resolve(ckpt)


def export_peft(run: Path, out: Path, args) -> str:
    """OUT/base (the adapter's base, merged: an HF folder) and OUT/adapter (the run's adapter, its
    base_model_name_or_path set to OUT/base) -> the transformers + peft lines that load them."""
    model, folder = base_model(run, args)
    base, adapter = out.resolve() / "base", out.resolve() / "adapter"
    config = json.loads((run / "adapter_config.json").read_text())
    with staged_folder(out) as tmp:
        adapters.save_merged(model, folder, tmp / "base")
        (tmp / "adapter").mkdir()
        shutil.copyfile(run / adapters.PEFT_FILE, tmp / "adapter" / adapters.PEFT_FILE)
        config["base_model_name_or_path"] = str(base)
        text = json.dumps(config, indent=2) + "\n"
        (tmp / "adapter" / "adapter_config.json").write_text(text)
    return (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(base)!r})\n"
        f"model = PeftModel.from_pretrained(base, {str(adapter)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(base)!r})\n"
    )


def export_gguf(run: Path, out: Path, args) -> str:
    """The run's model merged, as one GGUF file (write_gguf) -> how llama.cpp and Ollama run it."""
    folder = checkpoints.resolve(args.ckpt or adapters.run_config(run)["ckpt"])
    config = checkpoints.read_json(folder / "config.json")
    gguf_supported(config, folder)  # before the model is built
    vocab = gguf_vocab(folder, config)
    model, _, _ = adapters.run_model(run, args.ckpt, "cpu", torch.float32, args.svd_cache)
    with staged_file(out) as tmp:
        write_gguf(tmp, model.state_dict(), config, vocab, args.dtype, out.stem)
    return f"llama-cli -m {out}          # or an Ollama Modelfile: FROM {out.resolve()}\n"


# -----------------------------------------------------------------------------
# GGUF: what llama.cpp needs, from config.json, tokenizer.json and tokenizer_config.json


def gguf_supported(config: dict, folder: Path):
    """Only what llama.cpp's llama architecture computes as model.py does, and convert_gguf reads
    back: no rope scaling (llama.cpp would want a rope_freqs tensor), no sliding window, head_dim =
    hidden_size / heads."""
    args = ModelArgs.from_hf_config(config, folder / "config.json")
    why = None
    if config["architectures"][0] != "LlamaForCausalLM" or args.sliding_window:
        why = f"architecture {config['architectures'][0]} (only LlamaForCausalLM)"
    elif args.rope_scaling:
        why = "llama3 rope scaling (llama.cpp would need a rope_freqs tensor)"
    elif args.head_dim * args.num_attention_heads != args.hidden_size:
        why = "head_dim != hidden_size / num_attention_heads"
    if why:
        raise cli.ConfigError(f"{folder / 'config.json'}: no GGUF export for {why}")


def gguf_vocab(folder: Path, config: dict) -> dict:
    """tokenizer.json's BPE as llama.cpp's `tokenizer.ggml.*` lists: tokens (byte-to-unicode
    spelling, as GGUF stores them), their types, merges, plus the special ids and the chat
    template."""
    tok = checkpoints.read_json(folder / "tokenizer.json")
    pre = tok.get("pre_tokenizer") or {}
    given = pre.get("pretokenizers", [])
    steps = [{k: p.get(k) for k in want} for p, want in zip(given, SMOLLM_PRE)]
    smollm = pre.get("type") == "Sequence" and len(given) == 2 and steps == SMOLLM_PRE
    if tok["model"].get("type") != "BPE" or not smollm:
        raise cli.ConfigError(
            f"{folder / 'tokenizer.json'}: no GGUF export for this tokenizer (only byte-level BPE "
            f"with SmolLM2's digit split, llama.cpp's `smollm`)"
        )
    V = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(V)]  # llama.cpp's converter's name for unused rows
    types = [TOKEN_UNUSED] * V
    for text, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = text, TOKEN_NORMAL
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added["special"] else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    settings = checkpoints.read_json(folder / "tokenizer_config.json", default={})
    if not settings.get("chat_template"):
        raise cli.ConfigError(f"{folder / 'tokenizer_config.json'}: no chat_template to export")
    ids = {tokens[i]: i for i in range(V)}
    special = {}
    for key in ("bos", "eos", "pad", "unk"):
        value = settings.get(f"{key}_token")  # a string, or {"content": ...}
        special[key] = ids.get(value["content"] if isinstance(value, dict) else value)
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "special": special,
        "add_bos": bool(settings.get("add_bos_token", False)),
        "chat_template": settings["chat_template"],
    }


def gguf_tensors(state: dict, config: dict, dtype: str):
    """(GGUF name, array) for every weight: HF (out, in) arrays, which the gguf package stores with
    the dims reversed as GGUF wants; q/k rows permuted; 2-D weights in `dtype`, 1-D float32."""
    hf_names = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
    layer_names = {v: k for k, v in GGUF_LAYER_NAMES.items()}
    for name, t in state.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd when there is no output.weight
        w = t.detach().float().cpu().numpy()
        if name.endswith("q_proj.weight"):
            w = permute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = permute_rope_rows(w, config["num_key_value_heads"] or config["num_attention_heads"])
        if w.ndim == 2 and dtype == "f16":
            w = w.astype(np.float16)
        module, _, kind = name.rpartition(".")  # model.layers.3.mlp.up_proj, weight
        if module in hf_names:
            yield f"{hf_names[module]}.{kind}", w
        else:  # model.layers.<i>.<layer name>
            i, layer = module.removeprefix("model.layers.").split(".", 1)
            yield f"blk.{i}.{layer_names[layer]}.{kind}", w


def write_gguf(path: Path, state: dict, config: dict, vocab: dict, dtype: str, name: str):
    """A llama GGUF: the keys llama.cpp's loader reads for this architecture, the tokenizer, the
    weights."""
    from gguf import GGUFWriter  # only this export needs it

    args = ModelArgs.from_hf_config(config)
    w = GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_file_type(1 if dtype == "f16" else 0)  # llama.cpp's MOSTLY_F16, ALL_F32
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_block_count(args.num_hidden_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id}
    adders["unk"] = w.add_unk_token_id
    for key, token_id in vocab["special"].items():
        if token_id is not None:
            adders[key](token_id)
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_space_prefix(False)
    w.add_chat_template(vocab["chat_template"])
    for name, array in gguf_tensors(state, config, dtype):
        w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    check_out(out, args.to)
    check_run(run, args.ckpt)
    cli.check_folder(args.svd_cache, "--svd-cache")
    export = {"hf": export_hf, "gguf": export_gguf, "peft": export_peft}[args.to]
    lines = export(run, out, args)
    print(f"wrote {out} ({args.to}); load it with:", file=sys.stderr)
    print(lines, end="")
    return lines


if __name__ == "__main__":
    cli.run(main)
