"""Build data/reasoning/{train,test}.jsonl: short problems in GSM8K's layout that SmolLM2-135M-Instruct can learn
with SVF (a scaling of the singular values of its MLP matrices).

Three types, each answered in two short steps and a last line `#### N`, as GSM8K answers end:
  arithmetic  "What is 47 + 38?"                       -> "47 + 30 = 77\\n77 + 8 = 85\\n#### 85"
  conversion  "How many centimeters are in 7 meters?"  -> "1 meter = 100 centimeters\\n7 * 100 = 700\\n#### 700"
  word        "Mia has 23 apples. She buys 15 more. How many apples does she have now?"
                                                       -> "23 + 10 = 33\\n33 + 5 = 38\\n#### 38"
Additions and subtractions are split into tens then ones: the base model gets two-digit sums wrong in one go.

The splits share no question and no operand pair: each item is keyed by its unordered operand pair (47 + 38,
38 + 47, 47 - 38 and "38 boxes of 47" all have the key (38, 47)) and a hash of that key alone sends it to the
train or the test pool, for every type at once. Both properties are asserted before writing.

Run: python data/reasoning/prepare.py   (deterministic, seed 0; rewrites train.jsonl and test.jsonl beside it)
"""
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
SEED = 0
TEST_PER_TYPE = 100
# conversion: about all of its train pool; word: 680 asked, 602 given (mul and div run out at 63 each)
TRAIN = {"arithmetic": 900, "conversion": 480, "word": 680}
TEST_SHARE = 4  # one operand pair in 4 goes to the test pool

# (unit, plural, smaller unit plural, factor, values): decimal factors take values up to 50, the others up to 12
# so that the multiplication stays within times tables
UNITS = [("meter", "meters", "centimeters", 100, 50), ("dollar", "dollars", "cents", 100, 50),
         ("kilometer", "kilometers", "meters", 1000, 50), ("kilogram", "kilograms", "grams", 1000, 50),
         ("liter", "liters", "milliliters", 1000, 50), ("hour", "hours", "minutes", 60, 12),
         ("minute", "minutes", "seconds", 60, 12), ("day", "days", "hours", 24, 12), ("week", "weeks", "days", 7, 12),
         ("foot", "feet", "inches", 12, 12), ("year", "years", "months", 12, 12), ("yard", "yards", "feet", 3, 12)]
NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Omar", "he"),
         ("Lily", "she"), ("Ben", "he"), ("Nora", "she"), ("Raj", "he"), ("Emma", "she"), ("Tom", "he")]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "stamps", "coins"]
WORD_TEMPLATES = {
    "add": ["{name} has {a} {items}. {Pron} buys {b} more. How many {items} does {pron} have now?",
            "{name} collected {a} {items} on Monday and {b} on Tuesday. How many {items} did {pron} collect in all?"],
    "sub": ["{name} had {a} {items} and gave {b} to a friend. How many {items} does {pron} have left?",
            "There were {a} {items} in a box. {name} took {b} of them. How many {items} are still in the box?"],
    "mul": ["{name} buys {a} bags with {b} {items} in each bag. How many {items} does {pron} buy?"],
    "div": ["{name} shares {c} {items} equally among {a} friends. How many {items} does each friend get?"],
}
OPS = {"+": lambda x, y: (x + y, 0), "-": lambda x, y: (x - y, 0), "*": lambda x, y: (x * y, 0), "/": divmod}
WORD_MIX = {"add": 0.35, "sub": 0.35, "mul": 0.15, "div": 0.15}  # share of each operation in the word problems


def in_test(key: tuple[int, int]) -> bool:
    """The split is a function of the operand pair alone (sha256: Python's hash() of str is salted per run)."""
    return hashlib.sha256(f"{key[0]},{key[1]}".encode()).digest()[0] % TEST_SHARE == 0


def tens_then_ones(a: int, op: str, b: int) -> str:
    tens, ones = b - b % 10, b % 10
    step = a + tens if op == "+" else a - tens
    result = step + ones if op == "+" else step - ones
    return f"{a} {op} {tens} = {step}\n{step} {op} {ones} = {result}\n#### {result}"


def item(kind: str, question: str, answer: str, x: int, y: int, op: str) -> dict:
    return {"question": question, "answer": answer, "type": kind, "op": op, "operands": sorted([x, y])}


