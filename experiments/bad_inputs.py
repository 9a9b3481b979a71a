"""Bad input through every script's command line, case by case (issue 22). Each case must end in
one line `error: ...` on stderr, exit status 2, no traceback; every file it did not make left as
it was (content and kind: a symlink stays a symlink), and no new file anywhere but the SVD cache.
Run on the tiny random setup of tests/ (no weights, no network), in process, as each script's
__main__ runs it (cli.run). Prints the table by cause, tried / passed, and every failure.

    python experiments/bad_inputs.py [--out docs/results/bad-inputs.md] [--only CAUSE]
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

import cli  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
import inject  # noqa: E402
import model as model_lib  # noqa: E402
import reproduce  # noqa: E402
import tasks  # noqa: E402
import tiny  # noqa: E402
import train_svf  # noqa: E402
from runs import FACTS, SKILL, config, make_expert  # noqa: E402

SCRIPTS = {  # name -> (module, parsed by cli.parse_config from its Config)
    "train_svf": (train_svf, True),
    "inject": (inject, True),
    "evaluate": (evaluate, True),
    "reproduce": (reproduce, True),
    "export": (export, False),
    "model": (model_lib, False),
}
BIG = str(10**12)

# -----------------------------------------------------------------------------
# the setup: a tiny checkpoint, an expert, data, a finished run, and broken copies of each

BROKEN_JSONL = {
    "torn": '{"question": "A?", "answer": "x"}\n{"question": "B?", "ans',
    "noanswer": '{"question": "A?"}\n',
    "empty": "",
    "blank": "\n\n",
    "list": "[1, 2]\n",
    "nonstring": '{"question": "A?", "answer": 7}\n',
    "emptyanswer": '{"question": "A?", "answer": ""}\n',
    "nul": '{"question": "A?\\u0000", "answer": "x"}\n',
    "nonumber": '{"question": "What is 1 + 1?", "answer": "two"}\n',
    "duplicate": '{"question": "A?", "answer": "x"}\n{"question": "A?", "answer": "y"}\n',
}


def build(root: Path) -> dict:
    """Every path the cases name, by key."""
    ckpt = tiny.make_tiny_llama(root / "ckpt")
    p = {"root": root, "ckpt": ckpt, "cache": root / "cache", "out": root / "out"}
    p["svf"] = make_expert(root, ckpt)
    p["facts"] = tiny.write_jsonl(root / "facts.jsonl", FACTS)
    p["skill"] = tiny.write_jsonl(root / "skill.jsonl", SKILL)
    p["known"] = tiny.write_jsonl(root / "known.jsonl", FACTS[:4])
    for name, text in BROKEN_JSONL.items():
        p[name] = root / f"{name}.jsonl"
        p[name].write_text(text)
    p["badutf8"] = root / "badutf8.jsonl"
    p["badutf8"].write_bytes(b'{"question": "A\xff?", "answer": "x"}\n')
    p["adir"] = root / "adir"
    p["adir"].mkdir()
    p["afile"] = root / "afile.txt"
    p["afile"].write_text("mine")
    p["userdir"] = root / "userdir"
    p["userdir"].mkdir()
    (p["userdir"] / "notes.txt").write_text("mine")
    (p["userdir"] / ".draft.12345678.tmp").write_text("mine too")
    settings = dict(svd_cache=str(p["cache"]), epochs=1, method="lora", save_every=100)
    p["run"] = root / "run"
    inject.main(config(SimpleSetup(p), p["run"], **settings))
    p["notrun"] = root / "notrun"
    p["notrun"].mkdir()
    (p["notrun"] / "config.json").write_text('{"method": "lora"}')
    broken_checkpoints(p)
    broken_runs(p)
    return p


class SimpleSetup:
    """What runs.config reads from the tests' setup fixture."""

    def __init__(self, p):
        self.ckpt, self.svf, self.facts, self.cache = p["ckpt"], p["svf"], p["facts"], p["cache"]


