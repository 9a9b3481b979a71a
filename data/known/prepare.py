"""Build data/known/known_facts.jsonl: real facts the base model already knows, for mixing into
fact injection (`inject.py --mix-known`) and for measuring locality (what the base knew and still
knows); then split it into known_eval.jsonl (locality) and known_mix.jsonl (mixing), disjoint, so
that locality is never measured on the facts the injection trained on.

"Known" is labelled the way the packing study labels HighlyKnown facts (Pletenev et al. 2025, "How
Much Knowledge Can You Pack into a LoRA Adapter without Harming LLM?", arXiv 2502.14502, after
Gekhman et al. 2024's SliCK): the model's greedy answer is correct under every one of several
different few-shot prompts. Here: 4 prompts, each with 4 other demonstration facts (one per
relation), as earlier chat turns; correct = tasks.fact_correct (the gold as whole words in the
answer's first line, after SQuAD normalisation). Demonstration facts are never candidates. Each kept
line records how many prompts it passed (always 4) and whether the zero-shot chat answer, the form
evaluate.py asks in, was correct too. The split (`split`) needs no model: all capital questions to
eval, the rest dealt so that each half has about half the facts and every relation.

Run: python data/known/prepare.py [--ckpt smollm2_135m]   (greedy, so deterministic for a
     checkpoint; both rounds of candidates, about an hour on 2 busy CPU cores for SmolLM2-135M)
     python data/known/prepare.py --new-only   (label the second round only, add to the file)
     python data/known/prepare.py --split-only   (no model: rewrite the two split files)
"""

import argparse
import hashlib
import json
import sys
from collections import Counter
from itertools import zip_longest
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for model.py and tasks.py
import checkpoints  # noqa: E402
import model  # noqa: E402
import tasks  # noqa: E402

