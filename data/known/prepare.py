"""Build data/known/known_facts.jsonl: real facts the base model already knows, for mixing into fact injection
(`inject.py --mix-known`) and for measuring locality (what the base knew and still knows).

"Known" is labelled the way the packing study labels HighlyKnown facts (Pletenev et al. 2025, "How Much Knowledge
Can You Pack into a LoRA Adapter without Harming LLM?", arXiv 2502.14502, after Gekhman et al. 2024's SliCK):
the model's greedy answer is correct under every one of several different few-shot prompts. Here: 4 prompts, each
with 4 other demonstration facts (one per relation), as earlier chat turns; correct = tasks.fact_correct (the gold
as whole words in the answer's first line, after SQuAD normalisation). Demonstration facts are never candidates.
Each kept line records how many prompts it passed (always 4) and whether the zero-shot chat answer, the form
evaluate.py asks in, was correct too.

Run: python data/known/prepare.py [--ckpt smollm2_135m]   (greedy, so deterministic for a checkpoint; about
10 minutes on 2 CPU cores for SmolLM2-135M)
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for model.py and tasks.py
import model  # noqa: E402
import tasks  # noqa: E402

QUESTION = {"capital": "What is the capital of {}?", "currency": "What is the currency of {}?",
            "language": "What is the official language of {}?"}
# golds are the shortest form any right answer contains: "Delhi" is in "New Delhi", "Vinci" in "Leonardo da Vinci"
CAPITALS = dict(
    France="Paris", Germany="Berlin", Italy="Rome", Portugal="Lisbon", Ireland="Dublin", Netherlands="Amsterdam",
    Belgium="Brussels", Switzerland="Bern", Austria="Vienna", Poland="Warsaw", Hungary="Budapest", Greece="Athens",
    Sweden="Stockholm", Norway="Oslo", Denmark="Copenhagen", Finland="Helsinki", Iceland="Reykjavik", Russia="Moscow",
    Turkey="Ankara", Kenya="Nairobi", Nigeria="Abuja", Morocco="Rabat", Ethiopia="Addis Ababa", Ghana="Accra",
    Senegal="Dakar", Algeria="Algiers", Tunisia="Tunis", China="Beijing", Thailand="Bangkok", Vietnam="Hanoi",
    Indonesia="Jakarta", Philippines="Manila", Malaysia="Kuala Lumpur", Iran="Tehran", Iraq="Baghdad",
    Syria="Damascus", Lebanon="Beirut", Jordan="Amman", Afghanistan="Kabul", Nepal="Kathmandu", Pakistan="Islamabad",
    Bangladesh="Dhaka", India="Delhi", Australia="Canberra", Canada="Ottawa", Cuba="Havana", Jamaica="Kingston",
    Brazil="Brasilia", Argentina="Buenos Aires", Chile="Santiago", Colombia="Bogota", Venezuela="Caracas",
    Ecuador="Quito", Uruguay="Montevideo", Paraguay="Asuncion", Romania="Bucharest", Bulgaria="Sofia",
    Serbia="Belgrade", Croatia="Zagreb", Slovakia="Bratislava", Slovenia="Ljubljana", Estonia="Tallinn",
    Latvia="Riga", Lithuania="Vilnius", Belarus="Minsk", Qatar="Doha", Cambodia="Phnom Penh", Laos="Vientiane",
    Zimbabwe="Harare", Uganda="Kampala", Sudan="Khartoum", Libya="Tripoli", Mexico="Mexico City",
    **{"the United States": "Washington", "the United Kingdom": "London", "South Korea": "Seoul",
       "North Korea": "Pyongyang", "Saudi Arabia": "Riyadh", "New Zealand": "Wellington",
       "the Czech Republic": "Prague"})
CURRENCIES = {"Japan": "yen", "the United States": "dollar", "India": "rupee", "Russia": "ruble", "Mexico": "peso",
              "South Korea": "won", "Brazil": "real", "Turkey": "lira", "Poland": "zloty", "Germany": "euro",
              "China": "yuan", "Sweden": "krona", "Israel": "shekel", "South Africa": "rand", "Vietnam": "dong"}
LANGUAGES = {"Mexico": "Spanish", "Germany": "German", "France": "French", "Japan": "Japanese", "Egypt": "Arabic",
             "Russia": "Russian", "Italy": "Italian", "Israel": "Hebrew", "Turkey": "Turkish", "Poland": "Polish",
             "Argentina": "Spanish", "Austria": "German", "Portugal": "Portuguese", "Finland": "Finnish",
             "South Korea": "Korean", "Thailand": "Thai", "Norway": "Norwegian", "Hungary": "Hungarian"}
GENERAL = {
    "What is the largest ocean on Earth?": "Pacific", "Who painted the Mona Lisa?": "Vinci",
    "What is the tallest mountain in the world?": "Everest", "Who developed the theory of relativity?": "Einstein",
    "What is the longest river in Africa?": "Nile", "What is the largest continent?": "Asia",
    "What is the smallest planet in the solar system?": "Mercury", "Who discovered penicillin?": "Fleming",
    "Which organ pumps blood through the body?": "heart", "What is the chemical formula for water?": "H2O",
    "What gas do plants absorb from the air?": "carbon dioxide", "What is the hardest natural substance?": "diamond",
    "Who was the first president of the United States?": "George Washington",
    "Which animal is known as the king of the jungle?": "lion", "What is the closest star to Earth?": "Sun",
    "Which planet has the most famous rings?": "Saturn", "Who wrote the play Hamlet?": "Shakespeare",
    "In which country are the pyramids of Giza?": "Egypt", "What is the largest desert in Africa?": "Sahara",
    "What is the capital city of the state of New York?": "Albany"}
# four prompts x four demonstrations, one per relation; none of them is a candidate
DEMOS = [
    [(QUESTION["capital"].format("Spain"), "Madrid"), (QUESTION["currency"].format("Switzerland"), "Swiss franc"),
     (QUESTION["language"].format("Brazil"), "Portuguese"),
     ("What is the largest planet in the solar system?", "Jupiter")],
    [(QUESTION["capital"].format("Japan"), "Tokyo"),
     (QUESTION["currency"].format("the United Kingdom"), "Pound sterling"),
     (QUESTION["language"].format("the Netherlands"), "Dutch"), ("Which planet is known as the Red Planet?", "Mars")],
    [(QUESTION["capital"].format("Egypt"), "Cairo"), (QUESTION["currency"].format("Thailand"), "Thai baht"),
     (QUESTION["language"].format("Greece"), "Greek"), ("Who wrote Romeo and Juliet?", "William Shakespeare")],
    [(QUESTION["capital"].format("Peru"), "Lima"), (QUESTION["currency"].format("Denmark"), "Danish krone"),
     (QUESTION["language"].format("Sweden"), "Swedish"),
     ("What is the boiling point of water in Celsius?", "100 degrees")],
]


def candidates() -> list[dict]:
    out = [{"question": QUESTION[kind].format(subject), "answer": gold, "type": kind}
           for kind, table in (("capital", CAPITALS), ("currency", CURRENCIES), ("language", LANGUAGES))
           for subject, gold in table.items()]
    out += [{"question": q, "answer": gold, "type": "general"} for q, gold in GENERAL.items()]
    demo_questions = {q for demos in DEMOS for q, _ in demos}
    assert not demo_questions & {c["question"] for c in out}, "a demonstration is also a candidate"
    assert len({c["question"] for c in out}) == len(out), "a candidate repeats"
    return out


def few_shot(tokenizer, demos, question: str) -> str:
    messages = [m for q, a in demos for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return tokenizer.apply_chat_template(messages + [{"role": "user", "content": question}], add_generation_prompt=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="smollm2_135m", help="checkpoint folder or name (see checkpoints.py)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts answered at once")
    parser.add_argument("--out", default=str(HERE / "known_facts.jsonl"), help="where to write the kept facts")
    args = parser.parse_args(argv)
    net, tokenizer = model.load(args.ckpt)
    facts = candidates()
    passed = [0] * len(facts)
    for k, demos in enumerate(DEMOS):
        prompts = [few_shot(tokenizer, demos, f["question"]) for f in facts]
        answers = tasks.complete(net, tokenizer, prompts, max_new_tokens=12, batch_size=args.batch_size)
        right = [tasks.fact_correct(a, f["answer"]) for f, a in zip(facts, answers)]
        passed = [p + r for p, r in zip(passed, right)]
        print(f"prompt {k}: {sum(right)}/{len(facts)} correct", flush=True)
    chat = tasks.answer(net, tokenizer, [f["question"] for f in facts], max_new_tokens=32, batch_size=args.batch_size)
    chat_right = [tasks.fact_correct(a, f["answer"]) for f, a in zip(facts, chat)]
    kept = [dict(f, fewshot_correct=p, chat_correct=c, chat_answer=a)
            for f, p, c, a in zip(facts, passed, chat_right, chat) if p == len(DEMOS)]
    tasks.atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    for kind in dict.fromkeys(f["type"] for f in facts):
        print(f"{kind}: kept {sum(r['type'] == kind for r in kept)} of {sum(f['type'] == kind for f in facts)}")
    print(f"{args.out}: kept {len(kept)} of {len(facts)} candidates (correct under all {len(DEMOS)} prompts); "
          f"zero-shot chat correct: {sum(r['chat_correct'] for r in kept)} of the kept, {sum(chat_right)} of all; "
          f"checkpoint {net.identity}")

if __name__ == "__main__":
    main()
