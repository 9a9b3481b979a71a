"""Build data/reasoning/{train,test,test_ood}.jsonl: short problems in GSM8K's layout that
SmolLM2-135M-Instruct can learn with SVF (a scaling of the singular values of its MLP matrices).

Three types, each answered in two short steps and a last line `#### N`, as GSM8K answers end:
  arithmetic  "What is 47 + 38?"                       -> "47 + 30 = 77\\n77 + 8 = 85\\n#### 85"
  conversion  "How many centimeters are in 7 meters?"  -> "1 meter = 100 centimeters\\n7 * 100 = 700
                                                           \\n#### 700"
  word        "Mia has 23 apples. She buys 15 more. How many apples does she have now?"
                                                       -> "23 + 10 = 33\\n33 + 5 = 38\\n#### 38"
Additions and subtractions are split into tens then ones: the base model gets two-digit sums wrong
in one go.

train and test share no question and no operand pair: each item is keyed by its unordered operand
pair (47 + 38, 38 + 47, 47 - 38 and "38 boxes of 47" all have the key (38, 47)) and a hash of that
key alone sends it to the train or the test pool, for every type at once.

test_ood is the held-out-template split: 50 items per type whose sentence frames (and, for word
problems, people, objects, scenarios and verbs) are in neither train nor test ("Compute 47 minus
19.", "Convert 7 meters to centimeters.", "A jar held 63 candles. Priya used 28 of them for a
project. How many candles remain in the jar?"), with operand pairs from the test pool and answers in
the same layout, so that it measures the skill rather than its phrasing. Its own RNG stream
(OOD_SEED) leaves train and test as they were. All these properties are asserted before writing.

confirm.jsonl and confirm_ood.jsonl are the locked confirmation splits: test rows 101-300 and
test_ood rows 101-150, items no choice was ever made on (selection scores the first 100 of each, as
`--limit 100` reads them). Headline figures are scored on them; nothing is chosen on them.

Run: python data/reasoning/prepare.py   (deterministic, seeds 0 and 1; rewrites the five files)
"""

import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for tasks.py
import tasks  # noqa: E402

SEED = 0
TEST_PER_TYPE = 100
# conversion: about all of its train pool; word: 680 asked, 602 given (mul, div run out at 63 each)
TRAIN = {"arithmetic": 900, "conversion": 480, "word": 680}
TEST_SHARE = 4  # one operand pair in 4 goes to the test pool

# fmt: off
# (unit, plural, smaller unit plural, factor, values): decimal factors take values up to 50, the
# others up to 12 so that the multiplication stays within times tables
UNITS = [("meter", "meters", "centimeters", 100, 50), ("dollar", "dollars", "cents", 100, 50),
         ("kilometer", "kilometers", "meters", 1000, 50),
         ("kilogram", "kilograms", "grams", 1000, 50),
         ("liter", "liters", "milliliters", 1000, 50), ("hour", "hours", "minutes", 60, 12),
         ("minute", "minutes", "seconds", 60, 12), ("day", "days", "hours", 24, 12),
         ("week", "weeks", "days", 7, 12), ("foot", "feet", "inches", 12, 12),
         ("year", "years", "months", 12, 12), ("yard", "yards", "feet", 3, 12)]
NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"),
         ("Omar", "he"), ("Lily", "she"), ("Ben", "he"), ("Nora", "she"), ("Raj", "he"),
         ("Emma", "she"), ("Tom", "he")]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells",
         "stamps", "coins"]
WORD_TEMPLATES = {
    "add": ["{name} has {a} {items}. {Pron} buys {b} more. How many {items} does {pron} have now?",
            "{name} collected {a} {items} on Monday and {b} on Tuesday. "
            "How many {items} did {pron} collect in all?"],
    "sub": ["{name} had {a} {items} and gave {b} to a friend. "
            "How many {items} does {pron} have left?",
            "There were {a} {items} in a box. {name} took {b} of them. "
            "How many {items} are still in the box?"],
    "mul": ["{name} buys {a} bags with {b} {items} in each bag. How many {items} does {pron} buy?"],
    "div": ["{name} shares {c} {items} equally among {a} friends. "
            "How many {items} does each friend get?"],
}
OPS = {"+": lambda x, y: (x + y, 0), "-": lambda x, y: (x - y, 0), "*": lambda x, y: (x * y, 0),
       "/": divmod}
WORD_MIX = {"add": 0.35, "sub": 0.35, "mul": 0.15, "div": 0.15}  # share of each op in word problems

