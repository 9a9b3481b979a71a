"""Evaluate PALoRA against every baseline in one table: what each model kept of the skill, what it
learned, what it broke. It scores; reproduce.py trains and then calls it.

Rows: the base checkpoint, the SVF expert, each inject.py run (seeds <name>-s<seed> of one setting
give one row, mean ± sample std). Greedy, batched, KV cache. Columns: strict and flexible accuracy
on the skill's held-out set and on its held-out-TEMPLATE set (`_ood`: question frames never trained
on); retention = strict / the expert's; reliability (facts recalled on their trained questions);
generalization (on held-out paraphrases); locality (of the known facts the base answers, the share
still answered on the first line; `_any`: the gold anywhere in the answer); collapse (share of the
fact answers taken by the 5 most frequent); leak_out ||U_Sᵀ dW|| / ||dW||, leak_in ||dW V_S|| /
||dW|| against the PALoRA probe's S, worst matrix (undefined for imsm and smf: no weight update);
interference E||dW x||² / E||W x||² over the expert's inputs x on the held-out-template skill items,
mean over matrices (its rank correlation with retention_ood over the runs follows the table);
trainable, added and share of parameters; touched (smf: memory slots written); time (seconds per
generated token, relative to the base row, on the same prompts). The headline differences follow
the table, each with its paired bootstrap interval (items and seeds resampled) and its seed-level t
interval (over the per-seed differences), both p Holm-corrected across the comparisons: beyond
noise only where the stricter says so.

    python evaluate.py --adapter runs/inject-palora-facts-s0 --adapter runs/inject-lora-facts-s0
    python evaluate.py --verify runs/inject-palora-facts-s0   # the guarantee from the files
    python evaluate.py --probe-report runs/svf-smollm2_135m-reasoning/svf.safetensors

Outputs in --out (default runs/eval): results.json (rows, per-item predictions, tasks.PROTOCOL,
date, machine); with --plot, tradeoff.png and probe.png. Each row's answers are also kept in
--score-cache under a hash of the model's every tensor, the questions and the generating code, so a
row scored once is read back, never recomputed (the time column is always measured afresh).
"""

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import adapters
import checkpoints
import cli
import inject
import model as model_lib
import palora
import tasks
from training import check_context, resolve_device, resolve_dtype

COLUMNS = (
    "strict",
    "flexible",
    "strict_ood",
    "retention",
    "retention_ood",
    "reliability",
    "generalization",
    "locality",
    "locality_any",
    "collapse",
    "gold_collapse",
    "leak_out",
    "leak_in",
    "interference",
    "trainable",
    "added",
    "share",
    "touched",
    "time",
)
REPO = Path(__file__).resolve().parent
COMPARE = (
    ("palora", "lora"),
    ("palora", "topk"),
    ("palora", "random"),
    ("palora_act", "palora"),
    ("imsm", "palora"),  # the other answers against the paper's method, and against palora_act
    ("smf", "palora"),
    ("palora_act", "imsm"),
    ("palora_act", "smf"),
)
NAN = float("nan")


