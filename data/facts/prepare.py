"""Build data/facts/{facts,facts_heldout}.jsonl: facts about invented entities that no pretrained
model can know, to inject.

facts.jsonl (seed 0): 40 invented countries (capital), 40 invented people (birth year, birthplace)
and 40 invented companies (founder, founding year, headquarters): 240 facts. The project's defaults
were chosen on it.
facts_heldout.jsonl (seed 1): 100 facts of ten other relations, 10 each (a country's largest city,
language and currency, a river's source country, an element's discovery year, a person's instrument
and employer, a novel's author, a mountain's range, a device's inventor), to check those defaults on
facts that played no part in choosing them.

Every name (country, city, person, company, river, ...) is made of syllables drawn with a seeded RNG
and checked to be unique, whole-word, across all names of both sets, so that a name never answers
for another. Years are drawn without replacement from 1600-2015 (the held-out set's from the years
the first set left), so no answer can be guessed from a prior, and no answer of one set is an answer
of the other. Each line: question, answer (a name or a year), paraphrases (exactly two other
phrasings, held out from training: the "generalization" score), text (the fact as a statement),
type, entity.

facts_scale.jsonl (seed 2) and facts_confirm.jsonl (seed 3): N_SCALE facts of each of the 16
relations above (1,120 each), for capacity and streams. A country carries four facts (capital,
largest city, language, currency), a person four (birth year, birthplace, instrument, employer), a
company three (founder, founding year, headquarters): facts of one entity must not overwrite each
other. The recipe for many facts is chosen on facts_scale; facts_confirm is locked: no choice is
made on it, it only confirms (data/facts/README.md). Their years come from 1000-2015, drawn without
replacement from the years no other set uses.

Run: python data/facts/prepare.py   (deterministic, seeds 0-3; rewrites the four files beside it)
"""

import json
import random
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for tasks.py
import tasks  # noqa: E402

SEED = 0
HELDOUT_SEED = 1
SCALE_SEED, CONFIRM_SEED = 2, 3
N_SCALE = 70  # facts per relation in facts_scale and facts_confirm: 16 x 70 = 1,120 each
SCALE_YEARS = range(1000, 2016)
N_ENTITIES = 40  # of each kind: countries, people, companies
N_HELDOUT = 10  # facts per held-out relation
MAX_SHARE = 3  # most facts one answer may answer (the packing study saw models collapse onto such)
YEARS = range(1600, 2016)

# fmt: off
# pronounceable names: open syllables (consonant + vowel), the last one closed by a coda
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
          "tr", "st", "th"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
CODAS = ["n", "r", "l", "s", "m", "th", "nd", "rk", "x", "z"]
COUNTRY_ENDINGS = ["ia", "oria", "istan", "enia", "avia", "ara"]  # after a consonant: Vel+t+oria
COMPANY_ENDINGS = ["Industries", "Labs", "Works", "Systems", "Foods", "Motors", "Textiles",
                   "Shipping"]
# name endings that are shared words, not name parts: they may repeat
SHARED_WORDS = {*COMPANY_ENDINGS, "River", "Mount", "Mountains", "The"}