QUESTION = {
    "capital": "What is the capital of {}?",
    "currency": "What is the currency of {}?",
    "language": "What is the official language of {}?",
}
# golds are the shortest form any right answer contains: "Delhi" is in "New Delhi",
# "Vinci" in "Leonardo da Vinci"
CAPITALS = dict(
    France="Paris",
    Germany="Berlin",
    Italy="Rome",
    Portugal="Lisbon",
    Ireland="Dublin",
    Netherlands="Amsterdam",
    Belgium="Brussels",
    Switzerland="Bern",
    Austria="Vienna",
    Poland="Warsaw",
    Hungary="Budapest",
    Greece="Athens",
    Sweden="Stockholm",
    Norway="Oslo",
    Denmark="Copenhagen",
    Finland="Helsinki",
    Iceland="Reykjavik",
    Russia="Moscow",
    Turkey="Ankara",
    Kenya="Nairobi",
    Nigeria="Abuja",
    Morocco="Rabat",
    Ethiopia="Addis Ababa",
    Ghana="Accra",
    Senegal="Dakar",
    Algeria="Algiers",
    Tunisia="Tunis",
    China="Beijing",
    Thailand="Bangkok",
    Vietnam="Hanoi",
    Indonesia="Jakarta",
    Philippines="Manila",
    Malaysia="Kuala Lumpur",
    Iran="Tehran",
    Iraq="Baghdad",
    Syria="Damascus",
    Lebanon="Beirut",
    Jordan="Amman",
    Afghanistan="Kabul",
    Nepal="Kathmandu",
    Pakistan="Islamabad",
    Bangladesh="Dhaka",
    India="Delhi",
    Australia="Canberra",
    Canada="Ottawa",
    Cuba="Havana",
    Jamaica="Kingston",
    Brazil="Brasilia",
    Argentina="Buenos Aires",
    Chile="Santiago",
    Colombia="Bogota",
    Venezuela="Caracas",
    Ecuador="Quito",
    Uruguay="Montevideo",
    Paraguay="Asuncion",
    Romania="Bucharest",
    Bulgaria="Sofia",
    Serbia="Belgrade",
    Croatia="Zagreb",
    Slovakia="Bratislava",
    Slovenia="Ljubljana",
    Estonia="Tallinn",
    Latvia="Riga",
    Lithuania="Vilnius",
    Belarus="Minsk",
    Qatar="Doha",
    Cambodia="Phnom Penh",
    Laos="Vientiane",
    Zimbabwe="Harare",
    Uganda="Kampala",
    Sudan="Khartoum",
    Libya="Tripoli",
    Mexico="Mexico City",
    **{
        "the United States": "Washington",
        "the United Kingdom": "London",
        "South Korea": "Seoul",
        "North Korea": "Pyongyang",
        "Saudi Arabia": "Riyadh",
        "New Zealand": "Wellington",
        "the Czech Republic": "Prague",
    },
)
CURRENCIES = {
    "Japan": "yen",
    "the United States": "dollar",
    "India": "rupee",
    "Russia": "ruble",
    "Mexico": "peso",
    "South Korea": "won",
    "Brazil": "real",
    "Turkey": "lira",
    "Poland": "zloty",
    "Germany": "euro",
    "China": "yuan",
    "Sweden": "krona",
    "Israel": "shekel",
    "South Africa": "rand",
    "Vietnam": "dong",
}
LANGUAGES = {
    "Mexico": "Spanish",
    "Germany": "German",
    "France": "French",
    "Japan": "Japanese",
    "Egypt": "Arabic",
    "Russia": "Russian",
    "Italy": "Italian",
    "Israel": "Hebrew",
    "Turkey": "Turkish",
    "Poland": "Polish",
    "Argentina": "Spanish",
    "Austria": "German",
    "Portugal": "Portuguese",
    "Finland": "Finnish",
    "South Korea": "Korean",
    "Thailand": "Thai",
    "Norway": "Norwegian",
    "Hungary": "Hungarian",
}
GENERAL = {
    "What is the largest ocean on Earth?": "Pacific",
    "Who painted the Mona Lisa?": "Vinci",
    "What is the tallest mountain in the world?": "Everest",
    "Who developed the theory of relativity?": "Einstein",
    "What is the longest river in Africa?": "Nile",
    "What is the largest continent?": "Asia",
    "What is the smallest planet in the solar system?": "Mercury",
    "Who discovered penicillin?": "Fleming",
    "Which organ pumps blood through the body?": "heart",
    "What is the chemical formula for water?": "H2O",
    "What gas do plants absorb from the air?": "carbon dioxide",
    "What is the hardest natural substance?": "diamond",
    "Who was the first president of the United States?": "George Washington",
    "Which animal is known as the king of the jungle?": "lion",
    "What is the closest star to Earth?": "Sun",
    "Which planet has the most famous rings?": "Saturn",
    "Who wrote the play Hamlet?": "Shakespeare",
    "In which country are the pyramids of Giza?": "Egypt",
    "What is the largest desert in Africa?": "Sahara",
    "What is the capital city of the state of New York?": "Albany",
}
# four prompts x four demonstrations, one per relation; none of them is a candidate
DEMOS = [
    [
        (QUESTION["capital"].format("Spain"), "Madrid"),
        (QUESTION["currency"].format("Switzerland"), "Swiss franc"),
        (QUESTION["language"].format("Brazil"), "Portuguese"),
        ("What is the largest planet in the solar system?", "Jupiter"),
    ],
    [
        (QUESTION["capital"].format("Japan"), "Tokyo"),
        (QUESTION["currency"].format("the United Kingdom"), "Pound sterling"),
        (QUESTION["language"].format("the Netherlands"), "Dutch"),
        ("Which planet is known as the Red Planet?", "Mars"),
    ],
    [
        (QUESTION["capital"].format("Egypt"), "Cairo"),
        (QUESTION["currency"].format("Thailand"), "Thai baht"),
        (QUESTION["language"].format("Greece"), "Greek"),
        ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ],
    [
        (QUESTION["capital"].format("Peru"), "Lima"),
        (QUESTION["currency"].format("Denmark"), "Danish krone"),
        (QUESTION["language"].format("Sweden"), "Swedish"),
        ("What is the boiling point of water in Celsius?", "100 degrees"),
    ],
]


