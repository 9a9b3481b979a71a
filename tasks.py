"""What every palora script shares: JSONL with file:line errors, chat prompts, tokenised examples
with answer-only labels, batching, answer extraction and scoring, batched greedy answering, atomic
writes.

Reasoning is scored as lm-evaluation-harness scores GSM8K (lm_eval/tasks/gsm8k/gsm8k.yaml, read as a
reference): its strict-match (first `#### N`) and flexible-extract (last number) filters, then exact
match after its normalisation, which removes ",", "$", everything up to "#### " (gold) and a
trailing "."; "-" is kept, "3.50" != "3.5". Facts: SQuAD's normalisation (Rajpurkar et al. 2016) and
whole-word containment. Both stated in PROTOCOL. B batch, T sequence length."""

import contextlib
import csv
import io
import json
import os
import re
import secrets
import string
import sys
import unicodedata
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm import tqdm

import palora
from model import generate

# label of the tokens that carry no loss (prompt, padding): cross_entropy's ignore_index
IGNORE_INDEX = -100
# The locked confirmation files: headline figures are scored on them and no choice is ever made
# on them (a selection run, reproduce.py --sweep, refuses them: tests/test_reproduce.py).
LOCKED = ("facts_confirm.jsonl", "confirm.jsonl", "confirm_ood.jsonl", "known_confirm.jsonl")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-eval's regexes_to_ignore, applied in this order
NORMALISE = (r",", r"\$", r"(?s).*#### ", r"\.$")
NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)")
# GSM8K's "<<48/2=24>>" annotations drive a calculator the model never has at inference and double a
# line's length: training targets drop them (lm-eval keeps them in its few-shot targets; scoring
# reads only the final number).
CALCULATOR = re.compile(r"<<[^<>]*>>")
PROTOCOL = (  # written by evaluate.py into its JSON: how every number in it was scored
    "zero-shot, greedy, in the checkpoint's chat template. reasoning as lm-evaluation-harness "
    "GSM8K: strict = first match of '#### (-?[0-9.,]+)', flexible = last match of "
    "'(-?[$0-9.,]{2,})|(-?[0-9]+)', exact match with the gold number after removing ',', '$' "
    "and a trailing '.'. facts: correct when the gold answer, normalised SQuAD-style "
    "(lowercase, accents folded, no punctuation, no a/an/the, single spaces), occurs as whole "
    "words in the equally normalised first non-empty line of the answer."
)


class DataError(ValueError):
    """A bad input file. The message has one "path:LINE: problem" line per problem found."""

    expected = True  # bad input: cli.run prints it as one line, exit 2


