"""Does a protected set locate the skill? Issue 23's direct test of each set, without injection:
no training, only the merged SVF expert changed in two ways and its skill measured.

(a) revert: m = 1 on the set's components (W' = U diag(s ⊙ m) Vh with m_i = 1 for i in the set),
    everything else the expert's. The skill lost is what the set carried. "all" reverts every
    component (the base model). Not defined for palora_act: V_act is an input basis, not a set of
    the expert's components.
(b) shield: every target weight gets a random update G, projected as that method's LoRA update
    is, (I - U_S U_Sᵀ) G (I - V_S V_Sᵀ) (palora_act: the probe's U_S, the skill's V_act; none: G
    itself), then rescaled to ||dW|| = eps ||W||, so every set takes an update of the same size.
    The set that keeps the skill under it is the one that locates the skill. act_other is
    palora_act's control: V from the inputs of other text (--act-other, invented facts by
    default) instead of the skill's, as many directions: if it shields as well, V_act protects the
    inputs every text uses, not the skill's.

Sets, per target weight, with as many components as the probe's S (palora.same_count's rule):
probe (inject.py's shipped rule and score), topk, random (seed = draw), taylor |∂L/∂z ⊙ (z - 1)|
and fisher (the mean of the squared per-batch gradients of z), both on --probe-examples of the
expert's training data; palora_act's V_act as inject.py computes it for its shipped default.
Measures, on each reasoning split: strict accuracy (evaluate.py's: greedy, its answer length and
batch, its score cache) and the mean gold-answer NLL (teacher forced). Each row against the expert,
item by item: the paired bootstrap (draws and items resampled) and, over draws, the t interval;
each shield row also against random at the same eps, draw by draw (the same G).
--eps's default: ||dW|| / ||W|| = 0.05 moved the expert's gold-answer NLL by +0.01, 0.1 by +0.1,
0.2 by +1 (the skill gone) on test.jsonl[:16] (not the locked split).

    python experiments/protect_test.py --svf runs/svf-smollm2_135m-reasoning/svf.safetensors
    python experiments/protect_test.py --svf ... --limit 8 --draws 1 --eps 0.1   # a quick look

Outputs in --out: protect_test.json (every item of every evaluation, the rows, the intervals) and
protect_test.md (the tables). Scoring on the locked split measures; a probe chosen by this
table for injection is a choice made on it (--reasoning, --reasoning-ood take other files).
"""

import dataclasses
import math
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import adapters  # noqa: E402
import checkpoints  # noqa: E402
import cli  # noqa: E402
import evaluate  # noqa: E402
import inject  # noqa: E402
import model as model_lib  # noqa: E402
import palora  # noqa: E402
import tasks  # noqa: E402
import train_svf  # noqa: E402
from training import answer_loss, check_context, option, resolve_device, resolve_dtype  # noqa: E402

INDEX_SETS = ("probe", "topk", "random", "taylor", "fisher")  # components of the expert
INPUT_SETS = ("palora_act", "act_other")  # the probe's U_S and an input basis from activations
SETS = (*INDEX_SETS, *INPUT_SETS, "none", "all")
REVERTED = (*INDEX_SETS, "all")  # all: m = 1 everywhere, the base model
SHIELDED = (*INDEX_SETS, *INPUT_SETS, "none")  # none: G unprojected
SPLITS = ("reasoning", "reasoning_ood")
SHIPPED = inject.Config()  # inject.py's defaults: the probe's rule and score, V_act's settings
# seconds per item and evaluation (greedy answer + NLL), --limit 8 on a 2-core CPU, one thread at
# nice 15 beside two other jobs: 1.3 for the expert, up to 3 for a broken model that answers to
# --max-new-tokens. The plan's estimate; each evaluation's line says what is left at its pace.
SECONDS_PER_ITEM = 2.0


