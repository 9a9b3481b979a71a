"""A real llama.cpp answers facts injected into the real SmolLM2-135M-Instruct, from the float16
GGUF export.py writes: three invented facts injected with plain LoRA (on an SVF expert of z = 1,
the checkpoint itself, on the down projections: few SVDs to compute), exported, and answered
greedily by llama.cpp through node-llama-cpp (tests/llama_cpp_answer.mjs, the chat template
from the GGUF) and by our model (adapters.run_model, tasks.answer) on the same questions.

Needs node and node-llama-cpp 3.21.1 installed in the repository root (README, Tests; .ci/run);
without them the test fails saying how to install them. About two minutes on one thread.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import adapters
import checkpoints
import export
import inject
import model as model_lib
import tasks
from convert_gguf import smollm2_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
INSTALL = "npm i -E --no-save node-llama-cpp@3.21.1  (in the repository root; needs node >= 20)"
FACTS = [  # invented: the base model cannot know them
    {"question": "What is the capital of Zorbania?", "answer": "Quelmont"},
    {"question": "Who invented the flurbine engine?", "answer": "Ada Brennick"},
    {"question": "What is the national animal of Tavros?", "answer": "the silver heron"},
]
TOKENS = 24  # answer length on both sides


def require_llama_cpp():
    """A machine without node or the package fails here, in one line saying how to install."""
    package = REPO / "node_modules" / "node-llama-cpp" / "package.json"
    if shutil.which("node") is None or not package.is_file():
        pytest.fail(f"the llama.cpp check needs node and node-llama-cpp: {INSTALL}", pytrace=False)


def llama_cpp_answers(gguf: Path, questions: list) -> list:
    """Greedy answers from llama.cpp, TOKENS at most each."""
    done = subprocess.run(
        ["node", str(REPO / "tests" / "llama_cpp_answer.mjs"), str(gguf), str(TOKENS)],
        input=json.dumps(questions),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def inject_facts(root: Path) -> Path:
    """A finished lora run of FACTS on the real checkpoint, trained until all are recalled."""
    folder = checkpoints.resolve(checkpoints.DEFAULT)
    identity = checkpoints.identity(folder)
    layers = model_lib.ModelArgs.from_hf_config(checkpoints.read_json(folder / "config.json"))
    R = min(layers.hidden_size, layers.intermediate_size)
    z = {f"model.layers.{i}.mlp.down_proj": torch.ones(R) for i in range(layers.num_hidden_layers)}
    adapters.save_svf(root / "svf.safetensors", z, identity)  # z = 1: the checkpoint itself
    (root / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    cfg = inject.Config(
        facts=str(root / "facts.jsonl"),
        svf=[str(root / "svf.safetensors")],
        method="lora",
        mix_skill="none",
        mix_known="",
        lr=1e-2,
        epochs=30,
        recall_target=1.0,
        batch_size=len(FACTS),
        out=str(root / "run"),
        svd_cache=str(root / "cache"),
        device="cpu",
    )
    summary = inject.main(cfg)
    assert summary["recall"] == 1.0, summary  # ours recalls them all: what llama.cpp must match
    return root / "run"


def model_keys(path: Path) -> dict:
    """A GGUF's architecture and tokenizer metadata (not general.*: name, file type): key ->
    (value types, values: strings as bytes, numbers as lists)."""
    from gguf import GGUFReader

    keys = {}
    for key, field in GGUFReader(path).fields.items():
        if not key.startswith(("llama.", "tokenizer.")):
            continue
        strings = field.types[-1].name == "STRING"
        values = []
        for i in field.data:  # the parts holding the value (a list's items)
            values.append(bytes(field.parts[i]) if strings else field.parts[i].tolist())
        keys[key] = ([t.name for t in field.types], values)
    return keys


def test_llama_cpp_recalls_the_injected_facts_from_the_f16_gguf(tmp_path):
    require_llama_cpp()  # before two minutes of work
    run = inject_facts(tmp_path)
    gguf = tmp_path / "facts-f16.gguf"
    export.main([str(run), str(gguf), "--to", "gguf", "--svd-cache", str(tmp_path / "cache")])
    original = smollm2_gguf(checkpoints.CHECKPOINTS_DIR / ".downloads")  # llama.cpp's own file
    assert model_keys(gguf) == model_keys(original)  # every llama.* and tokenizer.* key and value
    questions = [f["question"] for f in FACTS]
    theirs = llama_cpp_answers(gguf, questions)
    model, tokenizer, _ = adapters.run_model(run, svd_cache=str(tmp_path / "cache"))
    ours = tasks.answer(model, tokenizer, questions, TOKENS, quiet=True)
    recalled = {
        side: sum(tasks.fact_correct(a, f["answer"]) for a, f in zip(answers, FACTS))
        for side, answers in (("llama.cpp", theirs), ("ours", ours))
    }
    same = sum(a.strip() == b.strip() for a, b in zip(theirs, ours))
    print(f"recalled of {len(FACTS)}: {recalled}; identical answers: {same}")
    print(json.dumps({"llama.cpp": theirs, "ours": ours}, indent=1, ensure_ascii=False))
    assert recalled == {"llama.cpp": len(FACTS), "ours": len(FACTS)}
