"""Tables of experiments/scale.sh from its results: evaluate.py's results.json (each row's metrics
with a 95% interval on every share, Wilson's, and locality per relation of the known facts the base
answers) and stream_recall.py's recall matrices.

    python experiments/scale_table.py runs/scale/eval-c1000/results.json --known FILE
    python experiments/scale_table.py --stream runs/scale/cs-protect-recall.json
    python experiments/scale_table.py runs/ablate/eval-s0/results.json --paired probe-64 \
        --more runs/ablate/eval-s1/results.json runs/ablate/eval-s2/results.json
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import torch  # noqa: E402

import evaluate  # noqa: E402
import tasks  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of k successes in n (exact at the ends, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def share(oks: list) -> str:
    k, n = sum(oks), len(oks)
    lo, hi = wilson(k, n)
    return f"{k / n:.3f} ({k}/{n}; {lo:.2f}-{hi:.2f})" if n else "-"


def rows_table(path: Path, known: Path):
    """One line per row: strict and held-out-template accuracy, retention, recall, paraphrases,
    locality; then locality per relation over the known facts the base answers."""
    result = json.loads(path.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    base = next(r for r in result["rows"] if r["group"] == "base")
    kinds = [r.get("type", "general") for r in tasks.read_jsonl(known)]
    answered = [i for i, ok in enumerate(base["items"]["known_ok"]) if ok]
    print(
        "| row | strict | strict, held-out templates | retention | retention_ood | recall | "
        "paraphrases | locality |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        items = r["items"]
        kept = [items["known_ok"][i] for i in answered]
        cells = [
            share(items["reasoning_strict"]),
            share(items["reasoning_ood_strict"]),
            f"{r.get('retention', math.nan):.3f}",
            f"{r.get('retention_ood', math.nan):.3f}",
            share(items["facts_ok"]),
            share(items["paraphrases_ok"]),
            share(kept),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nlocality per relation (known facts the base answers):\n")
    names = list(rows)
    print("| relation | n | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    by_kind = defaultdict(list)
    for i in answered:
        by_kind[kinds[i]].append(i)
    for kind, idx in sorted(by_kind.items()):
        cells = [f"{sum(rows[n]['items']['known_ok'][i] for i in idx)}/{len(idx)}" for n in names]
        print(f"| {kind} | {len(idx)} | " + " | ".join(cells) + " |")


def paired_table(paths: list, reference: str):
    """Each group of rows (a run's name less its -sN) against the `reference` group, item by item
    and seed by seed: the difference in strict accuracy on both reasoning splits and in recall,
    with evaluate.py's paired bootstrap 95% interval (seeds and items resampled) and, with two seeds
    or more, the t interval over the per-seed differences (evaluate.seed_interval)."""
    rows = [r for path in paths for r in json.loads(path.read_text())["rows"]]
    groups = defaultdict(dict)  # group -> seed -> row
    for r in rows:
        if r["group"] not in ("base", "svf"):
            group, _, seed = r["name"].rpartition("-")
            groups[group][seed] = r
    keys = ("reasoning_strict", "reasoning_ood_strict", "facts_ok")
    print(f"\ndifference from {reference}, by item and seed (bootstrap 95%; seed-level t 95%):\n")
    print("| row | seeds | strict | strict, held-out templates | recall |")
    print("|---|---|---|---|---|")
    for group, by_seed in groups.items():
        seeds = sorted(set(by_seed) & set(groups[reference]))
        if group == reference or not seeds:
            continue
        cells = []
        for key in keys:
            a = torch.tensor([by_seed[s]["items"][key] for s in seeds], dtype=torch.float64)
            b = torch.tensor(
                [groups[reference][s]["items"][key] for s in seeds], dtype=torch.float64
            )
            mean, low, high = evaluate.paired_bootstrap(a, b)
            t = evaluate.seed_interval((a - b).mean(1).tolist())
            seed_part = f"; [{t['seed_low']:+.3f}, {t['seed_high']:+.3f}]" if len(seeds) > 1 else ""
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]{seed_part}")
        print(f"| {group} | {len(seeds)} | " + " | ".join(cells) + " |")


def stream_table(path: Path):
    """recall[k][j]: round j's facts after round k, and the mean over every earlier round."""
    result = json.loads(path.read_text())
    matrix = result["recall"]
    rounds = len(matrix)
    print("| after round | " + " | ".join(f"r{j + 1}" for j in range(rounds)) + " | earlier |")
    print("|---|" + "---|" * (rounds + 1))
    for k, row in enumerate(matrix):
        earlier = sum(row[:k]) / k if k else math.nan
        cells = [f"{x:.2f}" for x in row] + ["-"] * (rounds - len(row))
        print(f"| {k + 1} | " + " | ".join(cells) + f" | {earlier:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", help="evaluate.py's results.json")
    parser.add_argument("--known", default="data/known/known_confirm.jsonl")
    parser.add_argument("--stream", help="stream_recall.py's JSON")
    parser.add_argument("--paired", help="also each group's difference from this group")
    parser.add_argument("--more", nargs="*", default=[], help="more results.json (other seeds)")
    args = parser.parse_args()
    if args.results:
        rows_table(Path(args.results), Path(args.known))
    if args.results and args.paired:
        paired_table([Path(args.results), *map(Path, args.more)], args.paired)
    if args.stream:
        stream_table(Path(args.stream))


if __name__ == "__main__":
    main()
