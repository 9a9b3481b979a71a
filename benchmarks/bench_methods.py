"""What each method costs at inference, in one run: greedy decoding time per new token of the
merged SVF expert with each run's trained part loaded (adapters.load_run, as evaluate.py's rows:
LoRA-family runs merged into the weights, IMSM's two streams and gate, SMF's memory layers),
against the plain expert, at batch 1 and 8, the methods and the expert measured in turn,
--repeats times, best of each. Prompts: the first 8 questions of --facts through the chat
template; 32 new tokens, eos ignored, prefill included (evaluate.seconds_per_token).

Run:  python benchmarks/bench_methods.py --svf runs/svf-smollm2_135m-reasoning/svf.safetensors \
          runs/reproduce/lora-s0 runs/reproduce/imsm-s0 runs/reproduce/smf-s0
"""

import argparse
import copy
import datetime
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_model import cpu_flags  # noqa: E402

import adapters  # noqa: E402
import checkpoints  # noqa: E402
import cli  # noqa: E402
import evaluate  # noqa: E402
import model as M  # noqa: E402
import palora  # noqa: E402
import tasks  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("runs", nargs="+", help="inject.py run folders")
    parser.add_argument("--svf", required=True, help="the expert the runs were trained on")
    parser.add_argument("--ckpt", default="smollm2_135m")
    parser.add_argument("--facts", default="data/facts/facts.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = checkpoints.resolve(args.ckpt)
    identity = checkpoints.identity(folder)
    expert, tokenizer = M.load(folder)
    kinds = tuple(palora.MLP_TARGETS)
    svds = adapters.svds(expert, kinds, identity, str(REPO / "cache" / "svd"))
    z, _ = adapters.load_svf(Path(args.svf), identity, expert)
    palora.merge_expert(expert, svds, z)
    models = {"expert": (expert, 0)}
    for run in map(Path, args.runs):
        model, info = adapters.load_run(copy.deepcopy(expert), run, identity)
        models[run.name] = (model, info["added"])
    questions = [r["question"] for r in tasks.read_jsonl(args.facts)[:8]]
    best = {(name, B): float("inf") for name in models for B in (1, 8)}
    for _ in range(args.repeats):  # in turn, so that load from other processes hits all alike
        for name, (model, _) in models.items():
            for B in (1, 8):
                s = evaluate.seconds_per_token(model, tokenizer, questions[:B], n=32)
                best[name, B] = min(best[name, B], s)
    print(
        f"\n{datetime.datetime.now():%Y-%m-%d %H:%M}  {os.cpu_count()} cores, {args.threads} "
        f"threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, "
        f"cpu flags: {cpu_flags()}"
    )
    print(f"{'run':24s} {'added':>12s} {'ms/token b1':>12s} {'x expert':>9s} {'ms/token b8':>12s}")
    for name, (_, added) in models.items():
        b1, b8 = best[name, 1], best[name, 8]
        ratio = b1 / best["expert", 1]
        print(f"{name:24s} {added:12,d} {1e3 * b1:12.1f} {ratio:8.2f}x {1e3 * b8:12.1f}", end="")
        print(f" ({b8 / best['expert', 8]:.2f}x)")


if __name__ == "__main__":
    cli.run(main)  # a missing or foreign run: one line, exit 2