@dataclass
class Config:
    ckpt: str = field(default=checkpoints.DEFAULT, metadata={"help": "checkpoint folder or name"})
    svf: str = field(
        default="",
        metadata={
            "help": ("SVF expert for its own row (default: the first run's; 'none': no row)")
        },
    )
    adapter: list = field(
        default_factory=list, metadata={"help": "inject.py run folder, a row each"}
    )
    reasoning: str = field(
        default="data/reasoning/test.jsonl",
        metadata={"help": "the skill's held-out set (its templates were trained on)"},
    )
    reasoning_ood: str = field(
        default="data/reasoning/test_ood.jsonl",
        metadata={"help": "the skill's held-out-template set ('': not scored)"},
    )
    facts: str = field(default="", metadata={"help": "injected facts (default: the first run's)"})
    known: str = field(
        default="data/known/known_eval.jsonl",
        metadata={"help": "facts the base knows, for locality ('': not scored)"},
    )
    limit: int = field(
        default=0,
        metadata={"help": "score the first N items of each reasoning set (0: all)", "ge": 0},
    )
    max_new_tokens: int = field(default=96, metadata={"help": "reasoning answer length", "ge": 1})
    fact_tokens: int = field(default=16, metadata={"help": "fact answer length", "ge": 1})
    batch_size: int = field(default=64, metadata={"help": "questions answered at once", "ge": 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(
        default="auto",
        metadata={"help": "weights' dtype", "choices": ["auto", "float32", "bfloat16"]},
    )
    out: str = field(default="runs/eval", metadata={"help": "output folder"})
    plot: bool = field(default=False, metadata={"help": "write tradeoff.png and probe.png"})
    verify: str = field(
        default="",
        metadata={
            "help": (
                "RUN: its adapter against its probe (palora_act: and its recomputed V_act) from "
                "the files alone, float64; exit 1 on a leak"
            )
        },
    )
    probe_report: str = field(
        default="",
        metadata={
            "help": (
                "SVF_FILE: where its probe (|m - 1|, half of each matrix) sits in the spectrum"
            )
        },
    )
    tolerance: float = field(
        default=1e-4,
        metadata={"help": "--verify: worst leakage allowed (float32 factors' rounding)", "gt": 0},
    )
    svd_cache: str = field(default=adapters.SVD_CACHE, metadata={"help": "cached SVD factors"})
    score_cache: str = field(
        default="cache/scores",
        metadata={"help": "each row's answers, keyed by its weights, questions and code ('': off)"},
    )


# -----------------------------------------------------------------------------
# metrics: small pure functions, each pinned by a hand-made case in tests/test_evaluate.py


def top_share(answers: list, k: int = 5) -> float:
    """Share of the answers taken by the k most frequent normalised first lines: k/n when all
    differ."""
    firsts = [next((x for x in a.splitlines() if x.strip()), "") for a in answers]
    counts = Counter(tasks.normalize_answer(x) for x in firsts)
    return sum(c for _, c in counts.most_common(k)) / len(answers) if answers else NAN


def anywhere(prediction: str, gold: str) -> bool:
    """The gold, normalised, as whole words anywhere in the normalised answer (not only line
    one)."""
    want = tasks.normalize_answer(gold)
    return bool(want) and f" {want} " in f" {tasks.normalize_answer(prediction)} "


def locality(base_correct: list, now_correct: list) -> float:
    """Of the known facts the base answered correctly, the share still answered correctly."""
    kept = [now for base, now in zip(base_correct, now_correct, strict=True) if base]
    return sum(kept) / len(kept) if kept else NAN


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else NAN


def spearman(x: list, y: list) -> float:
    """Rank correlation: Pearson's r of the ranks, tied values sharing their mean rank."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in order[i : j + 1]:
                r[k] = (i + j) / 2
            i = j + 1
        return torch.tensor(r, dtype=torch.float64)

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def reach_vs_loss(rows: list) -> dict:
    """Does the update's reach into the skill's inputs predict what is lost? Spearman's rho of
    interference against retention_ood over the runs that have both (a run without a weight update
    has no interference; without an expert that scores, no retention): NaN under 3 runs."""
    reach = [r for r in rows if math.isfinite(r["interference"])]
    reach = [r for r in reach if math.isfinite(r["retention_ood"])]  # NaN has no rank
    x = [r["interference"] for r in reach]
    rho = spearman(x, [r["retention_ood"] for r in reach]) if len(reach) >= 3 else NAN
    return {"runs": len(reach), "rho": rho}


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n: int = 10_000, seed: int = 0):
    """Mean of a - b and its 95% bootstrap interval; a, b (seeds, items) of 0/1, paired by seed and
    item.
    Seeds and items are resampled with replacement, independently."""
    d = a.double() - b.double()  # (seeds, items)
    means = bootstrap_means(d, n, seed)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return d.mean().item(), low, high


def bootstrap_means(d: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n means of d (seeds, items), seeds and items each resampled with replacement: (n,)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(d.shape[0], (n, d.shape[0]), generator=g)  # (n, seeds)
    cols = torch.randint(d.shape[1], (n, d.shape[1]), generator=g)  # (n, items)
    return d[rows[:, :, None], cols[:, None, :]].mean((1, 2))  # (n, seeds, items) -> (n,)


def bootstrap_p(a: torch.Tensor, b: torch.Tensor, n: int = 10_000, seed: int = 0) -> float:
    """Two-sided p of "a - b has mean 0" from paired_bootstrap's resampled means (the same draws):
    twice the share on the far side of 0, at most 1; 0 means below 1/n."""
    means = bootstrap_means(a.double() - b.double(), n, seed)
    far = min((means <= 0).double().mean().item(), (means >= 0).double().mean().item())
    return min(1.0, 2 * far)


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function: its continued fraction by Lentz's
    method (Numerical Recipes 6.4), taken on the side where it converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - betainc(b, a, 1 - x)
    log_front = a * math.log(x) + b * math.log1p(-x)
    log_front += math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    tiny = 1e-300  # keeps a zero denominator from dividing
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2 == 0:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + term * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + term / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return math.exp(log_front) / a * (f - 1)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: P(|T| > |t|) = I_{df/(df+t²)}(df/2,
    1/2)."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def t_quantile(q: float, df: int) -> float:
    """The t with P(T <= t) = q, 0.5 <= q < 1, by bisection on t_cdf (to 1e-12 relative)."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        high *= 2
    while high - low > 1e-12 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2


def seed_interval(diffs: list) -> dict:
    """From the per-seed differences (one mean over the items per seed): their mean ± t(0.975,
    s-1) sd / √s, the paired t interval over seeds, and its two-sided p; with one seed undefined
    (NaN): seeds, not items, are the replications a rerun would draw."""
    s = len(diffs)
    m = sum(diffs) / s
    if s < 2:
        return {"seed_low": NAN, "seed_high": NAN, "p_seed": NAN}
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / (s - 1))
    se = sd / math.sqrt(s)
    half = t_quantile(0.975, s - 1) * se
    if se == 0:  # every seed the same difference: a point, p 0 unless it is 0
        p = float(m == 0)
    else:
        p = 2 * (1 - t_cdf(abs(m) / se, s - 1))
    return {"seed_low": m - half, "seed_high": m + half, "p_seed": p}


def holm(p: list) -> list:
    """Holm's step-down adjusted p-values: the i-th smallest (i from 0) of the m defined ones times
    (m - i), kept at least the one before it, at most 1; rejecting where adjusted < alpha holds
    the family-wise error at alpha. NaN (undefined) is left out of the family and stays NaN."""
    order = sorted((i for i in range(len(p)) if not math.isnan(p[i])), key=lambda i: p[i])
    out, running = [NAN] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def beyond_noise(pairs: list, alpha: float = 0.05) -> list:
    """Each comparison with its Holm-adjusted p-values across the table (holm_item from the item
    bootstrap, holm_seed from the seed-level t test) and its verdict: beyond noise only when the
    stricter (the larger) is below alpha; a single seed is never beyond noise, its seed-level
    test undefined."""
    item = holm([p["p_item"] for p in pairs])
    seed = holm([p["p_seed"] for p in pairs])
    out = []
    for p, hi, hs in zip(pairs, item, seed):
        strict = max(hi, hs) if not math.isnan(hs) else NAN
        out.append({**p, "holm_item": hi, "holm_seed": hs, "beyond_noise": strict < alpha})
    return out


# -----------------------------------------------------------------------------
# one row: the model it describes, every question set answered and scored


def check_length(records: list, path, tokenizer, limit: int, new_tokens: int):
    """A prompt that cannot fit the context with its answer is an error naming its line."""
    for r in records:
        prompt = tasks.chat_prompt(tokenizer, r["question"])
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) + new_tokens > limit:
            raise tasks.DataError(
                f"{path}:{r['_line']}: question of {len(ids)} tokens + "
                f"{new_tokens} new ones exceed the context ({limit})"
            )


