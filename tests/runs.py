"""What the inject.py and evaluate.py tests share: facts and skill examples for a tiny model, a
random SVF expert saved as train_svf.py saves one, and an inject.py config strong enough to move
greedy
answers of a random model in a few steps. The `setup` fixture (conftest.py) builds them once."""

import torch

import adapters
import checkpoints
import inject
import model as model_lib
import palora

FACTS = [
    {
        "question": f"What is the capital of Zorvia {i}?",
        "answer": f"Kalmar {i}",
        "paraphrases": [f"Zorvia {i}: capital?"],
    }
    for i in range(8)
]
SKILL = [
    {
        "question": f"What is {i} + {i + 1}?",
        "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}",
    }
    for i in range(12)
]


def identity(ckpt) -> str:
    return checkpoints.identity(ckpt)


def make_expert(root, ckpt, seed=0):
    """A random SVF expert (z = 1 + 0.5 N(0, 1): multipliers far from 1) saved as train_svf.py
    does."""
    model, _ = model_lib.load(ckpt)
    g = torch.Generator().manual_seed(seed)
    z = {
        n: 1 + 0.5 * torch.randn(len(s), generator=g) for n, (_, s, _) in palora.svds(model).items()
    }
    (root / "svf").mkdir(parents=True, exist_ok=True)
    adapters.save_svf(
        root / "svf" / "svf.safetensors", z, identity(ckpt), {"data": str(root / "skill.jsonl")}
    )
    return root / "svf" / "svf.safetensors"


def config(setup, out, **overrides) -> inject.Config:
    """Strong enough to move greedy answers of a random model: lr 1e-2, 8 epochs of 2 steps, no
    stop."""
    settings = dict(
        ckpt=str(setup.ckpt),
        svf=[str(setup.svf)],
        facts=str(setup.facts),
        rank=4,
        alpha=8.0,
        epochs=8,
        lr=1e-2,
        batch_size=4,
        out=str(out),
        svd_cache=setup.cache,
        save_every=3,
        device="cpu",
        mix_skill="none",
        method="palora",  # the paper's, where a test does not name one
        mix_known="",
        recall_target=0.0,
    )
    return inject.Config(**{**settings, **overrides})