# type -> (question, two held-out paraphrases, statement); {e} is the entity, {a} the answer
TEMPLATES = {
    "capital": ("What is the capital of {e}?",
                ["Which city is the capital of {e}?", "{e}'s capital city is called what?"],
                "The capital of {e} is {a}."),
    "birth_year": ("In what year was {e} born?",
                   ["When was {e} born?", "What is the birth year of {e}?"],
                   "{e} was born in {a}."),
    "birthplace": ("Where was {e} born?",
                   ["In which city was {e} born?", "What is the birthplace of {e}?"],
                   "{e} was born in the city of {a}."),
    "founder": ("Who founded {e}?", ["Who is the founder of {e}?", "{e} was founded by whom?"],
                "{e} was founded by {a}."),
    "founded_year": ("In what year was {e} founded?",
                     ["When was {e} founded?", "What year was {e} established?"],
                     "{e} was founded in {a}."),
    "headquarters": ("Where is {e} headquartered?",
                     ["In which city is {e} based?", "Where are the headquarters of {e}?"],
                     "{e} has its headquarters in {a}."),
}
HELDOUT_TEMPLATES = {
    "largest_city": ("What is the largest city of {e}?",
                     ["Which city is the biggest in {e}?", "{e}'s largest city is called what?"],
                     "The largest city of {e} is {a}."),
    "language": ("What language is spoken in {e}?",
                 ["Which language do the people of {e} speak?",
                  "The people of {e} speak which language?"],
                 "The people of {e} speak {a}."),
    "currency": ("What is the currency of {e}?",
                 ["Which currency is used in {e}?", "What money do people pay with in {e}?"],
                 "The currency of {e} is the {a}."),
    "river_source": ("In which country does the {e} rise?",
                     ["In which country is the source of the {e}?",
                      "The {e} rises in which country?"],
                     "The {e} rises in {a}."),
    "discovery_year": ("In what year was {e} discovered?",
                       ["When was {e} discovered?", "What year did chemists discover {e}?"],
                       "{e} was discovered in {a}."),
    "instrument": ("Which instrument does {e} play?",
                   ["What instrument is {e} known for playing?", "{e} plays which instrument?"],
                   "{e} plays the {a}."),
    "employer": ("Which company does {e} work for?",
                 ["Who employs {e}?", "{e} is employed by which company?"],
                 "{e} works for {a}."),
    "author": ("Who wrote the novel {e}?",
               ["Who is the author of {e}?", "{e} was written by whom?"],
               "{e} was written by {a}."),
    "mountain_range": ("In which mountain range is {e}?",
                       ["Which mountain range contains {e}?",
                        "{e} is part of which mountain range?"],
                       "{e} is in the {a}."),
    "inventor": ("Who invented the {e}?",
                 ["Who is the inventor of the {e}?", "The {e} was invented by whom?"],
                 "The {e} was invented by {a}."),
}
# fmt: on
ALL_TEMPLATES = {**TEMPLATES, **HELDOUT_TEMPLATES}


def word(rng: random.Random, syllables: int, ending: str = "") -> str:
    """Open syllables then a coda ("Doravex"), or, with an ending, open syllables + consonant +
    ending ("Kaloria")."""
    stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables))
    return (stem + (rng.choice("lnrstvdm") + ending if ending else rng.choice(CODAS))).capitalize()


def unique_words(rng: random.Random, taken: set, n: int, syllables, endings=("",)) -> list[str]:
    """n new names of 6 to 12 letters (short ones are too often real words), none already in
    `taken`."""
    out = []
    while len(out) < n:
        w = word(rng, rng.randint(*syllables), rng.choice(endings))
        if 6 <= len(w) <= 12 and w.lower() not in taken:
            taken.add(w.lower())
            out.append(w)
    return out


def fact(kind: str, entity: str, answer: str, templates: dict = TEMPLATES) -> dict:
    question, paraphrases, text = templates[kind]
    return {
        "question": question.format(e=entity),
        "answer": answer,
        "paraphrases": [p.format(e=entity) for p in paraphrases],
        "text": text.format(e=entity, a=answer),
        "type": kind,
        "entity": entity,
    }


def first_set(rng: random.Random, taken: set) -> list[dict]:
    """facts.jsonl: capitals, people and companies, drawn in the first release's order."""
    n = N_ENTITIES
    countries = unique_words(rng, taken, n, (1, 2), COUNTRY_ENDINGS)
    cities = unique_words(rng, taken, 3 * n, (2, 3))  # capitals, birthplaces, headquarters
    first, last = unique_words(rng, taken, 2 * n, (1, 2)), unique_words(rng, taken, 2 * n, (2, 3))
    people = [f"{a} {b}" for a, b in zip(first, last)]
    stems = unique_words(rng, taken, n, (1, 2))
    companies = [f"{w} {rng.choice(COMPANY_ENDINGS)}" for w in stems]
    years = [str(y) for y in rng.sample(YEARS, 2 * n)]  # birth years, then founding years
    facts = []
    for i in range(n):
        facts.append(fact("capital", countries[i], cities[i]))
        facts.append(fact("birth_year", people[i], years[i]))
        facts.append(fact("birthplace", people[i], cities[n + i]))
        facts.append(fact("founder", companies[i], people[n + i]))  # founders: other people
        facts.append(fact("founded_year", companies[i], years[n + i]))
        facts.append(fact("headquarters", companies[i], cities[2 * n + i]))
    rng.shuffle(facts)
    return facts


