"""The recall matrix of a stream of injections: recall[k][j], the share of round j's facts that the
model after round k answers (greedy, tasks.fact_correct), for every j <= k; round k's model is the
expert with rounds 1..k merged, in order, as evaluate.py builds it (adapters.load_run), built here
one round at a time so that each round's model is made once.

    python experiments/stream_recall.py --svf runs/svf-.../svf.safetensors --out runs/x.json \
        runs/stream/r01 runs/stream/r02 ...   (the rounds, in order)
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import adapters  # noqa: E402
import checkpoints  # noqa: E402
import model as model_lib  # noqa: E402
import palora  # noqa: E402
import tasks  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="the stream's rounds, in order")
    parser.add_argument("--svf", required=True)
    parser.add_argument("--out", required=True, help="JSON file written")
    parser.add_argument("--ckpt", default=checkpoints.DEFAULT)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = checkpoints.resolve(args.ckpt)
    identity = checkpoints.identity(folder)
    model, tokenizer = model_lib.load(folder)
    z, _ = adapters.load_svf(Path(args.svf), identity, model)
    palora.merge_expert(model, adapters.svds(model, palora.MLP_TARGETS, identity), z)
    rounds, matrix, t0 = [], [], time.time()
    for k, run in enumerate(args.runs):
        config = adapters.run_config(Path(run))
        if k and Path(config["after"]).resolve() != Path(args.runs[k - 1]).resolve():
            sys.exit(f"error: {run}: follows {config['after']}, not {args.runs[k - 1]}")
        adapters.load_peft(model, run, identity)
        palora.merge_lora(model)
        rounds.append(tasks.read_facts(config["facts"]))
        facts = [f for r in rounds for f in r]
        answers = tasks.answer(model, tokenizer, [f["question"] for f in facts], 16, 64)
        ok = [tasks.fact_correct(a, f["answer"]) for a, f in zip(answers, facts)]
        row, start = [], 0
        for r in rounds:
            row.append(sum(ok[start : start + len(r)]) / len(r))
            start += len(r)
        matrix.append(row)
        print(f"round {k + 1}: " + " ".join(f"{x:.2f}" for x in row), flush=True)
    result = {"runs": args.runs, "recall": matrix, "wall_s": time.time() - t0}
    tasks.atomic_write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