# second round (issue 14: locality needs known facts apart from the mixed ones, about 40 in each):
# the relations the first round kept most often (language 14 of 18, general 8 of 20), new subjects.
# `--new-only` labels just these and adds the kept ones to the file; a full run labels both rounds.
LANGUAGES_2 = {
    "Spain": "Spanish",
    "Colombia": "Spanish",
    "Chile": "Spanish",
    "Peru": "Spanish",
    "Cuba": "Spanish",
    "Venezuela": "Spanish",
    "Uruguay": "Spanish",
    "Ecuador": "Spanish",
    "Saudi Arabia": "Arabic",
    "Iraq": "Arabic",
    "Jordan": "Arabic",
    "Syria": "Arabic",
    "Libya": "Arabic",
    "Qatar": "Arabic",
    "Denmark": "Danish",
    "the Czech Republic": "Czech",
    "Ukraine": "Ukrainian",
    "Vietnam": "Vietnamese",
    "Indonesia": "Indonesian",
    "Iceland": "Icelandic",
    "Romania": "Romanian",
    "Bulgaria": "Bulgarian",
    "Croatia": "Croatian",
    "Serbia": "Serbian",
    "Estonia": "Estonian",
    "Latvia": "Latvian",
    "Lithuania": "Lithuanian",
    "Mongolia": "Mongolian",
    "Albania": "Albanian",
    "Armenia": "Armenian",
    "Nepal": "Nepali",
    "Cambodia": "Khmer",
    "Ethiopia": "Amharic",
    "Australia": "English",
}
GENERAL_2 = {
    "Who wrote Pride and Prejudice?": "Austen",
    "Who painted The Starry Night?": "Gogh",
    "Who wrote the Odyssey?": "Homer",
    "What is the largest mammal?": "blue whale",
    "What is the fastest land animal?": "cheetah",
    "What is the largest country by area?": "Russia",
    "Who invented the telephone?": "Bell",
    "What is the chemical symbol for gold?": "Au",
    "What is the chemical symbol for iron?": "Fe",
    "What planet do we live on?": "Earth",
    "What is the largest bone in the human body?": "femur",
    "What is the largest organ of the human body?": "skin",
    "Which planet is closest to the Sun?": "Mercury",
    "Who was the first man to walk on the Moon?": "Armstrong",
    "Who wrote War and Peace?": "Tolstoy",
    "Who painted the ceiling of the Sistine Chapel?": "Michelangelo",
    "Who proposed the theory of evolution by natural selection?": "Darwin",
    "Which element has the atomic number 1?": "hydrogen",
    "What color is the sky on a clear day?": "blue",
    "What is the largest rainforest in the world?": "Amazon",
    "Which ocean lies between Europe and North America?": "Atlantic",
    "What is the highest mountain in Africa?": "Kilimanjaro",
    "In which city is the Eiffel Tower?": "Paris",
    "In which city is the Colosseum?": "Rome",
    "In which country is the Taj Mahal?": "India",
    "In which country is Machu Picchu?": "Peru",
    "Who wrote the Harry Potter books?": "Rowling",
    "Who painted The Last Supper?": "Vinci",
    "Who composed the Moonlight Sonata?": "Beethoven",
    "What do bees make?": "honey",
    "What is frozen water called?": "ice",
    "Which metal is liquid at room temperature?": "mercury",
    "What is the largest island in the world?": "Greenland",
    "What is the largest state of the United States by area?": "Alaska",
    "Who was the first person in space?": "Gagarin",
    "Which company makes the iPhone?": "Apple",
    "Who wrote the novel 1984?": "Orwell",
    "Who wrote Don Quixote?": "Cervantes",
    "In which country is the city of Sydney?": "Australia",
    "What is the largest bird in the world?": "ostrich",
    "Which musical instrument has 88 keys?": "piano",
    "Which planet is known for its Great Red Spot?": "Jupiter",
    "What is the largest city in the United States?": "New York",
    "Who discovered the law of universal gravitation?": "Newton",
    "What is the main ingredient of guacamole?": "avocado",
}


def candidates(new_only: bool = False) -> list[dict]:
    rounds = [("language", LANGUAGES_2), ("general", GENERAL_2)]
    if not new_only:
        rounds = [
            ("capital", CAPITALS),
            ("currency", CURRENCIES),
            ("language", LANGUAGES),
            ("general", GENERAL),
            *rounds,
        ]
    out = []
    for kind, table in rounds:
        for subject, gold in table.items():
            question = subject if kind == "general" else QUESTION[kind].format(subject)
            out.append({"question": question, "answer": gold, "type": kind})
    demo_questions = {q for demos in DEMOS for q, _ in demos}
    assert not demo_questions & {c["question"] for c in out}, "a demonstration is also a candidate"
    assert len({c["question"] for c in out}) == len(out), "a candidate repeats"
    return out


def frame(question: str) -> str:
    """The frame a question is asked in: its QUESTION template, else (general facts) itself."""
    for template in QUESTION.values():
        head, tail = template.split("{}")
        if question.startswith(head) and question.endswith(tail):
            return template
    return question


