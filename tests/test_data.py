"""data/: each prepare.py reproduces its committed files byte for byte (data/known: the split, which
needs no model), and the committed sets keep the promises their READMEs make, checked from the files
themselves: disjoint reasoning splits, a held-out-template split that shares no sentence frame with
train/test, unique fact questions, no answer shared by the two fact sets, known facts split in two
disjoint halves. CPU, seconds.
"""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import tasks

DATA = Path(__file__).parents[1] / "data"


def load_prepare(name: str):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", DATA / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name: str, split: str) -> list[dict]:
    path = DATA / name / f"{split}.jsonl"
    return tasks.read_jsonl(path)


# -----------------------------------------------------------------------------
# the generators reproduce the committed files


@pytest.mark.parametrize(
    "name, files",
    [
        ("reasoning", ["train", "test", "test_ood", "confirm", "confirm_ood"]),
        ("facts", ["facts", "facts_heldout", "facts_scale", "facts_confirm"]),
    ],
)
def test_prepare_reproduces_the_committed_files(name, files, tmp_path, monkeypatch):
    prepare = load_prepare(name)
    monkeypatch.setattr(prepare, "HERE", tmp_path)
    prepare.main()
    for f in files:
        made, committed = tmp_path / f"{f}.jsonl", DATA / name / f"{f}.jsonl"
        assert made.read_bytes() == committed.read_bytes(), f"{name}/{f}.jsonl differs"


def test_known_split_reproduces_the_committed_files(tmp_path):
    prepare = load_prepare("known")
    known = tmp_path / "known_facts.jsonl"
    known.write_bytes((DATA / "known" / "known_facts.jsonl").read_bytes())
    prepare.main(["--split-only", "--out", str(known)])
    for f in ("known_eval", "known_mix"):
        made, committed = tmp_path / f"{f}.jsonl", DATA / "known" / f"{f}.jsonl"
        assert made.read_bytes() == committed.read_bytes(), f"known/{f}.jsonl differs"


# -----------------------------------------------------------------------------
# reasoning


def operand_pair(r) -> tuple[int, int]:
    """The operand pair recomputed from the text, independently of the generator's "operands"."""
    steps = r["answer"].split("\n")
    x, op, y, _, z = steps[-2].split()
    if op == "*":
        return tuple(sorted((int(x), int(y))))
    if op == "/":  # dividend / divisor = quotient: the pair is (divisor, quotient)
        return tuple(sorted((int(y), int(z))))
    numbers = re.findall(r"\d+", r["question"])  # the two numbers added or subtracted
    return tuple(sorted(int(n) for n in numbers))


def computes(answer: str) -> bool:
    """The last step "x op y = z" is exact arithmetic and the last line is "#### z"."""
    *_, step, final = answer.split("\n")
    x, op, y, _, z = step.split()
    x, y, z = int(x), int(y), int(z)
    exact = {"+": x + y == z, "-": x - y == z, "*": x * y == z, "/": x == y * z}
    return exact[op] and final == f"#### {z}"


def test_reasoning_splits_do_not_overlap():
    train, test, ood = (
        read("reasoning", "train"),
        read("reasoning", "test"),
        read("reasoning", "test_ood"),
    )
    for rows, split in ((train, "train"), (test, "test"), (ood, "test_ood")):
        tasks.check_reasoning(rows, DATA / "reasoning" / f"{split}.jsonl")
    types = ("arithmetic", "conversion", "word")
    assert Counter(r["type"] for r in test) == {t: 100 for t in types}
    assert Counter(r["type"] for r in ood) == {t: 50 for t in types}
    assert 1500 <= len(train) <= 2500
    for r in train + test + ood:
        assert len(r["answer"].split("\n")) == 3
        assert tasks.score_reasoning(r["answer"], r["answer"])["strict"]
        assert operand_pair(r) == tuple(r["operands"]), r
        assert computes(r["answer"]), r
    questions = [r["question"] for r in train + test + ood]
    assert len(set(questions)) == len(questions)
    train_pairs = {operand_pair(r) for r in train}
    assert not train_pairs & {operand_pair(r) for r in test}
    assert not train_pairs & {operand_pair(r) for r in ood}


def words(question: str) -> list[str]:
    """Lowercased words and punctuation, every number as N."""
    return re.findall(r"[a-z']+|[?.,]|N", re.sub(r"\d+", "N", question).lower())


