"""Where a small evaluation's time goes, phase by phase, on the real model, in one run.

Phases: loading the checkpoint; the SVD of every MLP matrix (computed into an empty cache, then
read back from it, checksums verified); batched greedy answering of --limit reasoning questions
(data/reasoning/test.jsonl, 96 new tokens, batch 64, as evaluate.py) and of --limit facts
(data/facts/facts.jsonl, 16 new tokens); --steps injection training steps with a LoRA on the MLPs
(adapters.attach, batch 8 from the facts and half as many replayed skill examples, Adam): the
output head on every position (the loss before 2026-12-01), on the answer positions alone, and
packed (the system turn every example opens with run once per batch, the rows in two length
groups: now). One table of seconds and items/s, with the date, the load average and the CPU
flags that matter (avx2, avx512, amx).

Run:  python benchmarks/bench_pipeline.py --limit 64            (smollm2_135m, a few minutes)
      python benchmarks/bench_pipeline.py --ckpt path/to/folder --limit 300 --steps 20
"""

import argparse
import copy
import datetime
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_model import cpu_flags  # noqa: E402

import adapters  # noqa: E402
import checkpoints  # noqa: E402
import model as M  # noqa: E402
import palora  # noqa: E402
import tasks  # noqa: E402
import training  # noqa: E402


class Phases:
    """Rows of (phase, seconds, items, unit), timed by `with phases(name, items, unit):`."""

    def __init__(self):
        self.rows = []

    def __call__(self, name, items, unit):
        phases = self

        class Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                seconds = time.perf_counter() - self.t0
                phases.rows.append((name, seconds, items, unit))
                print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)

        return Timer()


def full_head_loss(model, tokens, labels, attention_mask):
    """The loss as it was before the head ran on the answer positions alone: logits (B, T, V) for
    every position, prompt and padding included, then cross-entropy with those ignored."""
    logits = model(tokens, attention_mask=attention_mask)[:, :-1].flatten(0, 1).float()
    target = labels[:, 1:].flatten()
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=tasks.IGNORE_INDEX)


def injection_steps(model, examples, pad_id, svds, steps: int, loss_fn, batch_size: int = 8):
    """Adam steps on a rank-8 LoRA of every MLP matrix, as inject.py trains (batches of 8 drawn
    from facts and replayed skill examples)."""
    model.requires_grad_(False)
    module, params = adapters.attach(model, "lora", 8, 16.0, 0, svds)
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-4)
    for step in range(steps):
        idx = training.batch_indices(len(examples), batch_size, step, 0)
        batch = tasks.collate([examples[i] for i in idx], pad_id)
        loss = loss_fn(module, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--ckpt", default="smollm2_135m")
    parser.add_argument("--limit", type=int, default=64, help="reasoning questions, and facts")
    parser.add_argument("--steps", type=int, default=5, help="injection training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="questions answered at once")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    phases = Phases()
    folder = checkpoints.resolve(args.ckpt)

    with phases("load checkpoint", 1, "loads"):
        model, tokenizer = M.load(folder)
    identity = checkpoints.identity(folder)
    n = len(palora.find_targets(model, palora.MLP_TARGETS))
    with tempfile.TemporaryDirectory() as cache:  # absolute: adapters.svds uses it as is
        with phases(f"SVD of {n} MLP matrices, computed", n, "matrices"):
            adapters.svds(model, palora.MLP_TARGETS, identity, cache)
        with phases(f"SVD of {n} MLP matrices, from the cache", n, "matrices"):
            svds = adapters.svds(model, palora.MLP_TARGETS, identity, cache)

    reasoning = tasks.read_jsonl(REPO / "data/reasoning/test.jsonl")[: args.limit]
    questions = [r["question"] for r in reasoning]
    with phases(
        f"reasoning answers, 96 tokens, batch {args.batch_size}", len(questions), "answers"
    ):
        tasks.answer(model, tokenizer, questions, 96, args.batch_size, quiet=True)
    facts = tasks.read_jsonl(REPO / "data/facts/facts.jsonl")[: args.limit]
    questions = [r["question"] for r in facts]
    with phases(f"fact answers, 16 tokens, batch {args.batch_size}", len(questions), "answers"):
        tasks.answer(model, tokenizer, questions, 16, args.batch_size, quiet=True)
    replay = tasks.read_jsonl(REPO / "data/reasoning/train.jsonl")[: len(facts) // 2]
    examples = [
        tasks.encode_example(tokenizer, r["question"], r["answer"], 256) for r in facts + replay
    ]  # inject.py's default mix: half a replayed skill example per fact
    losses = {
        "head on every position": full_head_loss,
        "head on answers": training.answer_loss,
        "head on answers, packed": functools.partial(training.answer_loss, pack=True),
    }
    for name, loss_fn in losses.items():
        trained = copy.deepcopy(model)
        with phases(f"injection steps, batch 8, {name}", args.steps, "steps"):
            injection_steps(trained, examples, tokenizer.pad_id, svds, args.steps, loss_fn)

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        "?",
    )
    print(
        f"\n{datetime.datetime.now():%Y-%m-%d %H:%M}  {cpu}, {os.cpu_count()} cores, "
        f"{args.threads} threads, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}, checkpoint {folder.name}"
    )
    print(f"cpu flags: {cpu_flags()}")
    print(f"{'phase':56s} {'seconds':>8s} {'items/s':>9s}")
    total = sum(seconds for _, seconds, _, _ in phases.rows)
    for name, seconds, items, unit in phases.rows:
        print(f"{name:56s} {seconds:8.1f} {items / seconds:9.2f} {unit}/s")
    print(f"{'total':56s} {total:8.1f}")


if __name__ == "__main__":
    main()