# test_ood: (type, op) -> (count, frames); {a} {b} operands, {c} = a * b, {v} {big} conversion
# values; a multiplication frame comes with the container its answer's first line names
OOD_SEED = 1
OOD_FRAMES = {
    ("arithmetic", "add"): (25, ["Compute {a} plus {b}.", "What is the sum of {a} and {b}?",
                                 "Add {a} and {b}. What is the total?"]),
    ("arithmetic", "sub"): (25, ["Compute {a} minus {b}.",
                                 "Subtract {b} from {a}. What do you get?",
                                 "What is the difference between {a} and {b}?"]),
    ("conversion", "mul"): (25, ["Convert {v} {units} to {small}.",
                                 "{v} {units} equals how many {small}?"]),
    ("conversion", "div"): (25, ["Convert {big} {small} to {units}.",
                                 "Express {big} {small} in {units}."]),
    ("word", "add"): (17, ["{name} packed {a} {things} into a crate and then added another {b}. "
                           "How many {things} are in the crate?",
                           "A shop sold {a} {things} before lunch and {b} after lunch. "
                           "How many {things} did the shop sell that day?"]),
    ("word", "sub"): (17, ["{name} needs {a} {things} and already owns {b}. "
                           "How many more {things} does {pron} need?",
                           "A jar held {a} {things}. {name} used {b} of them for a project. "
                           "How many {things} remain in the jar?"]),
    ("word", "mul"): (8, [("shelves", "Each of {a} shelves holds {b} {things}. "
                                      "How many {things} are on the shelves?"),
                          ("tables", "{name} sets up {a} tables and puts {b} {things} on every "
                                     "table. How many {things} is that in total?")]),
    ("word", "div"): (8, ["{name} splits {c} {things} into {a} equal piles. "
                          "How many {things} go in each pile?",
                          "{c} {things} are packed evenly into {a} boxes. "
                          "How many {things} does each box hold?"]),
}
OOD_NAMES = [("Priya", "she"), ("Hugo", "he"), ("Ines", "she"), ("Kwame", "he"), ("Yuki", "she"),
             ("Dmitri", "he"), ("Lucia", "she"), ("Mateo", "he"), ("Amara", "she"), ("Felix", "he")]
OOD_THINGS = ["tickets", "buttons", "bricks", "balloons", "candles", "ribbons", "crayons",
              "postcards", "tomatoes", "feathers"]
# fmt: on


def in_test(key: tuple[int, int]) -> bool:
    """The split is a function of the operand pair alone (sha256: str hash() is salted per run)."""
    return hashlib.sha256(f"{key[0]},{key[1]}".encode()).digest()[0] % TEST_SHARE == 0


def tens_then_ones(a: int, op: str, b: int) -> str:
    tens, ones = b - b % 10, b % 10
    step = a + tens if op == "+" else a - tens
    result = step + ones if op == "+" else step - ones
    return f"{a} {op} {tens} = {step}\n{step} {op} {ones} = {result}\n#### {result}"


def item(kind: str, question: str, answer: str, x: int, y: int, op: str) -> dict:
    return {
        "question": question,
        "answer": answer,
        "type": kind,
        "op": op,
        "operands": sorted([x, y]),
    }


def arithmetic() -> list[dict]:
    out = []
    for a in range(10, 100):
        for b in range(10, 100):
            out.append(
                item("arithmetic", f"What is {a} + {b}?", tens_then_ones(a, "+", b), a, b, "add")
            )
            if a > b:
                out.append(
                    item(
                        "arithmetic", f"What is {a} - {b}?", tens_then_ones(a, "-", b), a, b, "sub"
                    )
                )
    return out


def conversion() -> list[dict]:
    out = []
    for unit, units, small, factor, top in UNITS:
        for v in range(2, top + 1):
            big = v * factor
            out.append(
                item(
                    "conversion",
                    f"How many {small} are in {v} {units}?",
                    f"1 {unit} = {factor} {small}\n{v} * {factor} = {big}\n#### {big}",
                    v,
                    factor,
                    "mul",
                )
            )
            out.append(
                item(
                    "conversion",
                    f"How many {units} are in {big} {small}?",
                    f"{factor} {small} = 1 {unit}\n{big} / {factor} = {v}\n#### {v}",
                    v,
                    factor,
                    "div",
                )
            )
    return out


def word(rng: random.Random) -> list[dict]:
    out = []
    pairs = {
        "add": [(a, b) for a in range(10, 100) for b in range(10, 100)],
        "sub": [(a, b) for a in range(10, 100) for b in range(10, 100) if a > b],
        "mul": [(a, b) for a in range(2, 10) for b in range(2, 13)],
        "div": [(a, b) for a in range(2, 10) for b in range(2, 13)],
    }
    for op, candidates in pairs.items():
        for a, b in candidates:
            (name, pron), items = rng.choice(NAMES), rng.choice(ITEMS)
            q = rng.choice(WORD_TEMPLATES[op]).format(
                name=name, pron=pron, Pron=pron.capitalize(), items=items, a=a, b=b, c=a * b
            )
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


