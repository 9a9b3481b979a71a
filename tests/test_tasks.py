"""tasks.py: lm-evaluation-harness GSM8K scoring on hand-made cases (each expected value is what the
yaml's regex and normalisation give, worked out in the comment), fact scoring, JSONL errors naming
file:line, answer-only labels on a real (tiny, byte-level BPE) tokenizer with SmolLM2's ChatML
template, batching, batched greedy answering on a tiny random model, atomic writes (the committed
data/ sets: tests/test_data.py). CPU, seconds."""

import errno
import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open

import cli
import model as M
import tasks
from tests.tiny import make_tokenizer

# -----------------------------------------------------------------------------
# reasoning: both lm-eval filters, then its normalisation

GOLD_GSM8K = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("So she has 72 clips.\n#### 72", "72", "72"),
        ("#### -5", "-5", "-5"),  # the minus sign is part of both regexes
        # flexible's first group takes $ , . runs of 2+ characters
        ("It costs $1,234.", None, "$1,234."),
        # the trailing period is kept by the filter, dropped by normalising
        ("#### 72.", "72.", "72."),
        # no digit: both filters find nothing ("[invalid]" in lm-eval)
        ("I do not know.", None, None),
        ("3 apples, then 12, finally 15", None, "15"),  # flexible takes the LAST match
        ("#### 5 and later #### 7", "5", "7"),  # strict takes the FIRST match
        # no "#### ": strict fails, flexible still reads it
        ("The answer is 42", None, "42"),
        ("####42", None, "42"),  # strict needs the space after ####
        # one digit: only flexible's second group matches
        ("x = 7", None, "7"),
    ],
)
def test_extractors_follow_lm_eval_regexes(text, strict, flexible):
    assert tasks.extract_strict(text) == strict
    assert tasks.extract_flexible(text) == flexible


@pytest.mark.parametrize(
    "prediction, gold, strict, flexible",
    [
        ("She sold 72 clips.\n#### 72", GOLD_GSM8K, True, True),
        ("#### 1,234", "#### 1234", True, True),  # commas removed from the prediction
        ("#### 1234", "#### 1,234", True, True),  # ... and from the gold
        # "$18." -> "18": $ and the trailing period removed
        ("It costs $18.", "#### 18", False, True),
        ("#### 72.", "#### 72", True, True),
        ("#### -5", "#### -5", True, True),
        ("#### 5", "#### -5", False, False),  # a minus sign is kept: 5 != -5
        ("#### -5", "#### 5", False, False),
        # exact string match after normalising, as lm-eval
        ("#### 3.50", "#### 3.5", False, False),
        ("no idea", "#### 7", False, False),
        # the two filters can disagree: both are reported
        ("#### 7 but really 8", "#### 7", True, False),
        ("7 + 1 = 8\n#### 8", "8", True, True),  # a plain numeric gold
    ],
)
def test_score_reasoning(prediction, gold, strict, flexible):
    assert tasks.score_reasoning(prediction, gold) == {"strict": strict, "flexible": flexible}


@pytest.mark.parametrize(
    "answer, number",
    [
        (GOLD_GSM8K, "72"),
        ("42", "42"),
        ("$1,000", "1000"),
        ("-3", "-3"),
        ("a\n#### 2.5", "2.5"),
        ("about 42", None),
        ("two steps\n42", None),
        ("#### x", None),
        ("", None),
    ],
)
def test_gold_number(answer, number):
    assert tasks.gold_number(answer) == number


# -----------------------------------------------------------------------------
# facts: SQuAD normalisation, whole words in the first line


@pytest.mark.parametrize(
    "prediction, gold, correct",
    [
        ("The capital of Veltoria is Drasmund.", "Drasmund", True),
        ("It is DRASMUND!", "Drasmund", True),
        ("Drasmundia", "Drasmund", False),  # whole words only
        ("I am not sure.\nDrasmund", "Drasmund", False),  # only the first non-empty line counts
        ("\n\nDrasmund", "Drasmund", True),
        ("He was born in 1847.", "1847", True),
        ("He was born in 18470.", "1847", False),
        ("The Hague", "Hague", True),  # articles removed
        ("Bogotá", "Bogota", True),  # accents folded
        ("Founded by Marela Quintor.", "Marela Quintor", True),
        ("Founded by Marela.", "Marela Quintor", False),
        # a gold that normalises to nothing never matches
        ("anything", "!!", False),
    ],
)
def test_fact_correct(prediction, gold, correct):
    assert tasks.fact_correct(prediction, gold) is correct