def question_sets(data: dict) -> dict:
    """Every question set as (question, gold answer) pairs: facts, known facts, the facts'
    paraphrases, the skill's two held-out sets."""
    return {
        "facts": [(r["question"], r["answer"]) for r in data["facts"]],
        "known": [(r["question"], r["answer"]) for r in data["known"]],
        "paraphrases": [(p, r["answer"]) for r in data["facts"] for p in r.get("paraphrases", [])],
        "reasoning": [(r["question"], r["answer"]) for r in data["reasoning"]],
        "reasoning_ood": [(r["question"], r["answer"]) for r in data["reasoning_ood"]],
    }


def score(model, tokenizer, data: dict, cfg: Config) -> tuple[dict, dict]:
    """Greedy answers to every question set -> score_answers()."""
    sets = question_sets(data)
    answers = {}
    for kind, qa in sets.items():
        tokens = cfg.max_new_tokens if kind.startswith("reasoning") else cfg.fact_tokens
        answers[kind] = tasks.answer(model, tokenizer, [q for q, _ in qa], tokens, cfg.batch_size)
    return score_answers(answers, sets)


def score_answers(answers: dict, sets: dict) -> tuple[dict, dict]:
    """Answers (kind -> predictions) against question_sets' gold answers -> (metrics, per-item
    record: answers and 0/1 scores). No model: tests feed it hand-made answer tables."""
    items = {}
    for kind in ("facts", "known", "paraphrases"):
        pairs = list(zip(answers[kind], [g for _, g in sets[kind]], strict=True))
        items[kind] = answers[kind]
        items[f"{kind}_ok"] = [tasks.fact_correct(p, g) for p, g in pairs]
        items[f"{kind}_any"] = [anywhere(p, g) for p, g in pairs]
    for kind in ("reasoning", "reasoning_ood"):
        pairs = zip(answers[kind], [g for _, g in sets[kind]], strict=True)
        scores = [tasks.score_reasoning(p, g) for p, g in pairs]
        items[kind] = answers[kind]
        items[f"{kind}_strict"] = [s["strict"] for s in scores]
        items[f"{kind}_flexible"] = [s["flexible"] for s in scores]
    metrics = {
        "strict": mean(items["reasoning_strict"]),
        "flexible": mean(items["reasoning_flexible"]),
        "strict_ood": mean(items["reasoning_ood_strict"]),
        "reliability": mean(items["facts_ok"]),
        "generalization": mean(items["paraphrases_ok"]),
        "collapse": top_share(items["facts"]),
        "gold_collapse": top_share([g for _, g in sets["facts"]]),
    }
    return metrics, items


SCORED_BY = ("model.py", "tasks.py", "tokenizer.py", "imsm.py", "smf.py")  # generate and score


def score_key(model, data: dict, cfg: Config) -> str:
    """sha256 of all a row's answers depend on: every tensor of the model, the questions, the
    decoding settings and the source of the code that generates and scores them."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{t.device.type}:{adapters.digest(t)}".encode())
    settings = [cfg.max_new_tokens, cfg.fact_tokens, cfg.batch_size, tasks.PROTOCOL]
    h.update(json.dumps([data, settings], sort_keys=True).encode())
    for name in SCORED_BY:
        h.update((REPO / name).read_bytes())
    return h.hexdigest()[:32]


def cached_score(model, tokenizer, data: dict, cfg: Config) -> tuple[dict, dict]:
    """score(), read from --score-cache when this exact row was scored before (a re-run table or
    a reproduction that gained a seed costs only its new rows)."""
    if not cfg.score_cache:
        return score(model, tokenizer, data, cfg)
    path = Path(cfg.score_cache) / f"{score_key(model, data, cfg)}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["metrics"], saved["items"]
    metrics, items = score(model, tokenizer, data, cfg)
    tasks.atomic_write_json(path, {"metrics": metrics, "items": items})
    return metrics, items


def leak_columns(run: Path, model_svds: dict, identity: str, dW: dict) -> dict:
    """Worst leakage of the run's dW against the PALoRA probe's S (recomputed from the probe file's
    record), and each matrix's probe and top-k choice for probe.png."""
    _, meta = adapters.read_tensors(run / "probe.safetensors", identity)
    target_svds = {n: model_svds[n] for n in dW}
    S, topk = adapters.expected_probe(meta, target_svds, identity, "topk")
    leak = {}
    for n, d in dW.items():
        U_S, V_S = palora.protected_bases(model_svds[n], S[n])
        leak[n] = palora.leakage(d, U_S.double(), V_S.double())
    spectrum = {
        n: {"R": len(model_svds[n][1]), "probe": S[n].tolist(), "topk": topk[n].tolist()} for n in S
    }
    leak_out = max(v[0] for v in leak.values())
    leak_in = max(v[1] for v in leak.values())
    return {"leak_out": leak_out, "leak_in": leak_in, "spectrum": spectrum}