def check_file(path):
    """A file to read: missing is FileNotFoundError, anything but a file (a folder) a DataError."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not Path(path).is_file():
        raise DataError(f"{path}: not a file")


def _raise(problems: list[str]):
    if problems:  # the first 20 spelled out, the rest counted
        raise DataError(
            "\n".join(problems[:20] + [f"... and {len(problems) - 20} more"] * (len(problems) > 20))
        )


# -- reading and checking JSONL --------------------------------------------------------------------
# control characters no tokenizer turns into text (tab and newlines are text)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def field_problem(record: dict, key: str) -> str | None:
    """What is wrong with a required text field, or None."""
    value = record.get(key)
    if key not in record:
        return "missing field"
    if not isinstance(value, str):
        return "non-string field"
    if not value.strip():
        return "empty field"
    control = CONTROL.search(value)
    if control:
        return f"control character {control.group()!r} in field"
    return None


def read_jsonl(path, required=("question", "answer")) -> list[dict]:
    """One JSON object per line, blank lines skipped; each `required` field a non-empty string.
    Every record gets "_line" (its line number) so later checks name it too; all problems are
    collected, then raised together."""
    records, problems = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            # JSONDecodeError; UnicodeDecodeError for a line that is not UTF-8; ValueError for an
            # integer of over 4300 digits; RecursionError for arrays nested thousands deep
            except (ValueError, RecursionError) as e:
                why = getattr(e, "msg", None) or getattr(e, "reason", None) or str(e)
                problems.append(f"{path}:{n}: malformed JSON ({why[:100]})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
                continue
            for key in required:
                problem = field_problem(record, key)
                if problem:
                    problems.append(f"{path}:{n}: {problem} {key!r}")
            record["_line"] = n
            records.append(record)
    if not records and not problems:
        problems.append(f"{path}:1: empty file, no JSON records")
    _raise(problems)
    return records


def read_facts(path) -> list[dict]:
    """Facts from JSONL, or from a CSV file (a .csv name) as spreadsheets write them: a header
    row `question,answer[,paraphrase...]`, then a fact a row, its cells after the answer its
    held-out paraphrases (empty cells skipped). Records as read_jsonl's, "_line" the row's first
    line; every problem as "path:LINE: ...", raised together."""
    if Path(path).suffix.lower() != ".csv":
        return read_jsonl(path)
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not the header's
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        _raise([f"{path}:{line}: not UTF-8 text"])
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, problems, header, end = [], [], None, 0
    try:
        for row in reader:
            line, end = end + 1, reader.line_num  # a quoted cell can span lines
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if header is None:
                header = [c.lower() for c in cells]
                names = header[:2] == ["question", "answer"]
                if not names or not all(h.startswith("paraphrase") for h in header[2:]):
                    problems.append(
                        f"{path}:{line}: header must be question,answer[,paraphrase...], "
                        f"got {','.join(cells)!r}"
                    )
                    break
                continue
            record = dict(zip(("question", "answer"), cells), _line=line)
            for key in ("question", "answer"):
                problem = field_problem({key: ""} | record, key)  # a missing cell is empty
                if problem:
                    problems.append(f"{path}:{line}: {problem} {key!r}")
            paraphrases = [c for c in cells[2:] if c]
            records.append(record)
            records[-1]["paraphrases"] = paraphrases
    except csv.Error as e:
        problems.append(f"{path}:{reader.line_num}: malformed CSV ({e})")
    if header is None and not problems:
        problems.append(f"{path}:1: empty file, no header question,answer")
    elif not records and not problems:
        problems.append(f"{path}:{end + 1}: no facts after the header")
    _raise(problems)
    return records


def check_reasoning(records: list[dict], path):
    """Every answer must end in a number: GSM8K layout (last line `#### 42`) or a bare number
    ("42")."""
    _raise(
        [
            f"{path}:{r.get('_line', i + 1)}: answer has no final number "
            f"(want a last line '#### 42' or a plain number): ...{r['answer'][-40:]!r}"
            for i, r in enumerate(records)
            if gold_number(r["answer"]) is None
        ]
    )


def check_facts(records: list[dict], path):
    """An answer that survives normalisation, no repeated question, paraphrases a list of non-empty
    strings."""
    problems, first_line = [], {}
    for i, r in enumerate(records):
        line = r.get("_line", i + 1)
        if not normalize_answer(r["answer"]):
            problems.append(f"{path}:{line}: answer {r['answer']!r} is empty after normalisation")
        key = " ".join(r["question"].lower().split())
        if key in first_line:
            problems.append(
                f"{path}:{line}: duplicate question (same as line {first_line[key]}): "
                f"{r['question']!r}"
            )
        first_line.setdefault(key, line)
        paraphrases = r.get("paraphrases", [])
        if not isinstance(paraphrases, list) or not all(
            isinstance(p, str) and p.strip() for p in paraphrases
        ):
            problems.append(f"{path}:{line}: 'paraphrases' must be a list of non-empty strings")
        if "text" in r and not (isinstance(r["text"], str) and r["text"].strip()):
            problems.append(f"{path}:{line}: 'text' must be a non-empty string")
    _raise(problems)


# -- prompts, tokenised examples, batches ----------------------------------------------------------
def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )


def end_of_turn(tokenizer) -> list[int]:
    """The ids the chat template puts after an assistant message, up to and including the first eos
    id (ChatML: "<|im_end|>"; Llama 3: "<|eot_id|>"; Mistral: "</s>"), read from the template
    itself."""
    messages = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": "PALORA_END_OF_ANSWER"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False).split(
        "PALORA_END_OF_ANSWER"
    )
    ids = tokenizer.encode(text[1], add_special_tokens=False) if len(text) == 2 else []
    ends = [i for i, t in enumerate(ids) if t in tokenizer.eos_ids]
    # a template that closes turns without eos still gets one, so that generate() stops
    return ids[: ends[0] + 1] if ends else [min(tokenizer.eos_ids)]


def encode_example(tokenizer, question: str, answer: str, max_len: int):
    """ids = prompt + answer (calculator annotations dropped) + end of turn; labels = IGNORE_INDEX
    on the prompt.

    Prompt and answer are tokenised apart: generation continues exactly encode(prompt), and
    tokenising the joined text could merge the template's closing "\\n" with the answer's start, a
    prefix inference never sees (no BOS added: templates hold theirs). Longer than max_len: (None,
    None), which the caller skips and counts; never truncated (a cut question is another
    question)."""
    prompt = tokenizer.encode(chat_prompt(tokenizer, question), add_special_tokens=False)
    target = tokenizer.encode(CALCULATOR.sub("", answer), add_special_tokens=False) + end_of_turn(
        tokenizer
    )
    if len(prompt) + len(target) > max_len:
        return None, None
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def input_covariances(model, tokenizer, records: list, names, max_len: int) -> dict:
    """palora.activation_covariances of each named linear over the examples (prompt + answer),
    examples of one length run as one batch, so that no padding row counts and a thousand short
    facts take a few forwards, not a thousand; an example longer than max_len is skipped."""
    device = next(model.parameters()).device
    ids = [encode_example(tokenizer, r["question"], r["answer"], max_len)[0] for r in records]
    by_length = {}
    for x in ids:
        if x:
            by_length.setdefault(len(x), []).append(x)
    batches = [  # at most 64 rows a batch: the memory of one forward stays bounded
        torch.tensor(rows[i : i + 64], device=device)
        for _, rows in sorted(by_length.items())
        for i in range(0, len(rows), 64)
    ]
    bar = lambda: tqdm(batches, desc="input covariances", unit="batch", file=sys.stderr, leave=None)
    run = lambda: [model(x) for x in bar()]  # (b, T) of one length: no padding
    return palora.activation_covariances(model, names, run)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, side: str = "right"):
    """Pad (ids, labels) pairs: tokens (B,T) padded with pad_id, labels (B,T) with IGNORE_INDEX on
    padding, attention_mask (B,T) with 1 on real tokens. Right padding for training, left for
    generation."""
    if pad_id is None or side not in ("left", "right"):
        raise ValueError(
            f"collate needs a pad id (got {pad_id}) and side 'left' or 'right' (got {side!r})"
        )
    B, T = len(examples), max(len(ids) for ids, _ in examples)
    tokens, labels = torch.full((B, T), pad_id), torch.full((B, T), IGNORE_INDEX)  # int fill: int64
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        cols = slice(0, len(ids)) if side == "right" else slice(T - len(ids), T)
        tokens[b, cols], labels[b, cols] = torch.tensor(ids), torch.tensor(lab)
        mask[b, cols] = 1
    return tokens, labels, mask


# -- answer extraction and scoring -----------------------------------------------------------------
def normalize_number(text: str) -> str:
    for pattern in NORMALISE:
        text = re.sub(pattern, "", text)
    return text.lower()


def extract_strict(text: str) -> str | None:
    found = STRICT.findall(text)
    return found[0].strip() if found else None


def extract_flexible(text: str) -> str | None:
    found = FLEXIBLE.findall(text)  # one (group1, group2) tuple per match, one of them empty
    return next(g for g in found[-1] if g).strip() if found else None


def gold_number(answer: str) -> str | None:
    """The normalised gold number: the last line `#### N` (GSM8K layout) or a bare number; None
    otherwise."""
    lines = answer.strip().splitlines() or [""]
    if not lines[-1].startswith("#### ") and len(lines) != 1:
        return None
    number = normalize_number(lines[-1].strip().removeprefix("#### "))
    return number if NUMBER.fullmatch(number) else None


def score_reasoning(prediction: str, gold_answer: str) -> dict:
    gold = gold_number(gold_answer)
    found = {"strict": extract_strict(prediction), "flexible": extract_flexible(prediction)}
    return {
        name: gold is not None and got is not None and normalize_number(got) == gold
        for name, got in found.items()
    }


def normalize_answer(text: str) -> str:
    """SQuAD's (lowercase, no punctuation, no articles, single spaces), plus accents folded: Bogotá
    = Bogota."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c) and c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def fact_correct(prediction: str, gold: str) -> bool:
    """Gold within the first non-empty line, normalised, as whole words: small chat models answer in
    sentences ("The capital of Veltoria is Drasmund."); the first line only, so that listing
    candidates does not score."""
    first = next((line for line in prediction.splitlines() if line.strip()), "")
    want, got = normalize_answer(gold), normalize_answer(first)
    return bool(want) and f" {want} " in f" {got} "