def split(known: list[dict]) -> tuple[list[dict], list[dict]]:
    """(eval, mix): disjoint, each in file order, sharing no (question frame, answer) pair: facts
    with the same frame and answer ("What is the official language of X?" -> Spanish) form one unit
    that goes whole to one side. Every capital question goes to eval (the injected facts are
    capital-like, and interference is worst on the same relation); the other units are ranked
    within their type by sha256 of their first question and dealt round-robin across types, eval
    taking them until it holds half of all (so both halves have every relation)."""
    units = {}
    for i, r in enumerate(known):
        units.setdefault((frame(r["question"]), tasks.normalize_answer(r["answer"])), []).append(i)
    is_capital = ["capital" in r["question"].lower() for r in known]
    rest = {}
    for ids in units.values():
        if not any(is_capital[i] for i in ids):
            rest.setdefault(known[ids[0]]["type"], []).append(ids)
    for kind in rest.values():
        kind.sort(key=lambda ids: hashlib.sha256(known[ids[0]]["question"].encode()).hexdigest())
    dealt = [ids for rank in zip_longest(*rest.values()) for ids in rank if ids is not None]
    to_eval = {i for i, c in enumerate(is_capital) if c}
    for ids in dealt:
        if len(to_eval) >= len(known) // 2:
            break
        to_eval |= set(ids)
    evaluation = [r for i, r in enumerate(known) if i in to_eval]
    mix = [r for i, r in enumerate(known) if i not in to_eval]
    return evaluation, mix


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_split(path: Path):
    known = read(path)
    evaluation, mix = split(known)
    # the properties the README promises, checked on what is written
    assert not {r["question"] for r in evaluation} & {r["question"] for r in mix}
    assert len(evaluation) + len(mix) == len(known)
    assert all("capital" not in r["question"].lower() for r in mix), "a capital question is mixed"
    pairs = [
        {(frame(r["question"]), tasks.normalize_answer(r["answer"])) for r in rows}
        for rows in (evaluation, mix)
    ]
    assert not pairs[0] & pairs[1], f"a (frame, answer) pair on both sides: {pairs[0] & pairs[1]}"
    for name, rows in (("known_eval", evaluation), ("known_mix", mix)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        tasks.atomic_write_text(path.parent / f"{name}.jsonl", text)
        kinds = dict(Counter(r["type"] for r in rows))
        print(f"{name}.jsonl: {len(rows)} facts, {kinds}")


def few_shot(tokenizer, demos, question: str) -> str:
    messages = [
        m
        for q, a in demos
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    return tokenizer.apply_chat_template(
        messages + [{"role": "user", "content": question}], add_generation_prompt=True
    )


def label(net, tokenizer, facts: list[dict], batch_size: int) -> list[dict]:
    """Facts correct under all few-shot prompts, with their counts and zero-shot chat answers."""
    passed = [0] * len(facts)
    for k, demos in enumerate(DEMOS):
        prompts = [few_shot(tokenizer, demos, f["question"]) for f in facts]
        answers = tasks.complete(net, tokenizer, prompts, max_new_tokens=12, batch_size=batch_size)
        right = [tasks.fact_correct(a, f["answer"]) for f, a in zip(facts, answers)]
        passed = [p + r for p, r in zip(passed, right)]
        print(f"prompt {k}: {sum(right)}/{len(facts)} correct", flush=True)
    questions = [f["question"] for f in facts]
    chat = tasks.answer(net, tokenizer, questions, max_new_tokens=32, batch_size=batch_size)
    chat_right = [tasks.fact_correct(a, f["answer"]) for f, a in zip(facts, chat)]
    kept = []
    for f, p, c, a in zip(facts, passed, chat_right, chat):
        if p == len(DEMOS):
            kept.append(dict(f, fewshot_correct=p, chat_correct=c, chat_answer=a))
    for kind in dict.fromkeys(f["type"] for f in facts):
        n_kept = sum(r["type"] == kind for r in kept)
        print(f"{kind}: kept {n_kept} of {sum(f['type'] == kind for f in facts)}")
    print(
        f"kept {len(kept)} of {len(facts)} candidates (correct under all {len(DEMOS)} prompts); "
        f"zero-shot chat correct: {sum(r['chat_correct'] for r in kept)} of the kept, "
        f"{sum(chat_right)} of all"
    )
    return kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="smollm2_135m", help="checkpoint folder or name")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts answered at once")
    parser.add_argument("--out", default=str(HERE / "known_facts.jsonl"), help="the kept facts")
    parser.add_argument(
        "--new-only",
        action="store_true",
        help="label only the second round's candidates and add the kept ones to --out",
    )
    parser.add_argument(
        "--split-only",
        action="store_true",
        help="no model: rewrite known_eval.jsonl and known_mix.jsonl beside --out from --out",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.split_only:
        net, tokenizer = model.load(args.ckpt)
        kept = label(net, tokenizer, candidates(args.new_only), args.batch_size)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        if args.new_only:  # the earlier lines stay byte for byte
            text = out.read_text() + text
            kept = read(out) + kept
        tasks.atomic_write_text(out, text)
        identity = checkpoints.identity(checkpoints.resolve(args.ckpt))
        print(f"{out}: {len(kept)} facts; checkpoint {identity}")
    write_split(out)


if __name__ == "__main__":
    main()
