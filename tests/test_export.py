"""Tests for export.py, and for asking a run's model (model.py --run, --svf): the model of a run
(a stream's round included) is the one evaluate.py builds; transformers loads the merged folder
with our logits; transformers + peft load the adapter on its base with the printed lines; the GGUF
reads back through convert_gguf.py to the same tensors; bad input is one line, exit 2. A tiny
random Llama without rope scaling, tied, with SmolLM2's pre-tokenizer (what the GGUF export
takes); CPU, seconds. llama.cpp itself answers from a GGUF of the real model in
tests/test_llama_cpp.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import adapters
import checkpoints
import export
import inject
import model as model_lib
import palora
import tiny
from convert_gguf import convert_gguf
from runs import FACTS, SKILL, config, make_expert

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent

SMOLLM_PRE = {  # SmolLM2's tokenizer.json pre_tokenizer: llama.cpp's `smollm`
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def plain_llama(path: Path, seed=0) -> Path:
    """A tiny SmolLM2-shaped Llama: default rope, tied head, SmolLM2's digit-splitting tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(
        LlamaConfig(**tiny.COMMON, max_position_embeddings=128, tie_word_embeddings=True)
    )
    hf.eval().save_pretrained(path)
    tiny.make_tokenizer(path)
    tok = json.loads((path / "tokenizer.json").read_text())
    (path / "tokenizer.json").write_text(json.dumps({**tok, "pre_tokenizer": SMOLLM_PRE}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A checkpoint, its expert, a palora run, a second round on it (--after), an imsm and an smf
    run, an unfinished run, and a run of another checkpoint."""
    root = tmp_path_factory.mktemp("export")
    ckpt = plain_llama(root / "ckpt")
    setup = SimpleNamespace(
        ckpt=ckpt,
        svf=make_expert(root, ckpt),
        cache=str(root / "cache"),
        facts=tiny.write_jsonl(root / "facts.jsonl", FACTS[:4]),
    )
    tiny.write_jsonl(root / "skill.jsonl", SKILL)  # the expert's data: smf's background corpus
    inject.main(config(setup, root / "first", epochs=2))
    more = tiny.write_jsonl(root / "more.jsonl", FACTS[4:])
    inject.main(
        config(setup, root / "second", epochs=2, facts=str(more), after=str(root / "first"))
    )
    inject.main(config(setup, root / "imsm", epochs=1, method="imsm"))
    memory = dict(smf_slots=256, smf_topk=4, smf_top_t=16, smf_background=12)
    inject.main(config(setup, root / "smf", epochs=1, method="smf", **memory))
    (root / "unfinished").mkdir()
    for name in ("config.json", "probe.safetensors"):  # what a run killed while training holds
        (root / "unfinished" / name).write_bytes((root / "first" / name).read_bytes())
    other = plain_llama(root / "other", seed=1)
    return SimpleNamespace(**vars(setup), root=root, other=other)


def ids(seed=0):
    return torch.randint(0, tiny.VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(seed))


def built_as_evaluate_builds(runs, run: Path):
    """evaluate.py's row: the checkpoint, the expert merged from the base SVDs, load_run."""
    base, _ = model_lib.load(runs.ckpt)
    identity = checkpoints.identity(runs.ckpt)
    z, _ = adapters.load_svf(runs.svf, identity, base)
    palora.merge_expert(base, palora.svds(base), z)
    return adapters.load_run(base, run, identity)[0]


def export_args(runs, *rest):
    return [*rest, "--svd-cache", runs.cache]


# -----------------------------------------------------------------------------
# the model of a run, asked from the command line


def test_run_model_follows_the_stream_as_evaluate_does(runs):
    second = runs.root / "second"
    model, _, info = adapters.run_model(second, svd_cache=runs.cache)
    want = built_as_evaluate_builds(runs, second)
    first_only = built_as_evaluate_builds(runs, runs.root / "first")
    with torch.no_grad():
        assert torch.allclose(model(ids()), want(ids()), atol=1e-5)
        assert not torch.allclose(model(ids()), first_only(ids()), atol=1e-3)  # round 2 counts
    assert info["method"] == "palora"


def greedy(model, tokenizer, question, n):
    chat = [{"role": "user", "content": question}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
    return tokenizer.decode(model_lib.generate(model, [prompt], n, tokenizer.eos_ids)[0])


def test_model_cli_answers_with_a_run_and_an_expert(runs, capsys):
    question = FACTS[0]["question"]
    args = ["--max-new-tokens", "8", "--svd-cache", runs.cache, question]
    model_lib.main(["--run", str(runs.root / "second"), *args])
    model, tokenizer, _ = adapters.run_model(runs.root / "second", svd_cache=runs.cache)
    assert capsys.readouterr().out == greedy(model, tokenizer, question, 8) + "\n"
    model_lib.main(["--svf", str(runs.svf), "--ckpt", str(runs.ckpt), *args])
    expert, tokenizer, _ = adapters.expert_model(runs.svf, runs.ckpt, svd_cache=runs.cache)
    assert capsys.readouterr().out == greedy(expert, tokenizer, question, 8) + "\n"


def test_model_cli_reads_questions_until_end_of_input(runs):
    """As a script (model.py is __main__ there, and adapters imports it again as `model`)."""
    questions = [FACTS[0]["question"], FACTS[5]["question"]]
    run = ["--run", str(runs.root / "second"), "--svd-cache", runs.cache, "--max-new-tokens", "6"]
    done = subprocess.run(
        [sys.executable, str(REPO / "model.py"), *run],
        input=f"{questions[0]}\n\n{questions[1]}\n",
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    model, tokenizer, _ = adapters.run_model(runs.root / "second", svd_cache=runs.cache)
    assert done.stdout == "".join(greedy(model, tokenizer, q, 6) + "\n" for q in questions)


def test_answers_are_written_token_by_token(runs):
    """Each token's text is written when it comes; a byte-level token ending inside a UTF-8
    character waits for the next one; the pieces add up to the whole answer."""
    _, tokenizer = model_lib.load(runs.ckpt)
    text = "café 東京 ok"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in "".join(tokenizer.decode([t]) for t in tokens)  # a character split
    writes = []
    out = SimpleNamespace(write=writes.append, flush=lambda: None)
    on_token, finish = model_lib.printer(tokenizer, out)
    for t in [*tokens, min(tokenizer.eos_ids)]:
        on_token(torch.tensor([t]))
    finish()
    assert "".join(writes) == text + "\n"
    assert len(writes) > 3 and not any("\ufffd" in w for w in writes)


# -----------------------------------------------------------------------------
# the exports


def test_hf_folder_gives_our_logits_in_transformers(runs, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    out.mkdir()  # an empty folder is taken
    lines = export.main(export_args(runs, str(runs.root / "second"), str(out), "--to", "hf"))
    assert capsys.readouterr().out == lines
    scope = {}
    exec(lines, scope)  # the printed lines, as a user pastes them
    assert type(scope["model"]).__name__ == "LlamaForCausalLM"
    ours, _, _ = adapters.run_model(runs.root / "second", svd_cache=runs.cache)
    with torch.no_grad():
        diff = (scope["model"](ids()).logits - ours(ids())).abs().max().item()
    assert diff < 1e-5
    prompt = "<|im_start|>user\n12 cafés<|im_end|>\n"
    _, tokenizer = model_lib.load(out)
    assert AutoTokenizer.from_pretrained(out)(prompt).input_ids == tokenizer.encode(prompt)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors"]
        + ["tokenizer.json", "tokenizer_config.json"]
    )
    assert not list(tmp_path.glob(".*"))  # no temporary left beside it


def test_peft_adapter_loads_on_its_base_with_the_printed_lines(runs, tmp_path):
    """The second round's adapter applies to the expert + round 1: its base is written merged."""
    out = tmp_path / "peft"
    lines = export.main(export_args(runs, str(runs.root / "second"), str(out), "--to", "peft"))
    assert "PeftModel.from_pretrained" in lines
    scope = {}
    exec(lines, scope)
    ours, _, _ = adapters.run_model(runs.root / "second", svd_cache=runs.cache)
    with torch.no_grad():
        assert torch.allclose(scope["model"](ids()).logits, ours(ids()), atol=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    round1 = built_as_evaluate_builds(runs, runs.root / "first")
    with torch.no_grad(), scope["model"].disable_adapter():
        assert torch.allclose(scope["model"](ids()).logits, round1(ids()), atol=1e-5)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_reads_back_through_convert_gguf_to_the_same_tensors(runs, tmp_path, dtype):
    """convert_gguf un-permutes q and k and names every tensor: f32 reads back bit for bit, f16
    as our weights rounded to float16 (1-D norms stay float32); the tokenizer and the template
    too."""
    out = tmp_path / "model.gguf"
    export.main(
        export_args(runs, str(runs.root / "second"), str(out), "--to", "gguf", "--dtype", dtype)
    )
    back = convert_gguf(out, tmp_path / "back")
    theirs, tokenizer = model_lib.load(back)
    ours, our_tokenizer, _ = adapters.run_model(runs.root / "second", svd_cache=runs.cache)
    for name, t in ours.state_dict().items():
        want = t.half().float() if dtype == "f16" and t.dim() == 2 else t
        assert torch.equal(theirs.state_dict()[name], want), name
    if dtype == "f32":
        with torch.no_grad():
            assert torch.equal(theirs(ids()), ours(ids()))
    text = "12 cafés, 東京"
    assert tokenizer.encode(text) == our_tokenizer.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat) == our_tokenizer.apply_chat_template(chat)
    assert tokenizer.eos_ids == our_tokenizer.eos_ids


def test_gguf_q_and_k_rows_are_llama_cpps_interleaved_pairs(runs, tmp_path):
    """Row 2j of a head in the file is the head's row j in HF's layout, row 2j + 1 its row
    Dh/2 + j (llama.cpp's convert_hf_to_gguf permute); k by its KV heads."""
    from gguf import GGUFReader

    out = tmp_path / "model.gguf"
    export.main(
        export_args(runs, str(runs.root / "first"), str(out), "--to", "gguf", "--dtype", "f32")
    )
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    ours, _, _ = adapters.run_model(runs.root / "first", svd_cache=runs.cache)
    Dh = ours.args.head_dim
    for gguf_name, module in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        W = getattr(ours.model.layers[1].self_attn, module).weight.detach()  # (H*Dh, D)
        stored = torch.from_numpy(tensors[f"blk.1.{gguf_name}.weight"].data.copy())
        heads = W.shape[0] // Dh
        assert stored.shape == W.shape
        for h in range(heads):
            for j in range(Dh // 2):
                assert torch.equal(stored[h * Dh + 2 * j], W[h * Dh + j])
                assert torch.equal(stored[h * Dh + 2 * j + 1], W[h * Dh + Dh // 2 + j])
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


# -----------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def bad_cases(runs, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("the user's")
    (tmp_path / "taken.gguf").write_text("the user's")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    first = str(runs.root / "first")
    return {
        "unfinished": ([str(runs.root / "unfinished"), "o", "--to", "hf"], "summary.json: missing"),
        "other checkpoint": (
            [first, "o", "--to", "hf", "--ckpt", str(runs.other)],
            "made for checkpoint",
        ),
        "non-empty folder": ([first, str(full), "--to", "hf"], "not an empty folder"),
        "existing file": ([first, str(tmp_path / "taken.gguf"), "--to", "gguf"], "exists"),
        "symlink": ([first, str(tmp_path / "link"), "--to", "peft"], "a symlink"),
        "imsm": ([str(runs.root / "imsm"), "o", "--to", "hf"], "an imsm run cannot be exported"),
        "smf": ([str(runs.root / "smf"), "o", "--to", "gguf"], "an smf run cannot be exported"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unfinished",
        "other checkpoint",
        "non-empty folder",
        "existing file",
        "symlink",
        "imsm",
        "smf",
    ],
)
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, case, monkeypatch):
    import cli

    monkeypatch.chdir(tmp_path)
    argv, message = bad_cases(runs, tmp_path)[case]
    before = sorted(os.listdir(tmp_path)) + sorted(os.listdir(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit) as e:
        cli.run(export.main, export_args(runs, *argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(os.listdir(tmp_path)) + sorted(os.listdir(tmp_path / "elsewhere")) == before
    assert (tmp_path / "full" / "notes.txt").read_text() == "the user's"


def test_gguf_refuses_what_llama_cpp_would_compute_otherwise(tmp_path):
    """llama3 rope scaling (the tiny default) and a tokenizer other than SmolLM2's: one line
    each, before the model is built."""
    scaled = tiny.make_tiny_llama(tmp_path / "scaled")
    config = checkpoints.read_json(scaled / "config.json")
    with pytest.raises(export.cli.ConfigError, match="llama3 rope scaling"):
        export.gguf_supported(config, scaled)
    with pytest.raises(export.cli.ConfigError, match="no GGUF export for this tokenizer"):
        export.gguf_vocab(scaled, config)  # tiny's tokenizer: GPT-2's split, no digit split