# -- batched greedy answering ----------------------------------------------------------------------
@torch.no_grad()
def complete(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "answering",
    quiet: bool = False,
) -> list[str]:
    """Greedy continuations of already rendered prompts, decoded from the new tokens only, in input
    order.

    Progress (answers/s) goes to stderr as a tqdm bar named `desc` (quiet: none); opened inside
    another bar (a training loop's), it takes the next line and clears itself when done, so the
    outer bar stays."""
    # templates hold their own BOS
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    # similar lengths share a batch: less padding
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [""] * len(ids)
    bar = tqdm(total=len(ids), desc=desc, unit="answer", file=sys.stderr, leave=None, disable=quiet)
    with bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = [ids[i] for i in rows]
            new = generate(model, batch, max_new_tokens, tokenizer.eos_ids, temperature=0.0)
            for i, tokens in zip(rows, new):
                out[i] = tokenizer.decode(tokens)
            bar.update(len(rows))
    return out


def answer(
    model,
    tokenizer,
    questions: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "answering",
    quiet: bool = False,
) -> list[str]:
    """complete() on the questions rendered in the chat template."""
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    return complete(model, tokenizer, prompts, max_new_tokens, batch_size, desc, quiet)


# -- atomic writes: a temporary file in the same folder (same file system, so os.replace is atomic),
# fsynced, then renamed over the target. The rename replaces the name itself: a symlink planted at
# the target is replaced, never written through. The temporary file is created with mode 0666 and
# the kernel applies the umask, as for any file the user makes (mkstemp's would stay 0600).