def ood_item(rng: random.Random, kind: str, op: str, frame, a: int, b: int) -> dict:
    """One held-out-template item; for a conversion, a is the value and b the unit's UNITS index."""
    if kind == "arithmetic":
        answer = tens_then_ones(a, "+" if op == "add" else "-", b)
        return item(kind, frame.format(a=a, b=b), answer, a, b, op) | {"template": frame}
    if kind == "conversion":
        unit, units, small, factor, _ = UNITS[b]
        big = a * factor
        q = frame.format(v=a, big=big, units=units, small=small)
        if op == "mul":
            answer = f"1 {unit} = {factor} {small}\n{a} * {factor} = {big}\n#### {big}"
        else:
            answer = f"{factor} {small} = 1 {unit}\n{big} / {factor} = {a}\n#### {a}"
        return item(kind, q, answer, a, factor, op) | {"template": frame}
    (name, pron), things = rng.choice(OOD_NAMES), rng.choice(OOD_THINGS)
    container, frame = frame if op == "mul" else ("", frame)
    q = frame.format(name=name, pron=pron, things=things, a=a, b=b, c=a * b)
    if op in ("add", "sub"):
        answer = tens_then_ones(a, "+" if op == "add" else "-", b)
    elif op == "mul":
        answer = f"{a} {container} of {b} {things}\n{a} * {b} = {a * b}\n#### {a * b}"
    else:
        answer = f"{a * b} {things} shared by {a}\n{a * b} / {a} = {b}\n#### {b}"
    return item(kind, q, answer, a, b, op) | {"template": frame}


def ood(rng: random.Random) -> list[dict]:
    """test_ood.jsonl: OOD_FRAMES' counts, operand pairs from the test pool only (none is in train),
    each op's frames used in turn."""
    two_digit = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    tables = [(a, b) for a in range(2, 10) for b in range(2, 13)]
    units = [(v, i) for i, u in enumerate(UNITS) for v in range(2, u[4] + 1)]
    sub = [(a, b) for a, b in two_digit if a > b]
    pairs = {"add": two_digit, "sub": sub, "mul": tables, "div": tables}
    out = []
    for (kind, op), (n, frames) in OOD_FRAMES.items():
        if kind == "conversion":
            pool = [(v, i) for v, i in units if in_test(tuple(sorted((v, UNITS[i][3]))))]
        else:
            pool = [(a, b) for a, b in pairs[op] if in_test(tuple(sorted((a, b))))]
        for k, (a, b) in enumerate(rng.sample(pool, n)):
            out.append(ood_item(rng, kind, op, frames[k % len(frames)], a, b))
    rng.shuffle(out)
    return out


def frame_of(question: str) -> str:
    """The sentence frame: numbers, names, pronouns, objects and units replaced by placeholders."""
    names = [n.lower() for pair in NAMES + OOD_NAMES for n in pair]
    vocab = {*ITEMS, *OOD_THINGS, *names, *(w for u in UNITS for w in u[:3])}
    words = question.replace("?", " ?").replace(".", " .").split()
    return " ".join("N" if w.isdigit() else "X" if w.lower() in vocab else w for w in words)


N_SELECT = 100  # the first items of test and test_ood: the selection split (--limit 100)


def main():
    rng = random.Random(SEED)
    train, test = [], []
    mixes = {"arithmetic": {"add": 0.5, "sub": 0.5}, "conversion": None, "word": WORD_MIX}
    for kind, items in (
        ("arithmetic", arithmetic()),
        ("conversion", conversion()),
        ("word", word(rng)),
    ):
        test_pool = [r for r in items if in_test(tuple(r["operands"]))]
        train_pool = [r for r in items if not in_test(tuple(r["operands"]))]
        test += take(rng, test_pool, TEST_PER_TYPE, mixes[kind])
        train += take(rng, train_pool, TRAIN[kind], mixes[kind])
    rng.shuffle(train)
    rng.shuffle(test)
    test_ood = ood(random.Random(OOD_SEED))

    # the properties the README promises, checked on what is written
    questions = [r["question"] for r in train + test + test_ood]
    assert len(set(questions)) == len(questions), "a question repeats"
    train_keys = {tuple(r["operands"]) for r in train}
    assert not train_keys & {tuple(r["operands"]) for r in test + test_ood}, "a pair is in train"
    per_type = {"test": TEST_PER_TYPE, "test_ood": TEST_PER_TYPE // 2}
    for name, rows in (("test", test), ("test_ood", test_ood)):
        assert Counter(r["type"] for r in rows) == {k: per_type[name] for k in TRAIN}, name
    seen = {frame_of(r["question"]) for r in train + test}
    assert not seen & {frame_of(r["question"]) for r in test_ood}, "a test_ood frame is seen"
    for r in train + test + test_ood:  # two steps, the last one computes the final number
        *steps, final = r["answer"].split("\n")
        x, op, y, _, z = steps[-1].split()
        assert len(steps) == 2 and final == f"#### {z}", r
        assert OPS[op](int(x), int(y)) == (int(z), 0), r

    splits = {"train": train, "test": test, "test_ood": test_ood}
    splits |= {"confirm": test[N_SELECT:], "confirm_ood": test_ood[N_SELECT:]}
    for name, rows in splits.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        tasks.atomic_write_text(HERE / f"{name}.jsonl", text)
        kinds = dict(sorted(Counter(r["type"] for r in rows).items()))
        ops = dict(sorted(Counter(r["op"] for r in rows).items()))
        print(f"{name}.jsonl: {len(rows)} items, {kinds}, ops {ops}")


if __name__ == "__main__":
    main()