@dataclass
class Config:
    svf: str = option("", "SVF expert file (default: the newest runs/svf-*/svf.safetensors)")
    ckpt: str = option(checkpoints.DEFAULT, "checkpoint folder or name")
    reasoning: str = option("data/reasoning/confirm.jsonl", "in-template skill items")
    reasoning_ood: str = option("data/reasoning/confirm_ood.jsonl", "held-out-template items")
    limit: int = option(0, "measure the first N items of each split (0: all)", ge=0)
    sets: str = option(",".join(SETS), "comma-separated protected sets")
    eps: str = option("0.1,0.15", "shield: comma-separated ||dW|| / ||W|| ('': no shield)")
    draws: int = option(3, "shield: draws of G per set and eps; random: its sets' seeds", ge=1)
    update_rank: int = option(0, "shield: rank of G (0: a full Gaussian matrix)", ge=0)
    probe_examples: int = option(64, "taylor, fisher: training examples of the skill", ge=1)
    probe_batch: int = option(8, "taylor, fisher: examples per gradient (train_svf's)", ge=1)
    act_known: str = option(SHIPPED.mix_known, "palora_act: known facts' inputs ('': none)")
    act_examples: int = option(SHIPPED.act_examples, "palora_act: examples per covariance", ge=1)
    act_other: str = option(
        "data/facts/facts_scale.jsonl", "act_other: the records whose inputs give its V instead"
    )
    seed: int = option(SHIPPED.seed, "seed of the skill examples sampled (inject.mixed)", ge=0)
    max_new_tokens: int = option(96, "answer length (evaluate.py's)", ge=1)
    batch_size: int = option(64, "questions answered at once (evaluate.py's)", ge=1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "weights' dtype", choices=["auto", "float32", "bfloat16"])
    out: str = option("runs/protect-test", "output folder")
    svd_cache: str = option(adapters.SVD_CACHE, "folder of cached SVD factors")
    score_cache: str = option("cache/scores", "evaluate.py's score cache ('': off)")


# -----------------------------------------------------------------------------
# flags, files and data, all checked before the model loads


class Case(NamedTuple):
    """One model evaluation: the expert, or one draw of a set under revert or shield."""

    test: str  # expert, revert or shield
    set: str
    eps: float
    draw: int


def parse_sets(text: str) -> tuple:
    sets = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    for s in sets:
        if s not in SETS:
            raise cli.ConfigError(f"--sets: unknown set {s!r}: choose from {', '.join(SETS)}")
    return sets


