"""Shared fixtures, and the repository's top-level modules (model, palora, tasks, ...) made
importable from the tests however pytest is started.

    one_thread   torch on one thread for a test module (tiny matrices)
    seeded       torch's and Python's global RNGs seeded per test
    tiny_ckpt    a tiny random Llama checkpoint folder (tests/tiny.py), built once per session
    reasoning    a GSM8K-layout skill set (answers end in `#### N`): .records, .train, .test
    setup        a tiny checkpoint with a random SVF expert, facts, skill and known facts
(tests/runs.py)
"""

import random
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: thread hand-offs dominate, and on 2 shared cores two threads per process ran
    6x slower. Tiny-model test modules use `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded():
    """A failure reproduces: every test that uses it starts from the same global RNG states."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def sums(n: int) -> list[dict]:
    """'What is i + (i+1)?' with a GSM8K answer: a calculator annotation, then `#### 2i+1`."""
    records = []
    for i in range(n):
        total = 2 * i + 1
        answer = f"{i} + {i + 1} = <<{i}+{i + 1}={total}>>{total}\n#### {total}"
        records.append({"question": f"What is {i} + {i + 1}?", "answer": answer})
    return records


@pytest.fixture(scope="session")
def reasoning(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("reasoning")
    records = sums(4)
    train = tiny.write_jsonl(root / "train.jsonl", records)
    test = tiny.write_jsonl(root / "test.jsonl", records)
    return SimpleNamespace(records=records, train=train, test=test)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> SimpleNamespace:
    """A tiny checkpoint with a random SVF expert, facts, skill examples and known facts."""
    from runs import FACTS, SKILL, make_expert

    root = tmp_path_factory.mktemp("inject")
    ckpt = tiny.make_tiny_llama(root / "ckpt")
    return SimpleNamespace(
        root=root,
        ckpt=ckpt,
        svf=make_expert(root, ckpt),
        cache=str(root / "cache"),
        facts=tiny.write_jsonl(root / "facts.jsonl", FACTS),
        skill=tiny.write_jsonl(root / "skill.jsonl", SKILL),
        known=tiny.write_jsonl(root / "known.jsonl", FACTS[:4]),
    )