def skill_inputs(model, tokenizer, records: list, kinds) -> tuple[dict, dict]:
    """(W, C) per target linear of the merged expert: its weight and the second moment of its
    inputs on the held-out-template skill items (question + gold answer): palora.interference's."""
    layers = palora.find_targets(model, kinds)
    context = model.args.max_position_embeddings
    covs = tasks.input_covariances(model, tokenizer, records, list(layers), context)
    return {n: m.weight.detach().clone() for n, m in layers.items()}, covs


def seconds_per_token(model, tokenizer, questions: list, n: int = 16) -> float:
    """Greedy decoding time per new token (prefill included, eos ignored) on up to 8 questions in
    one batch: every row does the same work. Best of 2 runs."""
    ids = [
        tokenizer.encode(tasks.chat_prompt(tokenizer, q), add_special_tokens=False)
        for q in questions[:8]
    ]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        model_lib.generate(model, ids, n, eos_ids=set())  # ends in .tolist(): the device synced
        times.append(time.perf_counter() - t0)
    return min(times) / n


def evaluate_rows(cfg: Config, data: dict, base, tokenizer, identity: str, svf, runs: list) -> list:
    """Rows for the base, the expert (if any) and each run; the checkpoint is loaded once, each row
    works on a copy. Locality against the base's answers."""
    n_model = sum(p.numel() for p in base.parameters())
    kinds = tuple(palora.MLP_TARGETS)
    model_svds = adapters.svds(base, kinds, identity, cfg.svd_cache)
    entries = [("base", None, None)]
    if svf:  # --svf none: no row of its own
        entries.append(("svf", Path(svf), None))
    for run in runs:
        run_svf = adapters.run_config(run)["svf"][0]
        entries.append((re.sub(r"-s\d+$", "", run.name), Path(run_svf), run))
    rows, base_known, skill = [], None, {}
    for group, svf_path, run in entries:
        t0 = time.time()
        model = copy.deepcopy(base)
        info = {"trainable": 0, "added": 0, "leak_out": NAN, "leak_in": NAN, "touched": NAN}
        info["interference"] = NAN
        if svf_path:
            merge_expert(model, svf_path, identity, model_svds, info)
            if svf_path not in skill:  # the expert's weights and its inputs on the skill
                skill[svf_path] = skill_inputs(model, tokenizer, data["reasoning_ood"], kinds)
        if run:
            model = add_run(model, run, identity, model_svds, skill[svf_path], info)
        metrics, items = cached_score(model, tokenizer, data, cfg)
        questions = [r["question"] for r in data["facts"]]
        info["s_per_token"] = seconds_per_token(model, tokenizer, questions)
        base_known = base_known or items
        rows.append(
            {
                "name": run.name if run else group,
                "group": group,
                **metrics,
                **localities(base_known, items),
                **info,
                "share": info["trainable"] / n_model,
                "items": items,
                "seconds": time.time() - t0,
            }
        )
        print(
            f"{rows[-1]['name']}: strict {metrics['strict']:.3f}, ood {metrics['strict_ood']:.3f}"
            f", reliability {metrics['reliability']:.3f} ({time.time() - t0:.0f} s)"
        )
        del model
    return relative(rows)


def merge_expert(model, svf: Path, identity: str, model_svds: dict, info: dict):
    """The SVF expert merged into model; its z counted as trained and added parameters (info)."""
    z, _ = adapters.load_svf(svf, identity, model)
    palora.merge_expert(model, model_svds, z)
    info["trainable"] = info["added"] = sum(t.numel() for t in z.values())


def add_run(model, run: Path, identity: str, model_svds: dict, skill: tuple, info: dict):
    """The model with the run loaded (adapters.load_run); info gets its added and trained
    parameters, slots touched, and for a weight update its leakage against the probe and its reach
    into the skill's inputs (palora.interference, against skill: the expert's W and its input
    moments C)."""
    W, C = skill
    model, loaded = adapters.load_run(model, run, identity)
    info["added"] = loaded["added"]
    info["touched"] = loaded.get("touched", NAN)
    info["trainable"] = json.loads((run / "summary.json").read_text())["trainable"]
    if loaded["dW"]:  # a weight update: its leakage against the probe, its reach
        info.update(leak_columns(run, model_svds, identity, loaded["dW"]))
        by = {n: palora.interference(d, W[n], C[n]) for n, d in loaded["dW"].items() if n in C}
        info["interference"] = sum(by.values()) / len(by) if by else NAN
        info["interference_by"] = by
    return model