def test_held_out_split_shares_no_template_with_train_or_test():
    """From the data: a question's frame is its words with numbers, people, pronouns, objects and
    units replaced by placeholders; no test_ood frame is a train/test frame, and, with no vocabulary
    at all, no run of 4 words (numbers as N) of a test_ood question occurs in train or test."""
    prepare = load_prepare("reasoning")
    entities = [*prepare.ITEMS, *prepare.OOD_THINGS, *(w for u in prepare.UNITS for w in u[:3])]
    entities += [w for pair in prepare.NAMES + prepare.OOD_NAMES for w in pair]
    entities = {w.lower() for w in entities}

    def frame(q):
        return " ".join("X" if w in entities else w for w in words(q))

    seen = read("reasoning", "train") + read("reasoning", "test")
    ood = read("reasoning", "test_ood")
    seen_frames, ood_frames = (
        {frame(r["question"]) for r in seen},
        {frame(r["question"]) for r in ood},
    )
    assert len(seen_frames) < 20 and len(ood_frames) < 30  # the placeholders did catch the entities
    assert not seen_frames & ood_frames

    def runs(q, n=4):
        w = words(q)
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    seen_runs = set().union(*(runs(r["question"]) for r in seen))
    shared = {g for r in ood for g in runs(r["question"]) if g in seen_runs}
    assert not shared, sorted(shared)[:5]


# -----------------------------------------------------------------------------
# facts


@pytest.mark.parametrize("split, n", [("facts", 240), ("facts_heldout", 100)])
def test_facts_are_unique_and_not_over_represented(split, n):
    facts = read("facts", split)
    tasks.check_facts(facts, DATA / "facts" / f"{split}.jsonl")
    assert len(facts) == n
    asked = [q for f in facts for q in [f["question"], *f["paraphrases"]]]
    assert len(set(asked)) == len(asked)  # paraphrases are new phrasings, never another's question
    assert all(len(f["paraphrases"]) == 2 for f in facts)
    assert max(Counter(f["answer"] for f in facts).values()) <= 3
    assert len({(f["type"], f["entity"]) for f in facts}) == len(facts)
    for f in facts:  # the statement states the fact, and the scorer reads it as correct
        assert f["entity"] in f["text"] and tasks.fact_correct(f["text"], f["answer"])
        assert all(f["entity"] in p for p in f["paraphrases"])
    years = sorted(int(f["answer"]) for f in facts if f["answer"].isdigit())
    assert years[0] < 1700 and years[-1] > 1900  # spread out: no guessable era


def test_the_two_fact_sets_share_no_relation_answer_or_name():
    facts, heldout = read("facts", "facts"), read("facts", "facts_heldout")
    assert not {f["type"] for f in facts} & {f["type"] for f in heldout}
    assert len({f["type"] for f in heldout}) >= 5  # not only capitals
    assert not {f["answer"] for f in facts} & {f["answer"] for f in heldout}
    asked = [q for f in facts + heldout for q in [f["question"], *f["paraphrases"]]]
    assert len(set(asked)) == len(asked)

    def name_words(rows):
        names = {n for f in rows for n in (f["entity"], f["answer"]) if not n.isdigit()}
        return Counter(w for n in names for w in n.split())

    a, b = name_words(facts), name_words(heldout)
    # a word in several names of one set is a kind (Labs, River, Mount); any other word is a name
    # part, and no name part of one set may be in the other
    shared = {w for w in set(a) & set(b) if a[w] == 1 and b[w] == 1}
    assert not shared, shared


# -----------------------------------------------------------------------------
# known facts


def test_known_facts_are_highly_known():
    known = read("known", "known_facts")
    tasks.check_facts(known, DATA / "known" / "known_facts.jsonl")
    assert len(known) >= 30 and all(r["fewshot_correct"] == 4 for r in known)
    injected = read("facts", "facts") + read("facts", "facts_heldout")
    assert not {r["question"] for r in known} & {f["question"] for f in injected}


def test_known_split_is_disjoint_and_keeps_capitals_for_locality():
    lines = {
        s: (DATA / "known" / f"{s}.jsonl").read_text().splitlines()
        for s in ("known_facts", "known_eval", "known_mix")
    }
    evaluation, mix = set(lines["known_eval"]), set(lines["known_mix"])
    assert not evaluation & mix
    assert sorted(lines["known_eval"] + lines["known_mix"]) == sorted(lines["known_facts"])
    evaluation, mix = read("known", "known_eval"), read("known", "known_mix")
    capitals = [r for r in read("known", "known_facts") if "capital" in r["question"].lower()]
    assert capitals and {r["question"] for r in capitals} <= {r["question"] for r in evaluation}
    assert min(len(evaluation), len(mix)) >= 30
    assert {r["type"] for r in mix} >= {"language", "general"}