# the name a killed atomic write leaves: .<target name>.<8 random characters>.tmp
# ([a-z0-9_]: mkstemp's characters too, which older versions used)
TMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def create_tmp(path: Path) -> tuple[int, str]:
    """A new file named as TMP_NAME beside path, open for writing: (its descriptor, its path).
    O_EXCL never opens an existing name, a symlink included."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(99):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 2^32 names: only a folder full of them gets here twice
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextlib.contextmanager
def naming(path):
    """A system error without a file name (a full disk, a quota, an I/O error) re-raised naming the
    file being written, so that cli.run prints `error: <path>: <reason>`."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or not e.strerror:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_tmp(path)
    try:
        with naming(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only when something failed before the rename
            os.unlink(tmp)


def atomic_write_figure(fig, path):
    """A matplotlib figure as a PNG, written atomically (savefig itself opens the path, following a
    symlink planted there)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_file(tensors: dict, path, metadata: dict | None = None):
    """safetensors, written atomically; metadata values must be strings (the format's rule)."""
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def append_jsonl(path, row: dict):
    """One row per call, written with one write() and fsynced: an interrupted run loses at most its
    last row."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a symlink planted at the name is an error (ELOOP), never a file written elsewhere
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    with naming(path), os.fdopen(os.open(path, flags, 0o666), "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