def test_normalize_answer():
    assert tasks.normalize_answer("  The  Café, of an   OWL! ") == "cafe of owl"


# -----------------------------------------------------------------------------
# bad input: every problem names path:LINE


def write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD = '{"question": "q", "answer": "#### 1"}\n'


@pytest.mark.parametrize(
    "content, line, problem",
    [
        (GOOD + '{"question": "q2", "answer": \n', 2, "malformed JSON"),
        (GOOD + "[1, 2]\n", 2, "expected a JSON object"),
        # blank lines skipped, still counted
        (GOOD + "\n" + '{"question": "q2"}\n', 3, "missing field 'answer'"),
        (GOOD + '{"question": "q2", "answer": "  "}\n', 2, "empty field 'answer'"),
        (GOOD + '{"question": 3, "answer": "1"}\n', 2, "non-string field 'question'"),
        (GOOD + '{"question": "A?\\u0000", "answer": "1"}\n', 2, "control character '\\x00'"),
        (GOOD + '{"question": "A?", "answer": "1\\u001b"}\n', 2, "control character '\\x1b'"),
        (
            GOOD.encode() + b'{"question": "\xff", "answer": "1"}\n',
            2,
            "malformed JSON",
        ),  # not UTF-8
        ("", 1, "empty file"),
        ("\n  \n", 1, "empty file"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, line, problem):
    path = write(tmp_path, content)
    with pytest.raises(
        tasks.DataError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(problem)
    ):
        tasks.read_jsonl(path)


def test_read_jsonl_reports_every_problem_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path, '{"question": "a"}\n{oops\n' + GOOD)
    with pytest.raises(tasks.DataError) as e:
        tasks.read_jsonl(path)
    assert f"{path}:1: missing field 'answer'" in str(
        e.value
    ) and f"{path}:2: malformed JSON" in str(e.value)
    assert [r["_line"] for r in tasks.read_jsonl(write(tmp_path, "\n" + GOOD + "\n" + GOOD))] == [
        2,
        4,
    ]


def test_read_facts_takes_csv_as_jsonl(tmp_path):
    """The same facts from a spreadsheet's CSV (byte-order mark, a quoted cell over two lines,
    a blank row, padded empty cells) as from JSONL, line numbers the rows' first lines."""
    path = tmp_path / "facts.csv"
    rows = (
        "\ufeffQuestion,Answer,paraphrase,paraphrase\n"
        'What is the capital of Veltoria?,Drasmund,"Veltoria\'s capital, please?",\n'
        "\n"
        '"Who founded\nOrvale?",Ada Brennick,,\n'
    )
    path.write_text(rows, encoding="utf-8")
    want = [
        {"question": "What is the capital of Veltoria?", "answer": "Drasmund", "_line": 2},
        {"question": "Who founded\nOrvale?", "answer": "Ada Brennick", "_line": 4},
    ]
    want[0]["paraphrases"] = ["Veltoria's capital, please?"]
    want[1]["paraphrases"] = []
    assert tasks.read_facts(path) == want
    jsonl = write(tmp_path, "".join(json.dumps(r) + "\n" for r in want))
    assert tasks.read_facts(jsonl) == [{**r, "_line": i + 1} for i, r in enumerate(want)]


@pytest.mark.parametrize(
    "content, line, problem",
    [
        ("question,answer\nWhat?,Drasmund\n,Orvale\n", 3, "empty field 'question'"),
        ("question,answer\nWhat?\n", 2, "empty field 'answer'"),
        ("question,answer\nWhat?,Dras\x01mund\n", 2, "control character '\\x01' in field 'answer'"),
        ("question,reply\nWhat?,Drasmund\n", 1, "header must be question,answer"),
        ('question,answer\nWhat?,"Drasmund\n', 2, "malformed CSV"),
        ("question,answer\n\n", 3, "no facts after the header"),
        ("\n", 1, "empty file"),
        (b"question,answer\nWhat?,Dr\xe4smund\n", 2, "not UTF-8"),
    ],
)
def test_read_facts_csv_errors_name_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "facts.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(tasks.DataError, match=re.escape(f"{path}:{line}: {problem}")):
        tasks.read_facts(path)


def test_check_reasoning_names_the_line_without_a_final_number(tmp_path):
    path = write(tmp_path, GOOD + '{"question": "q", "answer": "it is 4 or so"}\n' + GOOD)
    with pytest.raises(tasks.DataError, match=re.escape(f"{path}:2: answer has no final number")):
        tasks.check_reasoning(tasks.read_jsonl(path), path)
    tasks.check_reasoning(
        tasks.read_jsonl(write(tmp_path, GOOD + '{"question": "p", "answer": "42"}\n')), path
    )


def fact_line(question, answer="Drasmund", **extra):
    return json.dumps({"question": question, "answer": answer, **extra}) + "\n"


def test_check_facts_errors(tmp_path):
    path = write(
        tmp_path, fact_line("Capital of X?") + fact_line("Where?") + fact_line("capital of  x?")
    )
    with pytest.raises(
        tasks.DataError, match=re.escape(f"{path}:3: duplicate question (same as line 1)")
    ):
        tasks.check_facts(tasks.read_jsonl(path), path)
    # an empty answer: caught on reading
    path = write(tmp_path, fact_line("A?") + fact_line("B?", answer=""))
    with pytest.raises(tasks.DataError, match=re.escape(f"{path}:2: empty field 'answer'")):
        tasks.read_jsonl(path)
    # empty once normalised: could never be scored correct
    path = write(tmp_path, fact_line("A?", answer="..."))
    with pytest.raises(
        tasks.DataError, match=re.escape(f"{path}:1: answer '...' is empty after normalisation")
    ):
        tasks.check_facts(tasks.read_jsonl(path), path)
    for bad in ("one phrasing", ["ok", ""], ["ok", 3]):
        path = write(tmp_path, fact_line("A?") + fact_line("B?", paraphrases=bad))
        with pytest.raises(
            tasks.DataError, match=re.escape(f"{path}:2: 'paraphrases' must be a list")
        ):
            tasks.check_facts(tasks.read_jsonl(path), path)


# -----------------------------------------------------------------------------
# tokenised examples: answer-only labels, end of turn, too-long items


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return M.Tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def test_encode_example_masks_the_prompt_and_ends_with_im_end(tokenizer):
    question, answer = "What is 7 * 6?", "7 * 6 = 42\n#### 42"
    ids, labels = tasks.encode_example(tokenizer, question, answer, max_len=512)
    prompt = tokenizer.encode(tasks.chat_prompt(tokenizer, question), add_special_tokens=False)
    target = tokenizer.encode(answer, add_special_tokens=False)
    im_end = tokenizer.tokenizer.token_to_id("<|im_end|>")
    assert tasks.chat_prompt(tokenizer, question).endswith("<|im_start|>assistant\n")
    assert ids == prompt + target + [im_end] and im_end in tokenizer.eos_ids
    assert labels == [-100] * len(prompt) + target + [im_end]
    assert (
        tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=False)
        == answer + "<|im_end|>"
    )