def parse_eps(text: str) -> list[float]:
    try:
        eps = [float(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise cli.ConfigError(f"--eps: not a comma-separated list of numbers: {text!r}") from None
    for e in eps:
        if not (math.isfinite(e) and 0 < e <= 10):
            raise cli.ConfigError(f"--eps: each must be in (0, 10], got {e}")
    return eps


def cases(sets: tuple, eps: list, draws: int) -> list[Case]:
    """The expert, each revert (random: one per seed), each shield draw for each eps."""
    out = [Case("expert", "expert", 0.0, 0)]
    for s in (s for s in sets if s in REVERTED):
        out += [Case("revert", s, 0.0, d) for d in range(draws if s == "random" else 1)]
    for e in eps:
        for s in (s for s in sets if s in SHIELDED):
            out += [Case("shield", s, e, d) for d in range(draws)]
    return out


@dataclass
class Plan:
    cfg: Config
    sets: tuple
    cases: list
    data: dict  # split -> records
    folder: Path
    identity: str
    svf: Path
    skill: list  # the expert's training records ([]: no set needs them)
    skill_path: str


def read_splits(cfg: Config) -> dict:
    data = {}
    for split, path in zip(SPLITS, (cfg.reasoning, cfg.reasoning_ood)):
        tasks.check_file(path)
        data[split] = tasks.read_jsonl(path)[: cfg.limit or None]
        tasks.check_reasoning(data[split], path)
    return data


def check(cfg: Config) -> Plan:
    """Every flag and file, the expert's metadata and the data read and checked; nothing loaded."""
    sets, eps = parse_sets(cfg.sets), parse_eps(cfg.eps)
    todo = cases(sets, eps, cfg.draws)
    if len(todo) == 1:
        raise cli.ConfigError("--sets and --eps leave nothing to test beside the expert")
    resolve_device(cfg.device)
    folder = checkpoints.resolve(cfg.ckpt)
    check_context(folder, {"--max-new-tokens": cfg.max_new_tokens})
    identity = checkpoints.identity(folder)
    svf = Path(cfg.svf) if cfg.svf else inject.latest_svf(identity, cfg.ckpt)
    tasks.check_file(svf)
    meta = adapters.read_tensors(svf, identity)[1]  # another checkpoint's expert is refused
    skill, skill_path = [], str(inject.REPO / meta.get("data", ""))
    if {"taylor", "fisher", "palora_act"} & set(sets):
        if "data" not in meta:
            raise cli.ConfigError(f"{svf}: its metadata names no training data")
        skill = inject.skill_examples(skill_path)
    if "palora_act" in sets and cfg.act_known:
        tasks.check_file(cfg.act_known)
    if "act_other" in sets:
        tasks.check_file(cfg.act_other)
    data = read_splits(cfg)
    evaluate.writable(Path(cfg.out))
    return Plan(cfg, sets, todo, data, folder, identity, svf, skill, skill_path)


def announce(plan: Plan):
    items = sum(len(v) for v in plan.data.values())
    hours = len(plan.cases) * items * SECONDS_PER_ITEM / 3600
    print(
        f"{len(plan.cases)} model evaluations of {items} items each: about {hours:.1f} h at "
        f"{SECONDS_PER_ITEM} s per item (measured on a 2-core CPU; a score cached is seconds)"
    )
    if "palora_act" in plan.sets:
        print("revert: not defined for palora_act (V_act is an input basis, not components of z)")


# -----------------------------------------------------------------------------
# the sets: the shipped probe, same_count's, the first-order probes, palora_act's V_act


def z_gradients(z: dict, losses) -> list[dict]:
    """One gradient of z per loss closure (a batch each): name -> (R,) per batch."""
    grads = []
    for loss in losses:
        for p in z.values():
            p.grad = None
        loss().backward()
        grads.append({n: p.grad.detach().clone() for n, p in z.items()})
    return grads


def taylor_scores(grads: list, z: dict) -> dict:
    """|g ⊙ (z - 1)|, g the mean of the per-batch gradients: the first-order loss change of
    moving each z_i back to 1."""
    return {n: (sum(g[n] for g in grads) / len(grads) * (z[n].detach() - 1)).abs() for n in z}


def fisher_scores(grads: list) -> dict:
    """The diagonal empirical Fisher of z: the mean over batches of the squared gradient."""
    return {n: sum(g[n] ** 2 for g in grads) / len(grads) for n in grads[0]}


def top_count(scores: dict, S: dict) -> dict:
    """Per weight the len(S[n]) highest scores' indices, ascending (as palora.probe's)."""
    return {n: torch.topk(scores[n], len(s)).indices.sort().values for n, s in S.items()}


def skill_losses(model, tokenizer, records: list, cfg: Config) -> list:
    """train_svf's loss (answer tokens' mean cross-entropy) on --probe-examples of the skill's
    training data (inject.mixed's seeded sample), one closure per --probe-batch."""
    max_len = train_svf.Config().max_len
    ids = [tasks.encode_example(tokenizer, r["question"], r["answer"], max_len) for r in records]
    ids = [x for x in ids if x[0] is not None]
    device = next(model.parameters()).device
    batches = [ids[i : i + cfg.probe_batch] for i in range(0, len(ids), cfg.probe_batch)]

    def loss(batch):
        tokens, labels, mask = (t.to(device) for t in tasks.collate(batch, tokenizer.pad_id))
        return answer_loss(model, tokens, labels, mask, pack=True)

    return [lambda b=b: loss(b) for b in batches]


def first_order_sets(model, tokenizer, z: dict, S: dict, plan: Plan) -> dict:
    """taylor and fisher on the SVF model (z trainable), each as many components as S."""
    t0 = time.time()
    model.requires_grad_(False)
    for p in z.values():
        p.requires_grad_(True)
    records = inject.mixed(plan.skill, plan.cfg.probe_examples, plan.cfg.seed)
    grads = z_gradients(z, skill_losses(model, tokenizer, records, plan.cfg))
    print(f"gradients of z on {len(records)} skill examples: {time.time() - t0:.0f} s")
    return {
        "taylor": [top_count(taylor_scores(grads, z), S)],
        "fisher": [top_count(fisher_scores(grads), S)],
    }


def index_sets(svds: dict, z: dict, S: dict, draws: int) -> dict:
    """name of set -> one {weight: indices} per draw (random: its seed is the draw)."""
    expert = palora.expert_svds(svds, z)
    return {
        "probe": [S],
        "topk": [palora.same_count("topk", S, expert, 0)],
        "random": [palora.same_count("random", S, expert, d) for d in range(draws)],
        "all": [{n: torch.arange(len(svds[n][1])) for n in S}],
    }


def act_bases(model, tokenizer, S: dict, plan: Plan, name: str) -> dict:
    """An input basis per weight, k = the probe's count, as inject.input_bases computes it on the
    merged expert: palora_act's V_act (its shipped default: the skill's inputs and the known
    facts'), or act_other's (the --act-other records' inputs alone)."""
    t0 = time.time()
    data, known = plan.skill_path, plan.cfg.act_known
    if name == "act_other":
        data, known = plan.cfg.act_other, ""
    act_cfg = dataclasses.replace(
        SHIPPED,
        skill_data=data,
        act_known=known,
        act_examples=plan.cfg.act_examples,
        seed=plan.cfg.seed,
    )
    bases = inject.input_bases(model, tokenizer, act_cfg, {n: len(s) for n, s in S.items()}, [])
    print(f"{name}'s input basis: {time.time() - t0:.0f} s")
    return bases


# -----------------------------------------------------------------------------
# the two tests: a configuration's target weights


def revert_weight(svd: tuple, z: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """W' = U diag(s ⊙ m) Vh with m_i = 1 on S, the expert's elsewhere (merge_svf's product)."""
    U, s, Vh = svd
    sm = s * palora.multiplier(s, z.to(s))
    sm[S] = s[S]
    return (U * sm) @ Vh


def random_update(shape: tuple, rank: int, draw: int, name: str) -> torch.Tensor:
    """G (out, in), Gaussian, of rank `rank` (0: full); the draw depends on (draw, name) alone,
    so every set is shielded against the same G."""
    g = torch.Generator().manual_seed(draw * 1_000_003 + zlib.crc32(f"shield {name}".encode()))
    if not rank:
        return torch.randn(shape, generator=g)
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


def shield_delta(W: torch.Tensor, G: torch.Tensor, U_S, V_S, eps: float) -> torch.Tensor:
    """(I - U_S U_Sᵀ) G (I - V_S V_Sᵀ) rescaled to ||dW|| = eps ||W|| (U_S, V_S None: that side
    unprojected); zero for eps 0 or a G the projection removes."""
    W = palora.wide(W)
    U_S, V_S = (None if B is None else B.to(W) for B in (U_S, V_S))
    dW = palora.project_in(palora.project_out(G.to(W), U_S), V_S)
    norm = dW.norm()
    if eps == 0 or norm == 0:
        return torch.zeros_like(W)
    return dW * (eps * W.norm() / norm)


def sides(name: str, svd: tuple, sets: dict, inputs: dict, case: Case) -> tuple:
    """(U_S, V_S) the method's LoRA would hold for this weight (palora.METHODS' inits): both
    sides of the set; palora_act (and its control) the probe's U_S and the input basis; none
    neither. inputs: set name -> weight name -> input basis."""
    if case.set == "none":
        return None, None
    if case.set in INPUT_SETS:
        return palora.protected_bases(svd, sets["probe"][0][name])[0], inputs[case.set][name]
    chosen = sets[case.set]
    return palora.protected_bases(svd, chosen[case.draw % len(chosen)][name])


class Lab(NamedTuple):
    """What every configuration is built from."""

    layers: dict  # target name -> its linear layer in the model
    svds: dict  # the base weights' SVDs
    z: dict
    expert: dict  # target name -> the merged expert's weight
    sets: dict
    inputs: dict  # palora_act, act_other -> target name -> input basis (in, k)
    rank: int


def weights(lab: Lab, case: Case) -> dict:
    """Target name -> the weight of this configuration."""
    if case.test == "expert":
        return lab.expert
    if case.test == "revert":
        chosen = lab.sets[case.set]
        S = chosen[case.draw % len(chosen)]
        return {n: revert_weight(lab.svds[n], lab.z[n], S[n]) for n in lab.layers}
    out = {}
    for n, W in lab.expert.items():
        G = random_update(W.shape, lab.rank, case.draw, n)
        dW = shield_delta(W, G, *sides(n, lab.svds[n], lab.sets, lab.inputs, case), case.eps)
        out[n] = palora.wide(W) + dW
    return out


@torch.no_grad()
def install(lab: Lab, new: dict):
    for n, layer in lab.layers.items():
        layer.weight.copy_(new[n].to(layer.weight))


# -----------------------------------------------------------------------------
# the skill: strict accuracy (evaluate.py's scoring and cache) and the gold answer's NLL


@torch.no_grad()
def answer_nll(model, tokenizer, records: list, batch_size: int = 16) -> list[float]:
    """Per item the mean cross-entropy of its gold answer tokens (end of turn included), teacher
    forced after the chat prompt, as the training loss counts them."""
    device, context = next(model.parameters()).device, model.args.max_position_embeddings
    out = []
    for i in range(0, len(records), batch_size):
        rows = records[i : i + batch_size]
        ex = [tasks.encode_example(tokenizer, r["question"], r["answer"], context) for r in rows]
        tokens, labels, mask = (t.to(device) for t in tasks.collate(ex, tokenizer.pad_id))
        target = labels.roll(-1, dims=1)
        target[:, -1] = tasks.IGNORE_INDEX
        keep = target != tasks.IGNORE_INDEX  # (B, T): positions predicting an answer token
        logits = model(tokens, attention_mask=mask, keep=keep).float()  # (N, V)
        ce = F.cross_entropy(logits, target[keep], reduction="none")  # (N,)
        per_row = torch.zeros(len(rows), device=device).index_add_(0, keep.nonzero()[:, 0], ce)
        out += (per_row / keep.sum(1)).tolist()
    return out


def measure(model, tokenizer, data: dict, cfg: Config) -> dict:
    """split -> {"strict": 0/1 per item, "nll": per item}."""
    score_cfg = evaluate.Config(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, score_cache=cfg.score_cache
    )
    sets = {"facts": [], "known": [], **data}
    _, items = evaluate.cached_score(model, tokenizer, sets, score_cfg)
    return {
        split: {
            "strict": [int(x) for x in items[f"{split}_strict"]],
            "nll": answer_nll(model, tokenizer, data[split]),
        }
        for split in SPLITS
    }


# -----------------------------------------------------------------------------
# rows: each set and test against the expert, with intervals


def difference(A: torch.Tensor, B: torch.Tensor) -> dict:
    """a - b over (draws, items): the paired bootstrap (draws and items resampled) and, over
    draws, the t interval of the per-draw differences (evaluate.py's functions)."""
    diff, low, high = evaluate.paired_bootstrap(A, B)
    per_draw = (A - B).mean(1).tolist()
    interval = evaluate.seed_interval(per_draw)
    draw_side = {k.replace("seed", "draw"): v for k, v in interval.items()}
    p = evaluate.bootstrap_p(A, B)
    return {"diff": diff, "low": low, "high": high, "p_item": p, "per_draw": per_draw, **draw_side}


def versus(runs: list, base: list, split: str) -> dict:
    """Each measure's mean over runs (draws) and its difference from base's: draw d against
    base[d], or against base[0] throughout when base is one evaluation (the expert)."""
    out = {}
    for measure_ in ("strict", "nll"):
        A = torch.tensor([r[split][measure_] for r in runs], dtype=torch.float64)
        B = torch.tensor([b[split][measure_] for b in base], dtype=torch.float64).expand_as(A)
        out[measure_] = A.mean().item()
        out[f"d_{measure_}"] = difference(A, B)
    return out


def row(key: tuple, results: list, expert: dict) -> dict:
    """One (test, set, eps) over its draws, per split: against the expert."""
    out = {"test": key[0], "set": key[1], "eps": key[2], "draws": len(results)}
    return out | {split: versus(results, [expert], split) for split in SPLITS}


def against_random(done: list) -> list:
    """shield: each set against random at the same eps, draw d against draw d (the same G)."""
    runs = {}
    for c, r in done:
        if c.test == "shield":
            runs.setdefault((c.eps, c.set), {})[c.draw] = r
    out = []
    for (eps, name), mine in runs.items():
        ref = runs.get((eps, "random"), {})
        draws = sorted(set(mine) & set(ref))
        if name == "random" or not draws:
            continue
        a, b = [mine[d] for d in draws], [ref[d] for d in draws]
        entry = {"set": name, "eps": eps, "draws": len(draws)}
        out.append(entry | {split: versus(a, b, split) for split in SPLITS})
    return out


def rows(done: list) -> list:
    """The expert's row, then one row per (test, set, eps); Holm across the accuracy
    comparisons (evaluate.beyond_noise: the stricter of items and draws decides)."""
    expert = next(r for c, r in done if c.test == "expert")
    groups = {}
    for c, r in done:
        if c.test != "expert":
            groups.setdefault((c.test, c.set, c.eps), []).append(r)
    table = [row(k, v, expert) for k, v in groups.items()]
    pairs = [
        {"p_item": t[s]["d_strict"]["p_item"], "p_seed": t[s]["d_strict"]["p_draw"]}
        for t in table
        for s in SPLITS
    ]
    holm = iter(evaluate.beyond_noise(pairs))
    for t in table:
        for s in SPLITS:
            verdict = next(holm)
            t[s]["d_strict"] |= {k: verdict[k] for k in ("holm_item", "holm_seed", "beyond_noise")}
    first = {s: {"strict": sum(expert[s]["strict"]) / len(expert[s]["strict"])} for s in SPLITS}
    for s in SPLITS:
        first[s]["nll"] = evaluate.mean(expert[s]["nll"])
    return [{"test": "expert", "set": "expert", "eps": 0.0, "draws": 1, **first}, *table]


def interval(d: dict, form: str = "+.3f") -> str:
    items = f"[{d['low']:{form}}, {d['high']:{form}}]"
    if math.isnan(d["draw_low"]):
        return f"{d['diff']:{form}} {items}"
    return f"{d['diff']:{form}} {items} [{d['draw_low']:{form}}, {d['draw_high']:{form}}]"


def markdown(table: list) -> str:
    """set × test, per split: accuracy and gold-answer NLL, each one's difference from the
    expert with the item bootstrap's and (several draws) the draws' 95% intervals."""
    head = "| set | test | draws |"
    for name in ("in-template", "held-out templates"):
        head += f" {name}: strict | Δ strict [items] [draws] | ΔNLL [items] [draws] |"
    lines = [head, "|---" * 9 + "|"]
    for t in table:
        test = f"shield eps {t['eps']:g}" if t["test"] == "shield" else t["test"]
        cells = [t["set"], test, str(t["draws"])]
        for s in SPLITS:
            c = t[s]
            cells.append(f"{c['strict']:.3f}")
            if t["test"] == "expert":
                cells += ["-", f"NLL {c['nll']:.3f}"]
            else:
                cells += [interval(c["d_strict"]), interval(c["d_nll"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def random_table(pairs: list) -> str:
    """shield, each set minus random (the same G per draw): strict accuracy and NLL, with the
    item bootstrap's and the draws' 95% intervals."""
    head = "| set | shield eps | draws |"
    for name in ("in-template", "held-out templates"):
        head += f" {name}: Δ strict vs random [items] [draws] | ΔNLL [items] [draws] |"
    lines = [head, "|---" * 7 + "|"]
    for p in pairs:
        cells = [p["set"], f"{p['eps']:g}", str(p["draws"])]
        for s in SPLITS:
            cells += [interval(p[s]["d_strict"]), interval(p[s]["d_nll"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# main: check, load, the sets, every evaluation, the table


def load(plan: Plan) -> tuple:
    """(model with z as SVFLinear layers, tokenizer, z, the base SVDs of the targets, S)."""
    cfg = plan.cfg
    device = resolve_device(cfg.device)
    model, tokenizer = model_lib.load(plan.folder, device, resolve_dtype(cfg.dtype, device))
    z, _ = adapters.load_svf(plan.svf, plan.identity, model)
    kinds = tuple(sorted({palora.matrix_kind(n) for n in z}))
    svds = adapters.svds(model, kinds, plan.identity, cfg.svd_cache)
    svds = {n: svds[n] for n in z}
    rule = palora.probe_rule(
        SHIPPED.probe_fraction, SHIPPED.probe_threshold, SHIPPED.probe_global_fraction
    )
    S = palora.probe(svds, [z], rule, SHIPPED.probe_score)
    z = palora.add_svf(model, svds, z)  # name -> Parameter, the expert's values
    return model, tokenizer, z, svds, S


def prepare(plan: Plan) -> tuple:
    """(model: the merged expert, tokenizer, Lab)."""
    model, tokenizer, z, svds, S = load(plan)
    sets = index_sets(svds, {n: p.detach() for n, p in z.items()}, S, plan.cfg.draws)
    if {"taylor", "fisher"} & set(plan.sets):
        sets |= first_order_sets(model, tokenizer, z, S, plan)
    z = {n: p.detach().clone() for n, p in z.items()}
    palora.merge_svf(model)  # the expert, as palora.merge_expert makes it
    inputs = {k: act_bases(model, tokenizer, S, plan, k) for k in INPUT_SETS if k in plan.sets}
    layers = {n: model.get_submodule(n) for n in z}
    expert = {n: m.weight.detach().clone() for n, m in layers.items()}
    lab = Lab(layers, svds, z, expert, sets, inputs, plan.cfg.update_rank)
    return model, tokenizer, lab


def overlaps(lab: Lab) -> dict:
    """Per set (first draw) the mean share of the probe's S it holds: how alike the sets are."""
    S = lab.sets["probe"][0]
    return {
        k: evaluate.mean(
            len(set(v[0][n].tolist()) & set(S[n].tolist())) / max(len(S[n]), 1) for n in S
        )
        for k, v in lab.sets.items()
    }


def sizes(lab: Lab) -> dict:
    """Components (directions, for V_act) each set protects over all weights, first draw."""
    out = {k: sum(len(s) for s in v[0].values()) for k, v in lab.sets.items()}
    for k, bases in lab.inputs.items():
        out[k] = sum(V.shape[1] for V in bases.values())
    return out


def run_cases(model, tokenizer, lab: Lab, plan: Plan) -> tuple:
    """Every case installed and measured, in order: ([(case, result)], seconds of each)."""
    done, seconds = [], []
    for i, case in enumerate(plan.cases):
        t0 = time.time()
        install(lab, weights(lab, case))
        result = measure(model, tokenizer, plan.data, plan.cfg)
        seconds.append(time.time() - t0)
        done.append((case, result))
        accs = [sum(result[s]["strict"]) / len(result[s]["strict"]) for s in SPLITS]
        left = (len(plan.cases) - i - 1) * sum(seconds) / len(seconds) / 3600  # the mean pace
        print(
            f"[{i + 1}/{len(plan.cases)}] {case.test} {case.set} eps {case.eps:g} draw "
            f"{case.draw}: strict {accs[0]:.3f}, held-out {accs[1]:.3f} ({seconds[-1]:.0f} s; "
            f"about {left:.1f} h left)",
            flush=True,
        )
    install(lab, lab.expert)
    return done, seconds


def main(cfg: Config) -> dict:
    plan = check(cfg)
    announce(plan)
    torch.manual_seed(0)
    model, tokenizer, lab = prepare(plan)
    done, seconds = run_cases(model, tokenizer, lab, plan)
    table, pairs = rows(done), against_random(done)
    text = markdown(table) + ("\n\n" + random_table(pairs) if pairs else "")
    print(text)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    result = {
        "config": {**dataclasses.asdict(cfg), "svf": str(plan.svf)},
        "protocol": tasks.PROTOCOL,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "sizes": sizes(lab),
        "overlap_with_probe": overlaps(lab),
        "rows": table,
        "against_random": pairs,
        "evaluations": [{**c._asdict(), **r, "seconds": t} for (c, r), t in zip(done, seconds)],
    }
    out = Path(cfg.out)
    tasks.atomic_write_json(out / "protect_test.json", result)
    tasks.atomic_write_text(out / "protect_test.md", text + "\n")
    return result


if __name__ == "__main__":
    cli.run(main, cli.parse_config(Config, description=__doc__.split("\n\n")[0]))
