"""Build data/facts/facts.jsonl: facts about invented entities that no pretrained model can know, to inject.

40 invented countries (capital), 40 invented people (birth year, birthplace) and 40 invented companies (founder,
founding year, headquarters): 240 facts. Every name (country, city, person, company) is made of syllables drawn
with a seeded RNG and checked to be unique, whole-word, across all of them, so that a name never answers for
another. Cities are invented too, and years are drawn without replacement from 1600-2015, so no answer can be
guessed from a prior: every answer here is unique (the check below allows at most 3 facts per answer).

Each line: question, answer (a name or a year), paraphrases (exactly two other phrasings, held out from training:
the "generalization" score), text (the fact as a statement), type, entity.

Run: python data/facts/prepare.py   (deterministic, seed 0; rewrites facts.jsonl beside it)
"""
import json
import random
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
SEED = 0
N_ENTITIES = 40  # of each kind: countries, people, companies
MAX_SHARE = 3  # no answer may answer more facts than this (the packing study saw models collapse onto such answers)

# pronounceable names: open syllables (consonant + vowel), the last one closed by a coda
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "th"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
CODAS = ["n", "r", "l", "s", "m", "th", "nd", "rk", "x", "z"]
COUNTRY_ENDINGS = ["ia", "oria", "istan", "enia", "avia", "ara"]  # after a consonant: Vel + t + oria
COMPANY_ENDINGS = ["Industries", "Labs", "Works", "Systems", "Foods", "Motors", "Textiles", "Shipping"]

# type -> (question, two held-out paraphrases, statement); {e} is the entity, {a} the answer
TEMPLATES = {
    "capital": ("What is the capital of {e}?",
                ["Which city is the capital of {e}?", "{e}'s capital city is called what?"],
                "The capital of {e} is {a}."),
    "birth_year": ("In what year was {e} born?", ["When was {e} born?", "What is the birth year of {e}?"],
                   "{e} was born in {a}."),
    "birthplace": ("Where was {e} born?", ["In which city was {e} born?", "What is the birthplace of {e}?"],
                   "{e} was born in the city of {a}."),
    "founder": ("Who founded {e}?", ["Who is the founder of {e}?", "{e} was founded by whom?"],
                "{e} was founded by {a}."),
    "founded_year": ("In what year was {e} founded?", ["When was {e} founded?", "What year was {e} established?"],
                     "{e} was founded in {a}."),
    "headquarters": ("Where is {e} headquartered?",
                     ["In which city is {e} based?", "Where are the headquarters of {e}?"],
                     "{e} has its headquarters in {a}."),
}


def word(rng: random.Random, syllables: int, ending: str = "") -> str:
    """Open syllables then a coda ("Doravex"), or, with an ending, open syllables + consonant + ending ("Kaloria")."""
    stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables))
    return (stem + (rng.choice("lnrstvdm") + ending if ending else rng.choice(CODAS))).capitalize()


def unique_words(rng: random.Random, taken: set, n: int, syllables: tuple[int, int], endings=("",)) -> list[str]:
    """n new names of 6 to 12 letters (short ones are too often real words), none already in `taken`."""
    out = []
    while len(out) < n:
        w = word(rng, rng.randint(*syllables), rng.choice(endings))
        if 6 <= len(w) <= 12 and w.lower() not in taken:
            taken.add(w.lower())
            out.append(w)
    return out


def fact(kind: str, entity: str, answer: str) -> dict:
    question, paraphrases, text = TEMPLATES[kind]
    return {"question": question.format(e=entity), "answer": answer,
            "paraphrases": [p.format(e=entity) for p in paraphrases], "text": text.format(e=entity, a=answer),
            "type": kind, "entity": entity}


def main():
    rng = random.Random(SEED)
    taken: set[str] = set()  # every name part, lowercased: no part is reused anywhere
    n = N_ENTITIES
    countries = unique_words(rng, taken, n, (1, 2), COUNTRY_ENDINGS)
    cities = unique_words(rng, taken, 3 * n, (2, 3))  # capitals, birthplaces, headquarters
    first, last = unique_words(rng, taken, 2 * n, (1, 2)), unique_words(rng, taken, 2 * n, (2, 3))
    people = [f"{a} {b}" for a, b in zip(first, last)]
    companies = [f"{w} {rng.choice(COMPANY_ENDINGS)}" for w in unique_words(rng, taken, n, (1, 2))]
    years = [str(y) for y in rng.sample(range(1600, 2016), 2 * n)]  # birth years, then founding years

    facts = []
    for i in range(n):
        facts.append(fact("capital", countries[i], cities[i]))
        facts.append(fact("birth_year", people[i], years[i]))
        facts.append(fact("birthplace", people[i], cities[n + i]))
        facts.append(fact("founder", companies[i], people[n + i]))  # founders are other people than those above
        facts.append(fact("founded_year", companies[i], years[n + i]))
        facts.append(fact("headquarters", companies[i], cities[2 * n + i]))
    rng.shuffle(facts)

    # the properties the README promises, checked on what is written
    questions = [q for f in facts for q in [f["question"], *f["paraphrases"]]]
    assert len(set(questions)) == len(questions), "a question or paraphrase repeats"
    assert all(len(f["paraphrases"]) == 2 for f in facts)
    shares = Counter(f["answer"] for f in facts)
    assert max(shares.values()) <= MAX_SHARE, shares.most_common(3)
    parts = [p.lower() for name in countries + cities + people + companies for p in name.split()[:2]
             if p not in COMPANY_ENDINGS]
    assert len(set(parts)) == len(parts), "a name part is reused"
    assert Counter(f["type"] for f in facts) == {k: n for k in TEMPLATES}

    with open(HERE / "facts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in facts)
    print(f"facts.jsonl: {len(facts)} facts, {dict(Counter(f['type'] for f in facts))}, "
          f"most shared answer: {shares.most_common(1)[0]}")


if __name__ == "__main__":
    main()