def test_encode_example_drops_calculator_annotations_and_skips_too_long(tokenizer):
    ids, labels = tasks.encode_example(tokenizer, "q", GOLD_GSM8K, 4096)
    answer = tokenizer.decode([t for t in labels if t != -100])
    assert "<<" not in answer and answer == GOLD_GSM8K.replace("<<48/2=24>>", "").replace(
        "<<48+24=72>>", ""
    )
    # fits exactly
    assert tasks.encode_example(tokenizer, "q", GOLD_GSM8K, len(ids)) == (ids, labels)
    # skipped, never cut
    assert tasks.encode_example(tokenizer, "q", GOLD_GSM8K, len(ids) - 1) == (None, None)


def test_end_of_turn_is_read_from_the_template(tmp_path):
    folder = make_tokenizer(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # a Llama-3-like template whose turns end in another token, which is the eos
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = M.Tokenizer(folder)
    end = tok.tokenizer.token_to_id("<|endoftext|>")
    assert tasks.end_of_turn(tok) == [end]
    assert tasks.encode_example(tok, "q", "42", 64)[0][-1] == end
    # no eos after a turn
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # still learns to stop
    assert tasks.end_of_turn(M.Tokenizer(folder)) == [min(M.Tokenizer(folder).eos_ids)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate(side):
    examples = [([5, 6, 7], [-100, 6, 7]), ([8], [8])]
    tokens, labels, mask = tasks.collate(examples, pad_id=0, side=side)
    assert tokens.shape == labels.shape == mask.shape == (2, 3) and tokens.dtype == torch.long
    row = [8, 0, 0] if side == "right" else [0, 0, 8]
    assert tokens.tolist() == [[5, 6, 7], row]
    assert labels.tolist() == [[-100, 6, 7], [8 if t == 8 else -100 for t in row]]
    assert mask.tolist() == [[1, 1, 1], [int(t == 8) for t in row]]


# -----------------------------------------------------------------------------
# batched greedy answering on a tiny random model


def test_answer_batched_equals_one_by_one(tokenizer):
    torch.manual_seed(0)  # a random model built directly: no transformers import, no files
    args = M.ModelArgs(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=None,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
    )
    net, tok = M.Transformer(args).eval(), tokenizer
    questions = [
        "What is 7 * 6?",
        "Hi",
        "The quick brown fox jumps over the lazy dog. 12345 + 678 = ?",
    ]
    # sorted by length, then restored
    batched = tasks.answer(net, tok, questions, max_new_tokens=6, batch_size=2)
    alone = [tasks.answer(net, tok, [q], max_new_tokens=6, batch_size=1)[0] for q in questions]
    assert batched == alone
    new = M.generate(
        net,
        [tok.encode(tasks.chat_prompt(tok, questions[0]), add_special_tokens=False)],
        6,
        tok.eos_ids,
    )
    assert batched[0] == tok.decode(new[0])  # only the new tokens, decoded


@pytest.mark.parametrize(
    "line, why",
    [
        (b'{"question": "A?", "answer": 1' + b"0" * 5000 + b"}", "Exceeds the limit"),
        (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth"),
        (b'{"question": "caf\xe9?", "answer": "x"}', "invalid continuation byte"),
    ],
    ids=["huge integer", "deep nesting", "latin-1"],
)
def test_a_line_json_cannot_read_names_its_line(tmp_path, line, why):
    """Python's json refuses these with ValueError or RecursionError, not JSONDecodeError."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"question": "A?", "answer": "x"}\n' + line + b"\n")
    with pytest.raises(tasks.DataError, match=rf"x.jsonl:2: malformed JSON \(.*{why}"):
        tasks.read_jsonl(path)


# -----------------------------------------------------------------------------
# atomic writes


def test_atomic_writes_leave_no_temp_file(tmp_path):
    tasks.atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    tasks.atomic_write_text(tmp_path / "sub" / "a.txt", "two")
    tasks.atomic_write_json(tmp_path / "sub" / "b.json", {"x": [1, 2]})
    tasks.atomic_save_file(
        {"z": torch.arange(3.0)}, tmp_path / "sub" / "c.safetensors", {"identity": "abc"}
    )
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.txt", "b.json", "c.safetensors"]
    assert (tmp_path / "sub" / "a.txt").read_text() == "two"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": [1, 2]}
    with safe_open(tmp_path / "sub" / "c.safetensors", "pt") as f:
        assert f.metadata() == {"identity": "abc"} and f.get_tensor("z").tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "state.json"
    tasks.atomic_write_json(target, {"step": 1})

    def crash(*args):
        raise KeyboardInterrupt  # as Ctrl-C between the write and the rename

    monkeypatch.setattr(tasks.os, failing, crash)
    with pytest.raises(KeyboardInterrupt):
        tasks.atomic_write_json(target, {"step": 2, "big": "x" * 100_000})
    assert json.loads(target.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("write", ["json", "jsonl"])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, write):
    """ENOSPC carries no file name: the write re-raises it naming its target, so the user reads
    `error: <path>: No space left on device` (exit 2, no traceback), and the old file stays."""
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tasks.os, "fsync", full)
    writer = tasks.atomic_write_json if write == "json" else tasks.append_jsonl
    with pytest.raises(SystemExit) as exit_:
        cli.run(writer, target, {"step": 2})
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {target}: {os.strerror(errno.ENOSPC)}\n"
    if write == "json":
        assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_writes_replace_a_symlink_never_write_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.txt").symlink_to(victim)
    tasks.atomic_write_text(tmp_path / "run" / "a.txt", "ours")
    assert victim.read_text() == "mine"
    assert not (tmp_path / "run" / "a.txt").is_symlink()
    assert (tmp_path / "run" / "a.txt").read_text() == "ours"


def test_a_figure_is_written_atomically_not_through_a_symlink(tmp_path):
    import matplotlib

    matplotlib.use("Agg")  # no display
    from matplotlib import pyplot

    victim = tmp_path / "victim.png"
    victim.write_bytes(b"mine")
    (tmp_path / "plot.png").symlink_to(victim)
    fig, ax = pyplot.subplots()
    ax.plot([0, 1], [1, 0])
    tasks.atomic_write_figure(fig, tmp_path / "plot.png")
    pyplot.close(fig)
    assert victim.read_bytes() == b"mine" and not (tmp_path / "plot.png").is_symlink()
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_append_jsonl_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("mine\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        tasks.append_jsonl(tmp_path / "metrics.jsonl", {"step": 0})
    assert victim.read_text() == "mine\n"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_outputs_respect_the_umask(tmp_path, umask):
    """A file written here has the mode any file the user makes has: 0666 less the umask."""
    old = os.umask(umask)
    try:
        tasks.atomic_write_text(tmp_path / "a.txt", "x")
        tasks.append_jsonl(tmp_path / "m.jsonl", {"step": 0})
    finally:
        os.umask(old)
    for name in ("a.txt", "m.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_append_jsonl(tmp_path):
    for step in range(3):
        tasks.append_jsonl(
            tmp_path / "m" / "metrics.jsonl", {"step": step, "loss": 1.0 / (step + 1)}
        )
    rows = tasks.read_jsonl(tmp_path / "m" / "metrics.jsonl", required=())
    assert [r["step"] for r in rows] == [0, 1, 2]


def test_answering_shows_progress_on_stderr_unless_quiet(tokenizer, capsys):
    torch.manual_seed(0)
    args = M.ModelArgs(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=None,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
    )
    net = M.Transformer(args).eval()
    tasks.answer(
        net, tokenizer, ["Hi", "Ho", "Hu"], max_new_tokens=2, batch_size=2, desc="scoring x"
    )
    shown = capsys.readouterr()
    assert "scoring x: 100%|" in shown.err and "3/3" in shown.err and "answer/s" in shown.err
    assert shown.out == ""
    tasks.answer(net, tokenizer, ["Hi"], max_new_tokens=2, desc="scoring x", quiet=True)
    assert capsys.readouterr().err == ""


def test_input_covariances_batch_by_length_as_one_at_a_time(setup):
    """Examples of one length run as one batch: every covariance equals the sum of x xᵀ over each
    example run alone (float64 sums, float32 forwards), and no padding row counts."""
    import palora

    model, tokenizer = M.load(setup.ckpt)
    records = [
        {"question": q, "answer": a}
        for q, a in [
            ("Hi?", "Yes"),
            ("Who?", "Ann"),
            ("What is it?", "A long answer"),
            ("Ok?", "No"),
        ]
    ]
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj"]
    got = tasks.input_covariances(model, tokenizer, records, names, 512)
    ids = [tasks.encode_example(tokenizer, r["question"], r["answer"], 512)[0] for r in records]
    assert len({len(x) for x in ids}) < len(ids)  # some share a length: a batch of 2+ rows
    alone = palora.activation_covariances(
        model, names, lambda: [model(torch.tensor([x])) for x in ids]
    )
    for n in names:
        assert torch.allclose(got[n], alone[n], rtol=1e-5, atol=1e-5 * alone[n].abs().max())