def localities(base: dict, items: dict) -> dict:
    """Of the known facts the base answers (its first line), the share a row still answers: on its
    first line (locality) or anywhere in its answer (locality_any)."""
    return {
        "locality": locality(base["known_ok"], items["known_ok"]),
        "locality_any": locality(base["known_ok"], items["known_any"]),
    }


def relative(rows: list) -> list:
    """The columns relative to another row: time to the base's (rows[0]), retention to the expert's
    (the svf row) strict score on the same split; NaN without an expert row or when it scores 0."""
    svf_row = next((r for r in rows if r["group"] == "svf"), {})
    expert = {k: svf_row.get(k, NAN) for k in ("strict", "strict_ood")}
    for r in rows:
        r["time"] = r["s_per_token"] / rows[0]["s_per_token"]  # rows[0]: the base model
        r["retention"] = r["strict"] / expert["strict"] if expert["strict"] else NAN
        r["retention_ood"] = r["strict_ood"] / expert["strict_ood"] if expert["strict_ood"] else NAN
    return rows


# -----------------------------------------------------------------------------
# the table, the intervals, the figures


def aggregate(rows: list) -> list:
    """One row per group (the seeds of one setting): (mean, sample std) of every column."""
    groups = {}
    for r in rows:
        values = [float(r.get(c, NAN)) for c in COLUMNS]
        groups.setdefault(r["group"], []).append(torch.tensor(values, dtype=torch.float64))
    out = []
    for g, v in groups.items():
        stacked = torch.stack(v)  # (seeds, columns)
        std = stacked.std(0) if len(v) > 1 else torch.zeros(len(COLUMNS), dtype=torch.float64)
        cells = {c: (stacked[:, i].mean().item(), std[i].item()) for i, c in enumerate(COLUMNS)}
        out.append({"group": g, "n": len(v), **cells})
    return out


def cell(column: str, m: float, s: float) -> str:
    if math.isnan(m):
        return "-"
    if column in ("trainable", "added", "touched"):
        return f"{m:,.0f}"
    if column == "time":
        return f"{m:.2f}x"
    form = ".2e" if column.startswith("leak") or column == "interference" else ".3f"
    text = f"{100 * m:.3f}%" if column == "share" else f"{m:{form}}"
    return text + (f" ± {s:{form}}" if s > 0 and column != "share" else "")