def edited_config(p, key, change):
    """A copy of the checkpoint whose config.json is change(config) (a dict) or a raw string."""
    folder = p["root"] / f"ckpt-{key}"
    shutil.copytree(p["ckpt"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    text = change(cfg)
    (folder / "config.json").write_text(text if isinstance(text, str) else json.dumps(text))
    p[f"ckpt-{key}"] = folder


def broken_checkpoints(p):
    edited_config(p, "notjson", lambda c: "{not json")
    edited_config(p, "nohidden", lambda c: {k: v for k, v in c.items() if k != "hidden_size"})
    edited_config(p, "neglayers", lambda c: {**c, "num_hidden_layers": -1})
    edited_config(p, "hugevocab", lambda c: {**c, "vocab_size": 10**12})
    edited_config(p, "oddheads", lambda c: {**c, "num_key_value_heads": 3})
    edited_config(p, "strhidden", lambda c: {**c, "hidden_size": "64"})
    nan = {"rope_theta": float("nan")}  # where transformers 5 writes it
    edited_config(p, "nanrope", lambda c: {**c, "rope_parameters": c["rope_parameters"] | nan})
    edited_config(p, "arch", lambda c: {**c, "architectures": ["GPT2LMHeadModel"]})
    edited_config(p, "notok", lambda c: c)
    (p["ckpt-notok"] / "tokenizer.json").unlink()
    edited_config(p, "badtok", lambda c: c)
    (p["ckpt-badtok"] / "tokenizer.json").write_text("{torn")
    edited_config(p, "badheader", lambda c: c)
    shard = sorted(p["ckpt-badheader"].glob("*.safetensors"))[0]
    shard.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    edited_config(p, "noshard", lambda c: c)
    sorted(p["ckpt-noshard"].glob("*.safetensors"))[-1].unlink()
    edited_config(p, "empty", lambda c: c)
    for f in p["ckpt-empty"].glob("*.safetensors*"):
        f.unlink()


def broken_runs(p):
    """Copies of the finished run with one file broken."""
    for key, name, text in [
        ("run-noconfig", "config.json", None),
        ("run-badconfig", "config.json", "{torn"),
        ("run-noadapter", "adapter_model.safetensors", None),
        ("run-badadapter", "adapter_model.safetensors", "garbage"),
        ("run-nosummary", "summary.json", None),
    ]:
        folder = p["root"] / key
        shutil.copytree(p["run"], folder)
        (folder / name).unlink()
        if text is not None:
            (folder / name).write_text(text)
        p[key] = folder
    lock = p["root"] / "run-locklink"
    shutil.copytree(p["run"], lock)
    (lock / "adapter_model.safetensors").unlink()
    (lock / "summary.json").unlink()
    (lock / ".lock").unlink(missing_ok=True)
    (lock / ".lock").symlink_to(p["afile"])
    p["run-locklink"] = lock


# -----------------------------------------------------------------------------
# the cases: (cause, script, argv); {key} is a path of build(), BASE the script's good flags

BASE = {
    "train_svf": "--ckpt {ckpt} --data {skill} --eval-data {skill} --steps 1 --device cpu "
    "--svd-cache {cache} --out {out}",
    "inject": "--ckpt {ckpt} --svf {svf} --facts {facts} --mix-skill none --mix-known {known} "
    "--skill-data {skill} --epochs 1 --device cpu --svd-cache {cache} --out {out}",
    "evaluate": "--ckpt {ckpt} --reasoning {skill} --reasoning-ood {skill} --known {known} "
    "--facts {facts} --limit 2 --device cpu --svd-cache {cache} --score-cache '' --out {out}",
    "reproduce": "--ckpt {ckpt} --svf {svf} --facts {facts} --n-facts 4 --methods lora "
    "--seeds 0 --reasoning {skill} --reasoning-ood {skill} --known {known} --limit 2 "
    "--max-new-tokens 4 "
    "--device cpu --out {out}",
    "export": "--svd-cache {cache}",  # each case names the run, the output and --to
    "model": "hi --ckpt {ckpt} --svd-cache {cache} --device cpu --max-new-tokens 2",
}


def cases():
    """(cause, script, extra argv), the extra flags overriding BASE's (argparse: last one wins)."""
    out = []

    def add(cause, script, *argvs):
        out.extend((cause, script, a) for a in argvs)

    add(
        "data loss",
        "train_svf",
        "--out {userdir}",
        "--out {userdir} --overwrite",
        "--out {ckpt} --overwrite",
        "--out {run} --overwrite",
    )
    add(
        "data loss",
        "inject",
        "--out {userdir}",
        "--out {userdir} --overwrite",
        "--out {ckpt} --overwrite",
        "--out {root}/svf --overwrite",
        "--out {run-locklink} --resume",
        "--out {run-locklink} --overwrite",
    )
    add(
        "data loss",
        "export",
        "{run} {afile} --to gguf",
        "{run} {userdir} --to hf",
        "{run} {ckpt} --to hf",
    )
    add("data loss", "reproduce", "--out {userdir}", "--out {ckpt}")
    add(
        "flag values",
        "train_svf",
        "--lr nan",
        "--lr inf",
        "--lr -1",
        "--steps 0",
        f"--steps {BIG}",
        "--batch-size 0",
        "--seed -1",
        f"--seed {2**70}",
        "--device cuda",
        "--device cuda:7",
        "--device meta",
        "--device tpu",
        "--eval-every -1",
        "--kl-coef nan",
    )
    add(
        "flag values",
        "inject",
        "--rank 0",
        "--alpha 0",
        "--probe-fraction 1.5",
        "--probe-fraction 0",
        "--recall-target 2",
        "--epochs 0",
        "--batch-size -3",
        "--warmup 1",
        "--mix-ratio -1",
        "--device cuda",
        "--dtype float16",
        "--method nope",
        "--probe-threshold -1",
        "--schedule linear",
    )
    add(
        "flag values",
        "evaluate",
        "--limit -1",
        "--max-new-tokens -1",
        "--tolerance nan",
        "--device cuda:3",
        "--batch-size 0",
        "--fact-tokens 0",
    )
    add(
        "flag values",
        "reproduce",
        "--seeds a,b",
        "--seeds ''",
        "--methods nope",
        "--n-facts -1",
        "--every 0",
        "--stream -1",
        "--lr 0",
    )
    add(
        "flag values",
        "model",
        "--temperature -1",
        "--top-p 0",
        "--top-p nan",
        f"--seed {2**70}",
        "--device cuda:9",
        "--max-new-tokens -5",
    )
    add("flag values", "export", "{run} {out} --to onnx", "{run} {out} --to gguf --dtype q4")
    add(
        "flags that do nothing",
        "inject",
        "--act-known {known} --method lora",
        "--output-side none --method palora",
        "--targets nope",
        "--targets ' , '",
        "--resume --overwrite",
        "--after {run} --method imsm",
        "--after {out}",
        "--mix-earlier 1",
        "--unknown-flag 1",
        "--epoch 3",
    )
    add(
        "flags that do nothing",
        "train_svf",
        "--objective rl --mix-known {known}",
        "--objective rl --batch-size 1 --rl-samples 1",
        "--targets q_proj,nope",
    )
    add(
        "flags that do nothing", "evaluate", "--adapter {run} --svf none --verify {run}", "--limi 3"
    )
    facts = [k for k in [*BROKEN_JSONL, "badutf8"] if k != "nonumber"]  # a fact needs no number
    add("JSON and text", "inject", *(f"--facts {{{k}}}" for k in facts))
    add("JSON and text", "train_svf", *(f"--data {{{k}}}" for k in [*BROKEN_JSONL, "badutf8"]))
    add(
        "JSON and text",
        "evaluate",
        "--reasoning {torn}",
        "--reasoning-ood {nonumber}",
        "--known {list}",
        "--facts {empty}",
        "--known {badutf8}",
    )
    add(
        "paths",
        "inject",
        "--facts {adir}",
        "--facts {root}/missing.jsonl",
        "--out {afile}",
        "--out {afile}/sub",
        "--svd-cache {afile}",
        "--mix-known {adir}",
        "--svf {adir}",
        "--svf {afile}",
        "--facts " + "x" * 300 + ".jsonl",
        "--skill-data {adir}",
    )
    add(
        "paths",
        "train_svf",
        "--data {adir}",
        "--out {afile}",
        "--out {afile}/sub",
        "--svd-cache {afile}/svd",
        "--eval-data {root}/missing.jsonl",
    )
    add(
        "paths",
        "evaluate",
        "--out {afile}",
        "--out {afile}/sub",
        "--reasoning {adir}",
        "--svd-cache {afile}",
    )
    add("paths", "model", "--svf {adir}", "--run {afile}", "--svd-cache {afile}")
    add("paths", "export", "{afile} {out} --to hf", "{run} {afile}/x --to peft")
    for key in [
        "notjson",
        "nohidden",
        "neglayers",
        "hugevocab",
        "oddheads",
        "strhidden",
        "nanrope",
        "arch",
        "notok",
        "badtok",
        "badheader",
        "noshard",
        "empty",
    ]:
        add("checkpoints", "model", f"--ckpt {{ckpt-{key}}}")
        add("checkpoints", "inject", f"--ckpt {{ckpt-{key}}}")
    add("checkpoints", "inject", "--ckpt {adir}", "--ckpt nosuchname")
    add("checkpoints", "evaluate", "--ckpt {ckpt-notjson}", "--ckpt {afile}")
    add(
        "run folders",
        "evaluate",
        *(
            f"--adapter {{{k}}}"
            for k in [
                "run-noconfig",
                "run-badconfig",
                "run-noadapter",
                "run-badadapter",
                "notrun",
                "adir",
                "afile",
            ]
        ),
    )
    add(
        "run folders",
        "evaluate",
        "--verify {run-badadapter}",
        "--verify {notrun}",
        "--probe-report {afile}",
        "--probe-report {run-badadapter}/adapter_model.safetensors",
    )
    add(
        "run folders",
        "inject",
        "--after {run-noconfig}",
        "--after {run-badadapter}",
        "--after {notrun}",
        "--after {afile}",
        "--out {run} --resume",
    )
    add(
        "run folders",
        "export",
        *(
            f"{{{k}}} {{out}} --to hf"
            for k in ["run-noconfig", "run-badconfig", "run-noadapter", "run-badadapter", "notrun"]
        ),
    )
    add("run folders", "model", "--run {run-badadapter}", "--run {notrun}", "--run {adir}")
    add(
        "sizes before allocation",
        "evaluate",
        f"--max-new-tokens {BIG}",
        f"--batch-size {BIG}",
        f"--fact-tokens {BIG}",
    )
    add(
        "sizes before allocation",
        "inject",
        "--rank 100000",
        f"--smf-slots {BIG} --method smf",
        f"--act-examples {BIG}",
        f"--max-len {BIG}",
        f"--fact-tokens {BIG}",
        f"--batch-size {BIG}",
    )
    add(
        "sizes before allocation",
        "train_svf",
        f"--rl-samples {BIG} --objective rl",
        f"--max-len {BIG}",
        f"--max-new-tokens {BIG}",
        f"--eval-batch-size {BIG}",
    )
    add("sizes before allocation", "reproduce", f"--max-new-tokens {BIG}")
    return out


# -----------------------------------------------------------------------------
# one case: run it, then judge its stderr, exit status and the files


def snapshot(root: Path) -> dict:
    """path -> what it is: a symlink's target, a file's sha256, or 'folder'."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                seen[path] = "-> " + os.readlink(path)
            elif path.is_dir():
                seen[path] = "folder"
            else:
                seen[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def attempt(script: str, argv: list) -> tuple:
    """(exit status or 'traceback', stderr)."""
    module, configured = SCRIPTS[script]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if configured:
                cli.run(module.main, cli.parse_config(module.Config, argv))
            else:
                cli.run(module.main, argv)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # a bug: cli.run let it through
            code = "traceback"
            err.write(traceback.format_exc())
    return code, err.getvalue()


def judge(code, err: str, before: dict, after: dict, cache: Path) -> str:
    """'' when the case passed, else why not."""
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    if code == "traceback" or "Traceback" in err:
        return "traceback: " + err.strip().splitlines()[-1][:120]
    if code != 2:
        return f"exit {code}" + (f" ({lines[-1][:100]})" if lines else ", nothing said")
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    changed = [p for p, v in before.items() if after.get(p) != v]
    if changed:
        return f"touched {changed[0]}"
    made = [p for p in after if p not in before and cache not in p.parents and p != cache]
    if made:
        return f"wrote {made[0]}"
    return ""


def run_case(p: dict, script: str, extra: str) -> tuple:
    """(stderr's error line, why it failed or '')."""
    values = {k: str(v) for k, v in p.items()}
    argv = shlex.split(BASE[script].format(**values)) + shlex.split(extra.format(**values))
    before = snapshot(p["root"])
    code, err = attempt(script, argv)
    after = snapshot(p["root"])
    for made in [p["out"]]:  # a case that wrote --out is judged, then cleaned for the next
        if made.exists() and made not in before:
            shutil.rmtree(made) if made.is_dir() else made.unlink()
    line = next((x for x in err.splitlines() if x.startswith("error: ")), "")
    return line, judge(code, err, before, after, p["cache"])


def table(results: list) -> str:
    causes = {}
    for cause, *_rest, why in results:
        tried, passed = causes.get(cause, (0, 0))
        causes[cause] = (tried + 1, passed + (why == ""))
    rows = ["| cause | tried | passed |", "| --- | --- | --- |"]
    rows += [f"| {c} | {t} | {p} |" for c, (t, p) in causes.items()]
    total = (sum(t for t, _ in causes.values()), sum(p for _, p in causes.values()))
    rows.append(f"| **all** | **{total[0]}** | **{total[1]}** |")
    failed = [f"- {c}: `{s} {a}`: {why}" for c, s, a, _, why in results if why]
    return "\n".join(rows + ["", "Failed:" if failed else "None failed.", *failed]) + "\n"


def run_all(root: Path, only: str = "") -> list:
    """Every case (or those holding `only`) on a setup built under root: (cause, script, flags,
    error line, why it failed or '')."""
    p = build(root / "setup")
    results = []
    for cause, script, extra in cases():
        if only and only not in f"{cause} {script} {extra}":
            continue
        line, why = run_case(p, script, extra)
        results.append((cause, script, extra, line, why))
        mark = "BAD" if why else "ok "
        print(f"{mark} {script} {extra[:60]} | {why} | {line[:100]}", file=sys.stderr)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="also write the table here (markdown)")
    parser.add_argument("--only", default="", help="only the cases whose cause or flags hold it")
    args = parser.parse_args()
    report = Path(args.out).resolve() if args.out else None  # before the chdir below
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # a relative default (runs/, cache/) lands here, never in the repository
        text = table(run_all(Path(tmp), args.only))
    print(text)
    if report:
        tasks.atomic_write_text(report, text)  # never through a symlink planted there


if __name__ == "__main__":
    main()