def arithmetic() -> list[dict]:
    out = []
    for a in range(10, 100):
        for b in range(10, 100):
            out.append(item("arithmetic", f"What is {a} + {b}?", tens_then_ones(a, "+", b), a, b, "add"))
            if a > b:
                out.append(item("arithmetic", f"What is {a} - {b}?", tens_then_ones(a, "-", b), a, b, "sub"))
    return out


def conversion() -> list[dict]:
    out = []
    for unit, units, small, factor, top in UNITS:
        for v in range(2, top + 1):
            big = v * factor
            out.append(item("conversion", f"How many {small} are in {v} {units}?",
                            f"1 {unit} = {factor} {small}\n{v} * {factor} = {big}\n#### {big}", v, factor, "mul"))
            out.append(item("conversion", f"How many {units} are in {big} {small}?",
                            f"{factor} {small} = 1 {unit}\n{big} / {factor} = {v}\n#### {v}", v, factor, "div"))
    return out


def word(rng: random.Random) -> list[dict]:
    out = []
    pairs = {"add": [(a, b) for a in range(10, 100) for b in range(10, 100)],
             "sub": [(a, b) for a in range(10, 100) for b in range(10, 100) if a > b],
             "mul": [(a, b) for a in range(2, 10) for b in range(2, 13)],
             "div": [(a, b) for a in range(2, 10) for b in range(2, 13)]}
    for op, candidates in pairs.items():
        for a, b in candidates:
            (name, pron), items = rng.choice(NAMES), rng.choice(ITEMS)
            q = rng.choice(WORD_TEMPLATES[op]).format(name=name, pron=pron, Pron=pron.capitalize(), items=items,
                                                      a=a, b=b, c=a * b)
            if op in ("add", "sub"):
                ans = tens_then_ones(a, "+" if op == "add" else "-", b)
            elif op == "mul":
                ans = f"{a} bags of {b} {items}\n{a} * {b} = {a * b}\n#### {a * b}"
            else:
                ans = f"{a * b} {items} shared by {a}\n{a * b} / {a} = {b}\n#### {b}"
            out.append(item("word", q, ans, a, b, op))
    return out


def take(rng: random.Random, pool: list[dict], n: int, by_op: dict | None = None) -> list[dict]:
    """n items from pool, with each operation's share from by_op when given."""
    if by_op is None:
        return rng.sample(pool, min(n, len(pool)))
    picked = []
    for op, share in by_op.items():
        ops = [r for r in pool if r["op"] == op]
        picked += rng.sample(ops, min(round(n * share), len(ops)))
    return picked


def main():
    rng = random.Random(SEED)
    train, test = [], []
    for kind, items in (("arithmetic", arithmetic()), ("conversion", conversion()), ("word", word(rng))):
        test_pool = [r for r in items if in_test(tuple(r["operands"]))]
        train_pool = [r for r in items if not in_test(tuple(r["operands"]))]
        mix = {"add": 0.5, "sub": 0.5} if kind == "arithmetic" else WORD_MIX if kind == "word" else None
        test += take(rng, test_pool, TEST_PER_TYPE, mix)
        train += take(rng, train_pool, TRAIN[kind], mix)
    rng.shuffle(train)
    rng.shuffle(test)

    # the properties the README promises, checked on what is written
    train_q, test_q = Counter(r["question"] for r in train), Counter(r["question"] for r in test)
    assert max(train_q.values()) == 1 and max(test_q.values()) == 1, "a question repeats within a split"
    assert not set(train_q) & set(test_q), "a question is in both splits"
    train_keys, test_keys = {tuple(r["operands"]) for r in train}, {tuple(r["operands"]) for r in test}
    assert not train_keys & test_keys, "an operand pair is in both splits"
    assert Counter(r["type"] for r in test) == {k: TEST_PER_TYPE for k in TRAIN}, Counter(r["type"] for r in test)
    for r in train + test:  # two steps, and the last one really computes the final number
        *steps, final = r["answer"].split("\n")
        x, op, y, _, z = steps[-1].split()
        assert len(steps) == 2 and final == f"#### {z}" and OPS[op](int(x), int(y)) == (int(z), 0), r

    for name, rows in (("train", train), ("test", test)):
        with open(HERE / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}.jsonl: {len(rows)} items, {dict(sorted(Counter(r['type'] for r in rows).items()))}, "
              f"ops {dict(sorted(Counter(r['op'] for r in rows).items()))}")


if __name__ == "__main__":
    main()
