"""Print an evaluate.py results.json as docs/results.md's tables and its paired intervals; with
--by-layer, where each method's update reaches the skill's inputs (interference per matrix kind and
third of the depth, mean over seeds) and, with a file name, a plot of it per layer.

python experiments/tables.py runs/reproduce/eval/results.json
python experiments/tables.py runs/reproduce/eval/results.json --by-layer docs/interference.png
"""

import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evaluate import cell  # noqa: E402

COLUMNS = (
    "strict",
    "strict_ood",
    "retention",
    "retention_ood",
    "reliability",
    "generalization",
    "locality",
    "locality_any",
    "collapse",
    "leak_out",
    "leak_in",
    "interference",
    "time",
)


def main(path):
    results = json.load(open(path))
    print(f"<!-- {path}: {results['date']}, {results['machine']} -->")
    print("| method | seeds | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for g in results["groups"]:
        cells = " | ".join(cell(c, *g.get(c, (float("nan"), 0))) for c in COLUMNS)  # older files
        print(f"| {g['group']} | {g['n']} | {cells} |")
    rows = results["rows"]
    sizes = {
        k: len(rows[0]["items"][k])
        for k in ("reasoning", "reasoning_ood", "facts", "paraphrases", "known")
    }
    print(f"\nitems: {sizes}")
    for p in results["intervals"]:
        print(
            f"- {p['a']} - {p['b']}, strict on {p['split']} ({p['seeds']} seed(s) x {p['items']} "
            f"items): {p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"
        )
    mechanism = results.get("mechanism", {})
    if mechanism.get("runs", 0) >= 3:
        print(
            f"- interference vs retention_ood over {mechanism['runs']} runs: Spearman rho "
            f"{mechanism['rho']:+.2f}"
        )


def by_layer(path, png=None):
    """Interference (E‖dW x‖² / E‖W x‖² on the held-out-template skill inputs) per method, matrix
    kind and third of the depth; per layer in png (mean over kinds and seeds, log scale)."""
    rows = [r for r in json.load(open(path))["rows"] if r.get("interference_by")]
    cells, layers = {}, {}
    for r in rows:
        for name, value in r["interference_by"].items():
            layer = int(re.search(r"layers\.(\d+)\.", name)[1])
            kind = name.rsplit(".", 1)[1]
            cells.setdefault(r["group"], {}).setdefault(kind, {}).setdefault(layer, []).append(
                value
            )
            layers.setdefault(r["group"], {}).setdefault(layer, []).append(value)
    depth = 1 + max(layer for g in layers.values() for layer in g)
    thirds = [range(i * depth // 3, (i + 1) * depth // 3) for i in range(3)]
    kinds = sorted({k for g in cells.values() for k in g})
    header = [f"{k} {t.start}-{t.stop - 1}" for k in kinds for t in thirds]
    print("\n| method | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for group, by_kind in cells.items():
        means = [
            statistics.mean(v for layer in t for v in by_kind[k].get(layer, []))
            for k in kinds
            for t in thirds
        ]
        print(f"| {group} | " + " | ".join(f"{m:.1e}" for m in means) + " |")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for group, by in layers.items():
            xs = sorted(by)
            ax.semilogy(xs, [statistics.mean(by[x]) for x in xs], "o-", markersize=3, label=group)
        ax.set(xlabel="layer", ylabel="interference (mean of gate, up, down)")
        ax.legend(fontsize=7)
        fig.savefig(png, dpi=150, bbox_inches="tight")


if __name__ == "__main__":
    main(sys.argv[1])
    if "--by-layer" in sys.argv:
        rest = sys.argv[sys.argv.index("--by-layer") + 1 :]
        by_layer(sys.argv[1], rest[0] if rest else None)