def test_known_mix_and_eval_share_no_frame_with_an_answer():
    """Issue 25: "What is the official language of X?" -> Spanish was trained in known_mix and
    reported in known_eval; no (question frame, answer) pair may be on both sides."""
    prepare = load_prepare("known")

    def pairs(split):
        return {
            (prepare.frame(r["question"]), tasks.normalize_answer(r["answer"]))
            for r in read("known", split)
        }

    assert prepare.frame("What is the official language of Chile?") == prepare.QUESTION["language"]
    shared = pairs("known_mix") & pairs("known_eval")
    assert not shared, shared


def test_known_new_only_keeps_the_earlier_lines_byte_for_byte(tmp_path, monkeypatch):
    """--new-only adds the second round's kept facts after the file's own lines, untouched (no
    model: loading and labelling are replaced by stand-ins)."""
    prepare = load_prepare("known")
    out = tmp_path / "known_facts.jsonl"
    earlier = (DATA / "known" / "known_facts.jsonl").read_text().splitlines(keepends=True)[:5]
    out.write_text("".join(earlier))
    new = {"question": "Q?", "answer": "A", "type": "general", "fewshot_correct": 4}
    monkeypatch.setattr(prepare.model, "load", lambda ckpt: (None, None))
    monkeypatch.setattr(prepare, "label", lambda net, tok, facts, bs: [new])
    prepare.main(["--new-only", "--out", str(out)])
    assert out.read_text() == "".join(earlier) + json.dumps(new) + "\n"
    halves = (tmp_path / "known_eval.jsonl").read_text() + (
        tmp_path / "known_mix.jsonl"
    ).read_text()
    assert sorted(halves.splitlines()) == sorted(out.read_text().splitlines())


# -----------------------------------------------------------------------------
# known facts of the injected relations (data/known/relations.py)


def load_relations():
    path = DATA / "known" / "relations.py"
    spec = importlib.util.spec_from_file_location("known_relations", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_known_relations_split_reproduces_the_committed_files(tmp_path):
    """known_protect/known_confirm follow from the labelled candidates (and the older split they
    keep clear of) without a model, byte for byte."""
    relations = load_relations()
    for f in ("known_relations", "known_mix", "known_eval"):
        (tmp_path / f"{f}.jsonl").write_bytes((DATA / "known" / f"{f}.jsonl").read_bytes())
    relations.main(["--split-only", "--out", str(tmp_path / "known_relations.jsonl")])
    for f in ("known_protect", "known_confirm", "known_keep"):
        made, committed = tmp_path / f"{f}.jsonl", DATA / "known" / f"{f}.jsonl"
        assert made.read_bytes() == committed.read_bytes(), f"known/{f}.jsonl differs"


def test_known_relations_are_asked_in_the_injected_frames():
    relations, facts = load_relations(), load_prepare("facts")
    injected = {k: v[0] for k, v in {**facts.TEMPLATES, **facts.HELDOUT_TEMPLATES}.items()}
    assert relations.FRAMES == injected
    labelled = read("known", "known_relations")
    assert [{k: r[k] for k in ("question", "answer", "type", "entity")} for r in labelled] == (
        relations.candidates()
    )
    for r in labelled:
        assert r["question"] == relations.FRAMES[r["type"]].format(e=r["entity"])
        assert r["base_correct"] == tasks.fact_correct(r["base_answer"], r["answer"])


def test_known_protect_and_confirm_share_no_question_and_no_frame_with_an_answer():
    relations = load_relations()
    protect, confirm = read("known", "known_protect"), read("known", "known_confirm")

    def pairs(rows, by=lambda r: relations.frame(r["question"])):
        return {(by(r), tasks.normalize_answer(r["answer"])) for r in rows}

    assert not {r["question"] for r in protect} & {r["question"] for r in confirm}
    assert not pairs(protect) & pairs(confirm), pairs(protect) & pairs(confirm)
    assert all(r["base_correct"] for r in confirm)
    # every relation in both, where the base answers any of it (employer: none of 25)
    answered = {r["type"] for r in read("known", "known_relations") if r["base_correct"]}
    assert {r["type"] for r in protect} == set(relations.FRAMES)
    assert {r["type"] for r in confirm} == answered and len(answered) >= 15
    assert answered <= {r["type"] for r in protect if r["base_correct"]}
    # and clear of the older split: nothing reported here is trained by known_mix, nothing
    # protected here is reported by known_eval (same relation and answer, or the same question)
    mix, evaluation = read("known", "known_mix"), read("known", "known_eval")
    by_type = lambda r: r["type"]  # noqa: E731
    assert not pairs(confirm, by_type) & pairs(mix, by_type)
    assert not pairs(protect, by_type) & pairs(evaluation, by_type)
    assert not {r["question"] for r in confirm} & {r["question"] for r in mix}
    assert not {r["question"] for r in protect} & {r["question"] for r in evaluation}