def markdown(groups: list) -> str:
    lines = ["| model | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for g in groups:
        cells = " | ".join(cell(c, *g[c]) for c in COLUMNS)
        lines.append(f"| {g['group']} | {g['n']} | {cells} |")
    return "\n".join(lines)


def intervals(rows: list) -> list[dict]:
    """For each COMPARE pair present, the strict-accuracy difference on each reasoning split, seeds
    matched by run-name suffix: its paired bootstrap over items and seeds (low, high, p_item), the
    t interval over the per-seed differences (seed_low, seed_high, p_seed), each p Holm-adjusted
    across the comparisons, and beyond_noise (beyond_noise's rule)."""
    out = []
    for a, b in COMPARE:
        pa = {r["name"].rpartition("-")[2]: r for r in rows if r["group"] == a}
        pb = {r["name"].rpartition("-")[2]: r for r in rows if r["group"] == b}
        seeds = sorted(set(pa) & set(pb))
        for split in ("reasoning_ood", "reasoning"):
            key = f"{split}_strict"
            if not seeds or not pa[seeds[0]]["items"][key]:
                continue
            A = torch.tensor([pa[s]["items"][key] for s in seeds])
            B = torch.tensor([pb[s]["items"][key] for s in seeds])
            diff, low, high = paired_bootstrap(A, B)
            per_seed = (A.double() - B.double()).mean(1).tolist()  # (seeds,)
            out.append(
                {
                    "a": a,
                    "b": b,
                    "split": split,
                    "seeds": len(seeds),
                    "items": A.shape[1],
                    "diff": diff,
                    "low": low,
                    "high": high,
                    "p_item": bootstrap_p(A, B),
                    "per_seed": per_seed,
                    **seed_interval(per_seed),
                }
            )
    return beyond_noise(out)


def interval_table(pairs: list) -> str:
    """intervals() as markdown: each difference with both 95% intervals, both Holm-adjusted p and
    the verdict of the stricter."""
    lines = [
        "| strict accuracy | split | seeds x items | difference | item bootstrap 95% | Holm p "
        "| seed-level t 95% | Holm p | beyond noise |",
        "|---" * 9 + "|",
    ]
    for p in pairs:
        if math.isnan(p["seed_low"]):
            seed_level, verdict = "undefined (one seed)", "no (one seed)"
        else:
            seed_level = f"[{p['seed_low']:+.3f}, {p['seed_high']:+.3f}]"
            verdict = "yes" if p["beyond_noise"] else "no"
        cells = [
            f"{p['a']} - {p['b']}",
            p["split"],
            f"{p['seeds']} x {p['items']}",
            f"{p['diff']:+.3f}",
            f"[{p['low']:+.3f}, {p['high']:+.3f}]",
            f"{p['holm_item']:.3g}",
            seed_level,
            "-" if math.isnan(p["holm_seed"]) else f"{p['holm_seed']:.3g}",
            verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot without a display; a missing matplotlib is one line, asked for before any
    scoring (main and reproduce.py call this first when --plot is given)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise cli.ConfigError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(groups: list, spectrum: dict, folder: Path):
    """tradeoff.png: retention (held-out templates) against reliability, seeds as error bars.
    probe.png: per target matrix, where the probe's components sit (0 = largest), and top-k's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in groups:
        (x, dx), (y, dy) = g["retention_ood"], g["reliability"]
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", capsize=3, label=g["group"])
    ax.set(
        xlabel="retention, held-out templates (strict / SVF expert's)",
        ylabel="reliability (trained facts recalled)",
    )
    ax.legend(fontsize=7)
    tasks.atomic_write_figure(fig, folder / "tradeoff.png")
    fig, ax = plt.subplots(figsize=(12, 4))  # one column per target matrix, layer by layer
    for x, sp in enumerate(spectrum.values()):
        for key, dx, color in (("probe", -0.2, "C0"), ("topk", 0.2, "C3")):
            ys = [i / sp["R"] for i in sp[key]]
            ax.scatter([x + dx] * len(ys), ys, s=0.5, c=color, label=key if x == 0 else None)
    kinds = "/".join(dict.fromkeys(palora.matrix_kind(n) for n in spectrum))
    ax.set(
        xlabel=f"target matrix ({kinds}, layer by layer)",
        ylim=(1, 0),
        ylabel="position in the spectrum (0 = largest)",
    )
    ax.legend(markerscale=10)
    tasks.atomic_write_figure(fig, folder / "probe.png")


# -----------------------------------------------------------------------------
# --verify, --probe-report


def verify(run: Path, cfg: Config) -> dict:
    """The guarantee from the files alone, in float64. The method is the adapter file's; the probe
    file must hold exactly the set the run's recorded expert, rule and seed give; dW (projections
    folded in) must not reach that set: both sides for palora, topk and random, the output side for
    palora_act (its input side, V_act: verify_inputs); the other LoRA methods are reported; imsm
    and smf are not projection methods (no weight update to bound): reported as such, not
    failed."""
    run_cfg = adapters.run_config(run)
    folder = checkpoints.resolve(run_cfg["ckpt"])
    identity = checkpoints.identity(folder)
    model, _ = model_lib.load(folder, device="cpu", dtype=torch.float32)
    method = adapters.run_method(run)
    names = list(palora.find_targets(model, tuple(run_cfg["targets"].split(","))))
    model_svds = adapters.svds(model, tuple(run_cfg["targets"].split(",")), identity, cfg.svd_cache)
    ranks = {n: len(model_svds[n][1]) for n in names}
    protected, meta = adapters.load_probe(run / "probe.safetensors", identity, ranks)
    _, want = adapters.expected_probe(meta, model_svds, identity, method)
    for n in names:
        if set(protected[n].tolist()) != set(want[n].tolist()):
            raise palora.PaloraError(
                f"{run}/probe.safetensors: {n} holds {len(protected[n])} "
                f"indices, not the {len(want[n])} its record gives"
            )
    _, loaded = adapters.load_run(model, run, identity)
    if not loaded["dW"]:  # imsm, smf: no weight update whose leakage the probe could bound
        print(f"{run}: {method}: not a projection method, no leakage to verify (probe file OK)")
        return {"run": str(run), "method": method, "worst": NAN, "leakage": {}, "ok": True}
    leak = {}
    for n, d in loaded["dW"].items():
        U_S, V_S = palora.protected_bases(model_svds[n], protected[n])
        leak[n] = palora.leakage(d, U_S.double(), V_S.double())
    sides = adapters.record(method).protects  # the method's guarantee: what is checked
    name = max(leak, key=lambda n: max(leak[n][i] for i in sides) if sides else max(leak[n]))
    worst = max(leak[name][i] for i in sides) if sides else max(leak[name])
    ok = worst <= cfg.tolerance or not sides
    print(
        f"{run}: {method}, {len(leak)} matrices; worst leakage {worst:.3e} at {name} (U side "
        f"{leak[name][0]:.3e}, V side {leak[name][1]:.3e}): {'OK' if ok else 'FAILED'}"
        + ("" if sides else " (unprotected method: reported, not checked)")
    )
    result = {"run": str(run), "method": method, "worst": worst, "leakage": leak, "ok": ok}
    if method == "palora_act":  # its input side is V_act, not V_S: recomputed from the data
        counts = {n: len(s) for n, s in protected.items()}
        result = verify_inputs(run, cfg, loaded["dW"], counts, result)
    return result


ACT_FIELDS = ("skill_data", "act_known", "act_examples", "seed", "max_len", "rank", "act_earlier")


def recorded_inputs(run: Path, counts: dict, cfg: Config) -> tuple[dict, str]:
    """name -> V_act (in, k) of a palora_act run, recomputed as inject.py computed it, by its own
    input_bases: from the recorded config (skill data, --act-known, --act-examples, seed,
    --max-len), on the run's first expert merged into its checkpoint and, in a stream, the earlier
    rounds merged too, whose facts add --act-earlier directions each; k = counts (the probe's).
    Device: --device; dtype: --dtype, or the run's recorded one. Bitwise the run's own basis only
    on the run's device and dtype: elsewhere the covariances round differently and the
    eigenvectors turn, most where eigenvalues crowd at the k-th. Also returns where it ran."""
    run_cfg = adapters.run_config(run)
    missing = [k for k in ACT_FIELDS if k not in run_cfg]
    if missing:
        raise palora.PaloraError(
            f"{run}/config.json: records no {', '.join(missing)}: V_act cannot be recomputed"
        )
    act_cfg = dataclasses.replace(inject.Config(), **{k: run_cfg[k] for k in ACT_FIELDS})
    device = resolve_device(cfg.device)
    recorded = run_cfg.get("dtype", "auto")
    dtype = resolve_dtype(recorded if cfg.dtype == "auto" else cfg.dtype, device)
    folder = checkpoints.resolve(run_cfg["ckpt"])
    svf = run_cfg["svf"][0]
    model, tokenizer, identity = adapters.expert_model(svf, folder, device, dtype, cfg.svd_cache)
    after = run_cfg.get("after", "")
    earlier = []
    if after:  # as inject.main: the rounds before merged, then the basis on that model
        earlier = inject.earlier_rounds(after)
        model, _ = adapters.load_run(model, Path(after), identity)
    bases = inject.input_bases(model, tokenizer, act_cfg, counts, earlier)
    return bases, f"{device.type}, {str(dtype).removeprefix('torch.')}"


def verify_inputs(run: Path, cfg: Config, dW: dict, counts: dict, result: dict) -> dict:
    """--verify's input side of a palora_act run: ||dW V_act|| / ||dW|| per weight, float64,
    against V_act recomputed from the files (recorded_inputs); the run fails when the worst
    exceeds --tolerance. Adds input_leakage, input_worst and input_dims (k per weight)."""
    bases, where = recorded_inputs(run, counts, cfg)
    leak = {n: palora.leakage(d, None, bases[n].double())[1] for n, d in dW.items()}
    name = max(leak, key=leak.get)
    ok = leak[name] <= cfg.tolerance
    dims = {n: V.shape[1] for n, V in bases.items()}
    print(
        f"{run}: palora_act input side, V_act recomputed ({where}, {min(dims.values())} to "
        f"{max(dims.values())} directions): worst ||dW V_act|| / ||dW|| {leak[name]:.3e} at "
        f"{name}: {'OK' if ok else 'FAILED'}"
        + ("" if ok else " (a run made on another device or dtype than this: verify it there)")
    )
    extra = {"input_worst": leak[name], "input_leakage": leak, "input_dims": dims}
    return {**result, **extra, "ok": result["ok"] and ok}


def report_probe(svf: Path, cfg: Config) -> dict:
    """Where one expert's probe (|m - 1|, half of each matrix) sits: per matrix kind, the shares in
    the top, middle and bottom thirds of the spectrum, and the share top-k would also pick."""
    folder = checkpoints.resolve(cfg.ckpt)
    identity = checkpoints.identity(folder)
    model, _ = model_lib.load(folder, device="cpu", dtype=torch.float32)
    z, _ = adapters.load_svf(svf, identity, model)
    kinds = tuple(sorted({palora.matrix_kind(n) for n in z}))
    all_svds = adapters.svds(model, kinds, identity, cfg.svd_cache)
    model_svds = {n: v for n, v in all_svds.items() if n in z}
    S = palora.probe(model_svds, [z])
    topk = palora.same_count("topk", S, palora.expert_svds(model_svds, z), 0)
    rows = []
    for n, s in S.items():
        pos = s.double() / max(len(model_svds[n][1]) - 1, 1)  # 0 = largest, 1 = smallest
        thirds = torch.bincount((pos * 3).clamp(max=2).long(), minlength=3).double() / len(s)
        overlap = len(set(s.tolist()) & set(topk[n].tolist())) / len(s)
        rows.append(
            {
                "name": n,
                "kind": palora.matrix_kind(n),
                "top": thirds[0].item(),
                "middle": thirds[1].item(),
                "bottom": thirds[2].item(),
                "mean_pos": pos.mean().item(),
                "topk_overlap": overlap,
            }
        )
    print(
        "| matrices | top third | middle third | bottom third | mean position | shared with top-k |"
    )
    print("|---|---|---|---|---|---|")
    for kind in [*dict.fromkeys(r["kind"] for r in rows), "all"]:
        sel = [r for r in rows if kind in ("all", r["kind"])]
        keys = ("top", "middle", "bottom", "mean_pos", "topk_overlap")
        cells = " | ".join(f"{mean(r[k] for r in sel):.3f}" for k in keys)
        print(f"| {kind} ({len(sel)}) | {cells} |")
    m = torch.cat([palora.multiplier(model_svds[n][1], z[n]) for n in S])
    print(
        f"multipliers m over {len(m):,} components: {m.min():.3f} to {m.max():.3f}, median "
        f"|m - 1| {(m - 1).abs().median():.4f}"
    )
    return {"rows": rows, "ok": True}


# -----------------------------------------------------------------------------


def read_data(cfg: Config, facts: str) -> dict:
    """Every question set, checked (path:line errors) before any model is loaded."""
    for path in (facts, cfg.reasoning, cfg.reasoning_ood, cfg.known):
        if path:  # '' is a set not scored
            tasks.check_file(path)
    data = {"facts": tasks.read_facts(facts), "known": [], "reasoning_ood": []}
    tasks.check_facts(data["facts"], facts)
    data["reasoning"] = tasks.read_jsonl(cfg.reasoning)[: cfg.limit or None]
    tasks.check_reasoning(data["reasoning"], cfg.reasoning)
    if cfg.reasoning_ood:
        data["reasoning_ood"] = tasks.read_jsonl(cfg.reasoning_ood)[: cfg.limit or None]
        tasks.check_reasoning(data["reasoning_ood"], cfg.reasoning_ood)
    if cfg.known:
        data["known"] = tasks.read_jsonl(cfg.known)
    return data


def writable(folder: Path):
    """Fail now, not after an hour of scoring, if results cannot be written to folder: its nearest
    existing ancestor must be a folder we may write in. Nothing is made (the first result makes
    the folder), so a refused run leaves no empty folder behind."""
    existing = cli.nearest_existing(folder)
    if not existing.is_dir():
        raise cli.ConfigError(f"{folder}: cannot write results there ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise cli.ConfigError(f"{folder}: cannot write results there ({existing}: not writable)")


def check_runs(runs: list, identity: str) -> list:
    """Every run checked before any scoring (its files, made for this checkpoint) -> their
    configs."""
    for run in runs:
        for name in ("config.json", "summary.json", "probe.safetensors"):
            if not (run / name).is_file():
                raise FileNotFoundError(
                    f"{run / name}: missing (is {run} a finished inject.py run?)"
                )
        adapters.read_tensors(adapters.run_file(run), identity)
    return [adapters.run_config(run) for run in runs]


def load_base(folder: Path, data: dict, cfg: Config) -> tuple:
    """(the checkpoint, its tokenizer), every reasoning item checked to fit its context with
    --max-new-tokens."""
    device = resolve_device(cfg.device)
    base, tokenizer = model_lib.load(folder, device=device, dtype=resolve_dtype(cfg.dtype, device))
    context = base.args.max_position_embeddings
    for kind in ("reasoning", "reasoning_ood"):
        path = cfg.reasoning if kind == "reasoning" else cfg.reasoning_ood
        check_length(data[kind], path, tokenizer, context, cfg.max_new_tokens)
    return base, tokenizer


def mechanism_of(rows: list) -> dict:
    """Does the update's reach into the skill's inputs predict what is lost? reach_vs_loss, printed
    when it has a rho (3 runs or more)."""
    mechanism = reach_vs_loss(rows)
    if mechanism["runs"] >= 3:
        print(
            f"interference vs retention_ood over {mechanism['runs']} runs: Spearman rho "
            f"{mechanism['rho']:+.2f}"
        )
    return mechanism


def main(cfg: Config) -> dict:
    cli.check_folder(cfg.svd_cache, "--svd-cache")
    alone = [f for f, v in (("--verify", cfg.verify), ("--probe-report", cfg.probe_report)) if v]
    if alone and (cfg.adapter or len(alone) > 1):
        other = "--adapter" if cfg.adapter else alone[1]
        raise cli.ConfigError(f"{alone[0]}: checks one run alone, without {other}")
    if cfg.verify:
        return verify(Path(cfg.verify), cfg)
    if cfg.probe_report:
        return report_probe(Path(cfg.probe_report), cfg)
    out = Path(cfg.out)
    writable(out)
    if cfg.plot:
        pyplot()
    folder = checkpoints.resolve(cfg.ckpt)
    check_context(
        folder, {"--max-new-tokens": cfg.max_new_tokens, "--fact-tokens": cfg.fact_tokens}
    )
    identity = checkpoints.identity(folder)
    runs = [Path(a) for a in cfg.adapter]
    configs = check_runs(runs, identity)
    svf = None if cfg.svf == "none" else cfg.svf or (configs[0]["svf"][0] if configs else None)
    facts = cfg.facts or (configs[0]["facts"] if configs else "data/facts/facts.jsonl")
    data = read_data(cfg, facts)
    base, tokenizer = load_base(folder, data, cfg)
    rows = evaluate_rows(cfg, data, base, tokenizer, identity, svf, runs)
    groups = aggregate(rows)
    table = markdown(groups)
    pairs = intervals(rows)
    print(table)
    print(interval_table(pairs))
    mechanism = mechanism_of(rows)
    spectrum = next((r.pop("spectrum") for r in rows if "spectrum" in r), {})
    for r in rows:
        r.pop("spectrum", None)
    result = {"table": table, "intervals": pairs, "mechanism": mechanism}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    saved = {"protocol": tasks.PROTOCOL, "config": {**asdict(cfg), "facts": facts}}
    saved |= {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine}
    tasks.atomic_write_json(
        out / "results.json", {**saved, **result, "groups": groups, "rows": rows}
    )
    if cfg.plot:
        plot(groups, spectrum, out)
    return {"rows": rows, "groups": groups, **result, "ok": True}


if __name__ == "__main__":
    result = cli.run(main, cli.parse_config(Config, description=__doc__.split("\n\n")[0]))
    raise SystemExit(0 if result["ok"] else 1)