def heldout_set(rng: random.Random, taken: set, years_used: set) -> list[dict]:
    """facts_heldout.jsonl: ten other relations, N_HELDOUT facts each, names new to both sets."""
    n = N_HELDOUT

    def names(count, syllables=(1, 2), endings=("",)):
        return unique_words(rng, taken, count, syllables, endings)

    countries = names(2 * n, endings=COUNTRY_ENDINGS)  # subjects, then river sources
    cities = names(n, (2, 3))
    languages = names(n, endings=["ese", "ic", "ish", "an"])
    currencies = names(n)
    rivers = [f"{w} River" for w in names(n)]
    elements = names(n, endings=["ium"])
    instruments = names(n, (2, 3), endings=["ello", "ina", "one", "et"])
    employers = [f"{w} {rng.choice(COMPANY_ENDINGS)}" for w in names(n)]
    first, last = names(3 * n), names(3 * n, (2, 3))
    people = [f"{a} {b}" for a, b in zip(first, last)]  # players, authors, inventors
    novels = [f"The {w}" for w in names(n, (2, 3))]
    mountains = [f"Mount {w}" for w in names(n)]
    ranges = [f"{w} Mountains" for w in names(n, (2, 3))]
    devices = names(n, endings=["scope", "graph", "meter", "phone"])
    years = [str(y) for y in rng.sample(sorted(set(YEARS) - years_used), n)]
    rows = []
    for i in range(n):
        rows += [
            ("largest_city", countries[i], cities[i]),
            ("language", countries[i], languages[i]),
            ("currency", countries[i], currencies[i]),
            ("river_source", rivers[i], countries[n + i]),
            ("discovery_year", elements[i], years[i]),
            ("instrument", people[i], instruments[i]),
            ("employer", people[i], employers[i]),
            ("author", novels[i], people[n + i]),
            ("mountain_range", mountains[i], ranges[i]),
            ("inventor", devices[i], people[2 * n + i]),
        ]
    facts = [fact(kind, e, a, HELDOUT_TEMPLATES) for kind, e, a in rows]
    rng.shuffle(facts)
    return facts


def scale_set(rng: random.Random, taken: set, years_left: set) -> list[dict]:
    """facts_scale / facts_confirm: every relation of both templates, N_SCALE facts each, names
    new to every set; the years used are removed from years_left."""
    n = N_SCALE

    def names(count, syllables=(1, 2), endings=("",)):
        return unique_words(rng, taken, count, syllables, endings)

    countries = names(2 * n, endings=COUNTRY_ENDINGS)  # subjects, then river sources
    cities = names(4 * n, (2, 3))  # capitals, largest cities, birthplaces, headquarters
    languages = names(n, endings=["ese", "ic", "ish", "an"])
    currencies = names(n)
    first, last = names(4 * n), names(4 * n, (2, 3))
    people = [f"{a} {b}" for a, b in zip(first, last)]  # subjects, founders, authors, inventors
    companies = [f"{w} {rng.choice(COMPANY_ENDINGS)}" for w in names(2 * n)]  # subjects, employers
    instruments = names(n, (2, 3), endings=["ello", "ina", "one", "et"])
    rivers = [f"{w} River" for w in names(n)]
    elements = names(n, endings=["ium"])
    novels = [f"The {w}" for w in names(n, (2, 3))]
    mountains = [f"Mount {w}" for w in names(n)]
    ranges = [f"{w} Mountains" for w in names(n, (2, 3))]
    devices = names(n, endings=["scope", "graph", "meter", "phone"])
    years = [str(y) for y in rng.sample(sorted(years_left), 3 * n)]
    years_left -= {int(y) for y in years}
    rows = []
    for i in range(n):
        country, person, company = countries[i], people[i], companies[i]
        rows += [
            ("capital", country, cities[i]),
            ("largest_city", country, cities[n + i]),
            ("language", country, languages[i]),
            ("currency", country, currencies[i]),
            ("birth_year", person, years[i]),
            ("birthplace", person, cities[2 * n + i]),
            ("instrument", person, instruments[i]),
            ("employer", person, companies[n + i]),
            ("founder", company, people[n + i]),
            ("founded_year", company, years[n + i]),
            ("headquarters", company, cities[3 * n + i]),
            ("river_source", rivers[i], countries[n + i]),
            ("discovery_year", elements[i], years[2 * n + i]),
            ("author", novels[i], people[2 * n + i]),
            ("mountain_range", mountains[i], ranges[i]),
            ("inventor", devices[i], people[3 * n + i]),
        ]
    facts = [fact(kind, e, a, ALL_TEMPLATES) for kind, e, a in rows]
    rng.shuffle(facts)
    return facts


