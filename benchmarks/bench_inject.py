"""Facts injected per CPU-minute: one epoch of inject.py on the real model for each lever, against
the defaults of 2026-12-01 (batch 8, the expert's data replayed at 0.5 per fact), in one run.

A row is one inject.main run (palora_act, known facts mixed in at 0.5 per fact, no recall check)
on the first --facts lines of data/facts/facts_scale.jsonl (a selection set). Printed: wall and
CPU seconds, fact-epochs per CPU-minute (facts trained once, per minute of one core), the tokens
the steps ran (every row's tokens; the system turn every row opens with counted once per batch,
as training.answer_loss runs it), and the share of the machine's arithmetic ceiling those tokens
used: 2 flops per projection weight for the forward and 2 for the backward to the inputs (frozen
weights need no weight gradient), the output head's at the answer positions only, at the flop/s
of one 2048^3 float32 product (measured in the same run: on shared cores both fall together).

Run:  python benchmarks/bench_inject.py --svf runs/svf-smollm2_135m-reasoning/svf.safetensors
"""

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_model  # noqa: E402

import adapters  # noqa: E402
import inject  # noqa: E402
import model as model_lib  # noqa: E402
import tasks  # noqa: E402
import training  # noqa: E402

LEVERS = {  # name -> inject.Config overrides
    "defaults of 2026-12-01 (batch 8, replay 0.5)": dict(batch_size=8),
    "no replay, batch 8": dict(batch_size=8, mix_skill="none"),
    "no replay, batch 16": dict(batch_size=16, mix_skill="none"),
    "no replay, batch 32": dict(batch_size=32, mix_skill="none"),
}


def counting(counter: list):
    """adapters.answer_loss, counting the tokens each step runs into counter[0]: every row's real
    tokens, the shared system turn once (training.answer_loss's prefix cache)."""
    loss_fn = adapters.answer_loss

    def counted(model, tokens, labels, mask, *args, **kwargs):
        keep = labels.roll(-1, dims=1) != tasks.IGNORE_INDEX
        n = training.shared_columns(tokens, mask, keep)
        counter[0] += int(mask.sum()) - (tokens.shape[0] - 1) * n
        counter[1] += int(keep.sum())  # the positions the output head runs at
        return loss_fn(model, tokens, labels, mask, *args, **kwargs)

    return counted


def run(svf: str, facts: str, overrides: dict, folder: Path) -> dict:
    """One epoch of inject.main -> its summary, with CPU seconds and the tokens it ran."""
    cfg = inject.Config(
        facts=facts, svf=[svf], epochs=1, recall_target=0, out=str(folder), **overrides
    )
    cpu0, t0 = time.process_time(), time.time()
    summary = inject.main(cfg)
    summary["cpu_s"], summary["wall"] = time.process_time() - cpu0, time.time() - t0
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--svf", required=True)
    parser.add_argument("--facts", type=int, default=128, help="facts per run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now().isoformat(timespec="minutes")
    print(
        f"{stamp}, {args.threads} threads, load {os.getloadavg()[0]:.1f}, CPU flags: "
        f"{bench_model.cpu_flags()}, torch {torch.__version__}",
        flush=True,
    )
    model, tokenizer = model_lib.load(REPO / "checkpoints" / "smollm2_135m")
    head = model.lm_head.weight.numel()  # run at the answer positions only (answer_loss's keep)
    body = sum(w.numel() for w in bench_model.linear_weights(model)) - head
    _, flop_s = bench_model.arithmetic_ceiling(model, 5)
    print(f"arithmetic ceiling: {flop_s / 1e9:.0f} GFLOP/s (one 2048^3 float32 product)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lines = (REPO / "data/facts/facts_scale.jsonl").read_text().splitlines(True)
        facts = Path(tmp) / "facts.jsonl"
        facts.write_text("".join(lines[: args.facts]))
        for i, (name, overrides) in enumerate(LEVERS.items()):
            counter = [0, 0]
            adapters.answer_loss = counting(counter)
            s = run(args.svf, str(facts), overrides, Path(tmp) / f"run{i}")
            tokens, answers = counter
            share = 4 * (body * tokens + head * answers) / s["wall_s"] / flop_s
            rate = args.facts / (s["cpu_s"] / 60)
            rows.append((name, s["wall_s"], s["cpu_s"], rate, tokens, share))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0][3]
    print(
        "\n| lever | train wall s | CPU s | fact-epochs / CPU-min | vs defaults | "
        "tokens | ceiling |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, wall, cpu, rate, tokens, share in rows:
        print(
            f"| {name} | {wall:.0f} | {cpu:.0f} | {rate:.1f} | {rate / base:.2f}x | "
            f"{tokens:,.0f} | {100 * share:.0f}% |"
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
