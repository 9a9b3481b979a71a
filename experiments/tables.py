"""Print an evaluate.py results.json as the README's markdown table and its paired intervals.

python experiments/tables.py runs/reproduce/eval/results.json
"""

import json
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


if __name__ == "__main__":
    main(sys.argv[1])