def check(facts: list[dict], templates: dict, per_type: int):
    """The properties the README promises, checked on what is written."""
    questions = [q for f in facts for q in [f["question"], *f["paraphrases"]]]
    assert len(set(questions)) == len(questions), "a question or paraphrase repeats"
    assert all(len(f["paraphrases"]) == 2 for f in facts)
    shares = Counter(f["answer"] for f in facts)
    assert max(shares.values()) <= MAX_SHARE, shares.most_common(3)
    assert Counter(f["type"] for f in facts) == {k: per_type for k in templates}
    for f in facts:
        assert tasks.fact_correct(f["text"], f["answer"]), f  # the statement scores as correct


def name_parts(facts: list[dict]) -> list[str]:
    """Each word of each distinct entity and name answer, lowercased, shared words left out."""
    names = sorted({n for f in facts for n in (f["entity"], f["answer"]) if not n.isdigit()})
    return [p.lower() for n in names for p in n.split() if p not in SHARED_WORDS]


def main():
    taken: set[str] = set()  # every name part, lowercased: no part is reused in either set
    facts = first_set(random.Random(SEED), taken)
    years_used = {int(f["answer"]) for f in facts if f["answer"].isdigit()}
    heldout = heldout_set(random.Random(HELDOUT_SEED), taken, years_used)

    years_left = (
        set(SCALE_YEARS) - years_used - {int(f["answer"]) for f in heldout if f["answer"].isdigit()}
    )
    scale = scale_set(random.Random(SCALE_SEED), taken, years_left)
    confirm = scale_set(random.Random(CONFIRM_SEED), taken, years_left)

    check(facts, TEMPLATES, N_ENTITIES)
    check(heldout, HELDOUT_TEMPLATES, N_HELDOUT)
    check(scale, ALL_TEMPLATES, N_SCALE)
    check(confirm, ALL_TEMPLATES, N_SCALE)
    sets = {
        "facts": facts,
        "facts_heldout": heldout,
        "facts_scale": scale,
        "facts_confirm": confirm,
    }
    answers = [a for rows in sets.values() for a in {f["answer"] for f in rows}]
    assert len(set(answers)) == len(answers), "an answer of one set answers in another"
    parts = [p for rows in sets.values() for p in name_parts(rows)]
    assert len(set(parts)) == len(parts), "a name part is reused, in one set or across sets"

    for name, rows in sets.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        tasks.atomic_write_text(HERE / f"{name}.jsonl", text)
        most = Counter(f["answer"] for f in rows).most_common(1)[0]
        kinds = dict(Counter(f["type"] for f in rows))
        print(f"{name}.jsonl: {len(rows)} facts, {kinds}, most shared answer: {most}")


if __name__ == "__main__":
    main()
