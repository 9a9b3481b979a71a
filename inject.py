"""Stage two of PALoRA (arXiv 2605.24549): inject facts with LoRA on a merged SVF expert, the
update kept off the components its probe marks as the skill's:
dW = (I - U_S U_Sᵀ) B A (I - V_S V_Sᵀ) · alpha/r. S = the components whose multiplier m = z·c
the expert moved furthest from 1 (indices in the base weight's spectrum). Several --svf experts:
the first is the base, all are probes (their S united).
Training stops when greedy answers recall --recall-target of the trained facts (checked after every
epoch on --recall-sample of them), or after --epochs; a run that misses the target keeps its best
checked epoch and says so. The defaults (docs/facts-at-scale.md): palora_act (the probe's output
side, the skill's input directions), known facts of the injected relations mixed in and their input
directions protected, the expert's training data replayed at 0.5 per fact (without it 300 facts kept
0.75 of the skill), batch 16, lr 3e-3 on a cosine schedule, target 0.95; in a stream (--after),
every earlier round's facts' input directions protected too (--act-earlier). The baselines and what
each protects: adapters.RECORDS, palora.METHODS; imsm (a frozen and a LoRA stream
mixed by a gate) and smf (memory layers, sparse slot updates) are the other answers to the same
problem, trained on the same facts, replay and stopping rule.

    python inject.py --facts facts.jsonl     # palora_act + known facts mixed in, the newest expert
    python inject.py --facts facts.jsonl --method palora --lr 5e-3   # the paper's PALoRA
    python inject.py --facts facts.jsonl --method lora --seed 1      # a baseline, another seed
    python inject.py --svf runs/svf-a/svf.safetensors --svf runs/svf-b/svf.safetensors  # two skills
    python inject.py --probe-global-fraction 0.5 --mix-known data/known/known_mix.jsonl --resume
    python inject.py --method smf --smf-slots 4096 --smf-top-t 64 --lr 0.1   # or --method imsm
    python inject.py --facts round2.jsonl --after runs/round1   # a stream: on top of round 1
    torchrun --standalone --nproc_per_node 8 inject.py --ckpt llama31_8b --parallel fsdp

Under torchrun --batch-size is the GLOBAL batch, split over the processes, so the adapter does not
depend on their number; rank 0 alone writes; the state resumes under any process count and either
--parallel. ddp: every rank holds the whole model and checks recall on its share of the facts.
fsdp (FSDP2, the LoRA family only): every parameter, frozen ones too, is sharded over the ranks
while training (each rank still loads the whole model first); every rank checks recall on all the
facts, as each forward is a collective.

Outputs in --out (default runs/inject-<method>-<facts>-s<seed>/): adapter_config.json and
adapter_model.safetensors (peft layout; its base_model_name_or_path is the merged expert, written
once beside the expert as merged-<svf sha>/), probe.safetensors (weight name -> int64 indices the
run protects, in the base spectrum), config.json, metrics.jsonl, summary.json, state.safetensors
(resume).
--after RUN continues a stream of injections: RUN's adapter (and the runs RUN itself followed) is
merged into the expert, and this run trains on that model; what it protects is still computed from
the expert (its probe, its SVD), palora_act's input directions from the merged model's inputs. The
PEFT adapter then applies to that merged model, not to the expert alone: evaluate.py follows the
chain from config.json (adapters.load_run).
imsm and smf write imsm.safetensors or smf.safetensors instead of the PEFT adapter (adapters.py).
"""

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import adapters
import checkpoints
import cli
import model as model_lib
import palora
import tasks
from training import (
    RUN_ONLY,
    all_sum,
    answer_all,
    batch_indices,
    check_context,
    check_finite,
    check_rank,
    full,
    is_main,
    load_state,
    lr_factor,
    main_first,
    open_run,
    option,
    parse_targets,
    placed,
    resolve_device,
    resolve_dtype,
    restart_metrics,
    save_state,
    setup_distributed,
    shard,
    shard_total,
    teardown,
    unwrap,
    world,
    wrap,
)

REPO = Path(__file__).resolve().parent
RUNS = REPO / "runs"


@dataclass
class Config:
    facts: str = option(
        "data/facts/facts.jsonl", "facts JSONL: question, answer, optional paraphrases (held out)"
    )
    ckpt: str = option(checkpoints.DEFAULT, "checkpoint folder or name")
    svf: list = field(
        default_factory=list,
        metadata={
            "help": (
                "SVF expert file (default: the newest runs/svf-*/svf.safetensors of --ckpt); given "
                "several "
                "times, the FIRST is the base the adapter trains on and ALL are probes (S's united)"
            )
        },
    )
    method: str = field(
        default="palora_act",
        metadata={
            "choices": list(adapters.METHODS),
            "help": (
                "palora: probe-protected; random: as many components per matrix, chosen at "
                "random (the control); topk (OPLoRA), lora, pissa, milora: baselines; "
                "palora_act: input side from the skill's activations (our extension); imsm: "
                "frozen + LoRA streams mixed by a gate (2412.17383); smf: sparse memory "
                "finetuning (2510.15103)"
            ),
        },
    )
    rank: int = option(8, "LoRA rank r", ge=1)
    alpha: float = option(16.0, "LoRA alpha: dW is scaled by alpha/r", gt=0)
    targets: str = option("", "comma-separated linear names to adapt (default: the expert's)")
    probe_score: str = field(
        default="delta",
        metadata={"help": "delta: |m - 1|; energy: s * |m - 1|", "choices": ["delta", "energy"]},
    )
    probe_fraction: float = option(0.5, "share of each matrix's components protected", gt=0, lt=1)
    probe_threshold: float = option(
        0.0, "protect every component scoring above this (0: off)", ge=0
    )
    probe_global_fraction: float = option(
        0.0, "protect this share of all components pooled (0: off)", ge=0, lt=1
    )
    recall_target: float = option(
        0.95,
        "stop once greedy answers recall this share of the trained facts (0: run --epochs)",
        ge=0,
        le=1,
    )
    epochs: int = option(20, "most passes over the facts (plus mixed-in examples)", ge=1)
    lr: float = option(3e-3, "Adam learning rate for A and B (smf: SparseAdam's, for V)", gt=0)
    schedule: str = option(
        "cosine",
        "lr over the planned steps: cosine (warmup, then down to 0.1 lr) or constant",
        choices=["cosine", "constant"],
    )
    warmup: float = option(0.05, "cosine: share of the planned steps the lr rises over", ge=0, lt=1)
    gate_lr: float = option(
        5e-3,
        ("imsm: the gate's Adam lr, stated (the reference code's gate silently gets 1e-3)"),
        gt=0,
    )
    smf_slots: int = option(
        4096, "smf: memory slots per layer, a square n² (product keys)", ge=4, le=2048**2
    )
    smf_topk: int = option(16, "smf: slots each token reads, <= n", ge=1)
    smf_top_t: int = option(64, "smf: value rows updated per layer and step (top-T by score)", ge=1)
    smf_score: str = field(
        default="tfidf",
        metadata={"help": "smf: slot ranking against the background", "choices": ["tfidf", "kl"]},
    )
    smf_background: int = option(
        128, "smf: skill (and --mix-known) examples in the background corpus", ge=1
    )
    batch_size: int = option(16, "examples per step", ge=1, le=65536)
    seed: int = option(
        0, "seed for A's initialisation, data order, mixing and random protection", ge=0
    )
    out: str = option("", "output folder (default runs/inject-<method>-<facts>-s<seed>)")
    overwrite: bool = option(False, "empty a non-empty --out first")
    resume: bool = option(False, "continue from --out/state.safetensors")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    parallel: str = option(
        "ddp",
        "under torchrun: ddp (whole model per rank) or fsdp (FSDP2: parameters sharded)",
        choices=["ddp", "fsdp"],
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "frozen weights' dtype: auto (bf16 on CUDA, fp32 on CPU)",
            "choices": ["auto", "float32", "bfloat16"],
        },
    )
    mix_known: str = option(
        "data/known/known_keep.jsonl",
        "JSONL of facts the model knows, mixed into training (2502.14502; '': none)",
    )
    mix_skill: str = option(
        "expert",
        (
            "JSONL of the skill's examples mixed in (replay); 'expert': the SVF expert's training "
            "data, from its metadata; 'none': no replay"
        ),
    )
    mix_ratio: float = option(
        0.5, "mixed-in examples per fact, from each --mix-* file", ge=0, le=16
    )
    skill_data: str = option(
        "",
        (
            "palora_act: skill examples for the input basis; smf: its background corpus "
            "(default: the "
            "expert's training data)"
        ),
    )
    act_known: str = option(
        "auto",
        (
            "palora_act: also protect the input directions of these known facts ('auto': "
            "--mix-known's file; '': none)"
        ),
    )
    act_examples: int = option(
        64, "palora_act: examples run to estimate each covariance", ge=1, le=65536
    )
    output_side: str = option(
        "probe",
        "palora_act's output side U_S: the probe's S, as many at random or of the largest "
        "(controls), or none (V_act alone): the ablation of docs/probe-test.md",
        choices=list(palora.OUTPUT_SIDES),
    )
    fact_tokens: int = option(16, "answer length when checking recall", ge=1, le=256)
    recall_sample: int = option(
        256, "check recall on a seeded sample of this many trained facts (0: all)", ge=0
    )
    save_every: int = option(25, "steps between resumable checkpoints", ge=1)
    keep_epochs: bool = option(
        False, "also keep each epoch's adapter, in --out/epochs/ (a frontier from one run)"
    )
    after: str = option(
        "",
        "a finished run (LoRA family) to continue a stream from: its model, merged, is this "
        "run's base; the probe stays the expert's",
    )
    mix_earlier: float = option(
        0.0, "with --after: facts of the earlier rounds replayed per new fact", ge=0, le=16
    )
    act_earlier: int = option(
        32,
        "palora_act with --after: input directions protected per earlier round, the top of its "
        "facts' activations (0: none)",
        ge=0,
        le=4096,
    )
    max_len: int = option(256, "longest prompt + answer in tokens", ge=8)
    svd_cache: str = option(adapters.SVD_CACHE, "folder of cached SVD factors ('': none)")


def check_files(cfg: Config):
    """Every named file exists, before any model is loaded ('expert' and 'none' are keywords)."""
    skill = "" if cfg.mix_skill in ("expert", "none") else cfg.mix_skill
    act_known = "" if cfg.act_known == "auto" else cfg.act_known
    for path in [cfg.facts, *cfg.svf, cfg.mix_known, skill, cfg.skill_data, act_known]:
        if path:
            tasks.check_file(path)


def check_after(after: Path, method: str, svf: Path, out: Path):
    """--after: a finished run of the LoRA family (a weight update to merge) on the same expert."""
    if not adapters.record(method).weight_update:
        raise cli.ConfigError(f"--after: only the LoRA family continues a stream, not {method}")
    if after.resolve() == out.resolve():
        raise cli.ConfigError(f"--after {after}: the same folder as --out")
    before = adapters.run_method(after)  # a missing or unfinished run names its folder
    if not adapters.record(before).weight_update:
        raise cli.ConfigError(f"{adapters.run_file(after)}: {before} makes no update to merge")
    first = adapters.run_config(after)["svf"][0]
    if Path(first).resolve() != svf.resolve():
        raise cli.ConfigError(f"{after}/config.json: made on the expert {first}, not on {svf}")


def latest_svf(identity: str, ckpt: str) -> Path:
    """The newest runs/svf-*/svf.safetensors made for this checkpoint."""
    paths = sorted(RUNS.glob("svf-*/svf.safetensors"), key=lambda p: p.stat().st_mtime)
    for path in reversed(paths):
        if adapters.read_tensors(path)[1].get("checkpoint") == identity:
            return path
    raise FileNotFoundError(
        f"no SVF expert for checkpoint {ckpt} ({identity}) in "
        f"{RUNS}/svf-*/svf.safetensors: run `python train_svf.py --ckpt "
        f"{ckpt}` first, or pass --svf FILE"
    )


# -----------------------------------------------------------------------------
# data: facts plus optional mixed-in examples


def skill_examples(path) -> list:
    """The skill's examples, checked as train_svf.py checks them (path:line errors)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (the skill's examples)")
    records = tasks.read_jsonl(path)
    tasks.check_reasoning(records, path)
    return records


def mixed(records: list, n: int, seed: int) -> list:
    """n records in seeded random order (whole passes over the pool, then part of one)."""
    g = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(len(records), generator=g) for _ in range(math.ceil(n / len(records)))]
    return [records[i] for i in torch.cat(passes)[:n].tolist()]


def encode(tokenizer, data: dict, cfg: Config) -> list:
    """(ids, labels), loss on the answer tokens only. A fact longer than --max-len is an error (it
    would silently not be injected); a mixed-in example is skipped and counted."""
    n_mix = round(cfg.mix_ratio * len(data["facts"]))
    groups = [("facts", data["facts"])]
    groups += [(k, mixed(data[k], n_mix, cfg.seed)) for k in ("known", "skill") if k in data]
    if data.get("earlier"):  # a stream's replay of the rounds before
        n_earlier = round(cfg.mix_earlier * len(data["facts"]))
        groups.append(("earlier", mixed(data["earlier"], n_earlier, cfg.seed)))
    examples, skipped = [], 0
    for kind, records in groups:
        for r in records:
            ids, labels = tasks.encode_example(tokenizer, r["question"], r["answer"], cfg.max_len)
            if ids is None and kind == "facts":
                raise tasks.DataError(
                    f"{cfg.facts}:{r['_line']}: question + answer longer than "
                    f"--max-len {cfg.max_len}"
                )
            if ids is None:
                skipped += 1
            else:
                examples.append((ids, labels))
    if skipped:
        print(f"skipped {skipped} mixed-in examples longer than --max-len", file=sys.stderr)
    return examples


# -----------------------------------------------------------------------------
# the base (merged expert), the probe, what the method protects


def make_base(model, identity: str, cfg: Config, experts: list, targets: tuple):
    """Merge the first expert into the model; probe all of them against the BASE weight's SVD
    (the merged W' = U diag(s ⊙ m) Vh keeps its singular vectors, so S names the same directions in
    both). Returns (the merged expert's SVDs of the targets, the probe's S, the set the method
    protects)."""
    kinds = sorted(set(targets) | {palora.matrix_kind(n) for z in experts for n in z})
    base = adapters.svds(model, kinds, identity, cfg.svd_cache)
    palora.merge_expert(model, base, experts[0])
    names = list(palora.find_targets(model, targets))
    target_svds = {n: base[n] for n in names}
    probes = [{n: z[n] for n in names if n in z} for z in experts]
    rule = palora.probe_rule(cfg.probe_fraction, cfg.probe_threshold, cfg.probe_global_fraction)
    S = palora.probe(target_svds, probes, rule, cfg.probe_score)
    expert = palora.expert_svds(target_svds, experts[0])
    side = cfg.output_side if cfg.method == "palora_act" else cfg.method
    return expert, S, palora.same_count(side, S, expert, cfg.seed)


def input_bases(model, tokenizer, cfg: Config, counts: dict, earlier: list) -> dict:
    """palora_act: V_act (in, k) per weight, the top-k directions of the skill's inputs (and, with
    --act-known, of the known facts' inputs too: covariances scaled to unit trace, then added). In
    a stream, extended by --act-earlier directions per earlier round: the top of the earlier
    rounds' facts' inputs outside that span, run through this model (the rounds merged), as
    AlphaEdit protects the keys of the facts it edited before."""

    def covariances(path):
        records = mixed(tasks.read_jsonl(path), cfg.act_examples, cfg.seed)
        return tasks.input_covariances(model, tokenizer, records, list(counts), cfg.max_len)

    covs = covariances(cfg.skill_data)
    if cfg.act_known:
        known = covariances(cfg.act_known)
        covs = {n: C / C.trace() + known[n] / known[n].trace() for n, C in covs.items()}
    bases = palora.activation_bases(covs, counts)
    if not (earlier and cfg.act_earlier):
        return bases
    facts = [f for facts in earlier for f in facts]
    covs = tasks.input_covariances(model, tokenizer, facts, list(counts), cfg.max_len)
    extra = {n: cfg.act_earlier * len(earlier) for n in counts}
    bases = palora.extend_bases(bases, covs, extra, free=cfg.rank)
    if is_main():
        room = {n: f"{V.shape[1]} of {V.shape[0]}" for n, V in bases.items()}
        print(f"input directions protected: {dict(list(room.items())[:3])} ...", file=sys.stderr)
    return bases


def earlier_rounds(after: str) -> list[list]:
    """The facts of every round of the stream that ends with run `after`, oldest first: each
    run's config.json names its facts file and the run it followed."""
    rounds, seen = [], set()
    while after:
        config = Path(after) / "config.json"
        if Path(after).resolve() in seen:
            raise cli.ConfigError(f"{config}: the stream's chain loops back to {after}")
        seen.add(Path(after).resolve())
        run = adapters.run_config(Path(after))
        facts, after = run["facts"], run.get("after", "")
        if not Path(facts).is_file():
            raise cli.ConfigError(f"{config}: the round's facts {facts} are gone")
        rounds.insert(0, tasks.read_facts(facts))
    return rounds


def merged_folder(model, ckpt_folder: Path, svf: Path) -> Path:
    """The merged expert as an HF folder beside the expert file (the PEFT adapter's base), written
    once and named by the expert file's hash."""
    folder = svf.parent / f"merged-{hashlib.sha256(svf.read_bytes()).hexdigest()[:8]}"
    if not (folder / "model.safetensors").exists():
        adapters.save_merged(model, ckpt_folder, folder)
    return folder.resolve()


def corpus(tokenizer, records: list, cfg: Config) -> list:
    """smf: token ids of up to --smf-background examples (seeded order, no repeats), unpadded."""
    records = mixed(records, min(cfg.smf_background, len(records)), cfg.seed)
    ids = [
        tasks.encode_example(tokenizer, r["question"], r["answer"], cfg.max_len)[0] for r in records
    ]
    return [x for x in ids if x]


# -----------------------------------------------------------------------------
# training: the method's optimizer on its parameters until the facts are recalled


def recall(model, tokenizer, facts: list, cfg: Config) -> float:
    """Share of the trained questions whose greedy answer holds the gold (tasks.fact_correct),
    the answering shared out under torchrun (training.answer_all)."""
    questions = [r["question"] for r in facts]
    answers = answer_all(model, tokenizer, questions, cfg.fact_tokens, 64, cfg.parallel)
    return sum(tasks.fact_correct(a, r["answer"]) for a, r in zip(answers, facts)) / len(facts)


def checked_facts(facts: list, cfg: Config) -> list:
    """The facts recall is checked on after every epoch: all, or --recall-sample of them (seeded),
    so that a check costs the same at 100 facts as at 10,000."""
    if not cfg.recall_sample or cfg.recall_sample >= len(facts):
        return facts
    return mixed(facts, cfg.recall_sample, cfg.seed)  # n < len: one pass, no repeats


def train(
    model, tokenizer, params, examples, facts, cfg: Config, out: Path, memory=None, snapshot=None
) -> dict:
    """adapters.optimizer on params, adapters.step per batch (model: what attach returned), the lr
    following --schedule over the planned steps. The data order and the lr are functions of (seed,
    step) and the state (with the best checked epoch's parameters) is saved every --save-every steps
    and at every recall check, so --resume ends with the same adapter as an uninterrupted run.
    snapshot(epoch, steps, loss, recall), if given, is called at every recall check. When the target
    is missed, params end as the best checked epoch's, not the last's. Returns the steps run, the
    last loss, the kept parameters' recall and epoch (None without checks) and whether the target
    was reached."""
    optimizer = adapters.optimizer(cfg.method, params, cfg.lr, cfg.gate_lr)
    peak = [g["lr"] for g in optimizer.param_groups]  # imsm's gate has an lr of its own
    device = next(model.parameters()).device  # no autocast: LoRALinear runs in the input's dtype
    per_epoch = max(1, len(examples) // cfg.batch_size)  # batch_indices' epoch length
    steps = cfg.epochs * per_epoch
    best = {f"best/{n}": full(p).detach().clone() for n, p in params.items()}  # whole, on rank 0
    start, extra = resume_from(out, {**params, **best}, optimizer, cfg.resume)
    loss, last = extra.get("loss", math.nan), extra.get("recall")
    kept = {"recall": extra.get("best_recall"), "epoch": extra.get("best_epoch")}
    if extra.get("stopped"):
        return {"steps": start, "loss": loss, **kept, "reached": True}
    check = checked_facts(facts, cfg)
    t0, tokens_seen = time.time(), 0
    desc = f"inject {cfg.method}"
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not is_main())
    for step in bar:
        factor = lr_factor(step, steps, cfg.warmup, cfg.schedule)
        set_lr(optimizer, peak, factor)
        tokens, labels, mask = batch_at(examples, tokenizer.pad_id, cfg, step, device)
        total = shard_total(labels)  # under torchrun: the global batch's answer tokens
        batch_loss = adapters.step(
            cfg.method, model, optimizer, tokens, labels, mask, memory, total
        )
        check_finite(batch_loss, step, params)  # before anything of this step is saved
        loss = all_sum(batch_loss.item()) / world()  # the global batch's mean
        tokens_seen += int(all_sum(int((labels != tasks.IGNORE_INDEX).sum())))
        tok_s = tokens_seen / (time.time() - t0)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
        row = {"step": step + 1, "loss": loss, "lr": peak[-1] * factor, "tokens_per_s": tok_s}
        checked = cfg.recall_target and (step + 1) % per_epoch == 0
        if checked:
            row["recall"] = last = recall(model, tokenizer, check, cfg)
            kept = keep_best(params, best, kept, last, (step + 1) // per_epoch)
        if is_main():  # rank 0 alone writes; every rank holds the same A, B and moments
            tasks.append_jsonl(out / "metrics.jsonl", row)
        if checked and snapshot:
            snapshot((step + 1) // per_epoch, step + 1, loss, last)
        stopped = bool(checked and last >= cfg.recall_target)
        if (step + 1) % cfg.save_every == 0 or checked or step + 1 == steps:
            state = {"loss": loss, "recall": last, "stopped": stopped}
            state |= {"best_recall": kept["recall"], "best_epoch": kept["epoch"]}
            save_progress(out, {**params, **best}, optimizer, step + 1, state, cfg)
        if stopped:
            return {"steps": step + 1, "loss": loss, **kept, "reached": True}
    if kept["recall"] is not None and kept["recall"] > last:  # the target missed: the best epoch
        restore(params, best)
    return {"steps": steps, "loss": loss, **kept, "reached": not cfg.recall_target}


def resume_from(out: Path, tensors: dict, optimizer, resume: bool) -> tuple[int, dict]:
    """(the step to start from, the saved state's extra values): 0 and {} unless --resume, when
    the tensors and the optimizer are loaded from out/state.safetensors; metrics.jsonl cut to the
    step."""
    start, extra = 0, {}
    if resume:
        start, extra = load_state(out / "state.safetensors", tensors, optimizer)
    restart_metrics(out / "metrics.jsonl", start)
    return start, extra


def set_lr(optimizer, peak: list, factor: float):
    """Each parameter group at its peak lr times the schedule's factor."""
    for group, lr in zip(optimizer.param_groups, peak):
        group["lr"] = lr * factor


def batch_at(examples: list, pad_id: int, cfg: Config, step: int, device) -> tuple:
    """(tokens, labels, mask) of this rank's slice of the global batch at `step`, on device."""
    idx = shard(batch_indices(len(examples), cfg.batch_size, step, cfg.seed))  # rank's slice
    batch = tasks.collate([examples[i] for i in idx], pad_id)
    return tuple(t.to(device) for t in batch)


def keep_best(params: dict, best: dict, kept: dict, last: float, epoch: int) -> dict:
    """After a recall check: the kept epoch, and its parameters copied into best when `last` beats
    it. Every rank calls it: full() gathers FSDP2's shards."""
    if is_main():
        tqdm.write(f"epoch {epoch}: recall {last:.3f}")
    if kept["recall"] is not None and last <= kept["recall"]:
        return kept
    for n, p in params.items():
        best[f"best/{n}"] = full(p).detach().clone()
    return {"recall": last, "epoch": epoch}


def save_progress(out: Path, tensors: dict, optimizer, steps: int, state: dict, cfg: Config):
    """The resumable state (every rank: FSDP2 gathers it; rank 0 writes it)."""
    save_state(out / "state.safetensors", tensors, optimizer, steps, state, cfg)


def restore(params: dict, best: dict):
    """The target missed: params set back to the best checked epoch's."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(placed(best[f"best/{n}"], p))


# -----------------------------------------------------------------------------
# main, in stages: resolve (no model yet), make_model, protect, attach, train, finish


@dataclass
class Plan:
    """What resolve() settles before the model loads: the resolved config (what config.json
    records), the data read and checked, where the run reads from and writes to."""

    cfg: Config
    method: adapters.Method  # what --method attaches, trains, saves and protects
    rule: tuple  # the probe's selection rule (palora.probe_rule)
    memory: adapters.Memory  # smf's settings; its corpus is filled once a tokenizer is loaded
    data: dict  # "facts", and the mixed-in "known", "skill", "earlier" records
    skill: list  # the skill's examples: palora_act's input basis, smf's corpus ([]: none)
    out: Path
    folder: Path  # the checkpoint's
    identity: str  # checkpoints.identity(folder)
    svf: list  # the expert files (Path), the first the base
    targets: tuple
    earlier: list  # a stream's earlier rounds' facts, oldest first ([]: not a stream)


def read_data(cfg: Config) -> dict:
    """The facts and the mixed-in files named by flags, read and checked (path:LINE errors)."""
    data = {"facts": tasks.read_facts(cfg.facts)}
    tasks.check_facts(data["facts"], cfg.facts)
    if cfg.mix_known:
        data["known"] = tasks.read_jsonl(cfg.mix_known)
    if cfg.mix_skill not in ("expert", "none"):
        data["skill"] = skill_examples(cfg.mix_skill)
    return data


def resolve(cfg: Config) -> Plan:
    """Every flag, file and data set checked, and the config resolved, before any model is loaded
    or anything written: a bad input fails in seconds, naming itself."""
    rule = palora.probe_rule(cfg.probe_fraction, cfg.probe_threshold, cfg.probe_global_fraction)
    memory = adapters.Memory(cfg.smf_slots, cfg.smf_topk, cfg.smf_top_t, cfg.smf_score)  # checked
    method = adapters.record(cfg.method)
    if cfg.act_known not in ("auto", "") and not method.input_bases:
        raise cli.ConfigError(
            f"--act-known: only palora_act protects input directions (--method {cfg.method})"
        )
    if cfg.mix_earlier and not cfg.after:
        raise cli.ConfigError(
            "--mix-earlier: replays the earlier rounds of --after RUN; none given"
        )
    if cfg.output_side != "probe" and not method.input_bases:
        raise cli.ConfigError(f"--output-side: palora_act's alone, not --method {cfg.method}'s")
    check_files(cfg)  # then every data file is read and checked, with path:LINE errors
    cli.check_folder(cfg.svd_cache, "--svd-cache")
    data = read_data(cfg)
    out = Path(cfg.out or RUNS / f"inject-{cfg.method}-{Path(cfg.facts).stem}-s{cfg.seed}")
    folder = checkpoints.resolve(cfg.ckpt)
    check_context(folder, {"--fact-tokens": cfg.fact_tokens})
    identity = checkpoints.identity(folder)
    svf_paths = [Path(p) for p in cfg.svf] or [latest_svf(identity, cfg.ckpt)]
    earlier = []
    if cfg.after:
        check_after(Path(cfg.after), cfg.method, svf_paths[0], out)
        earlier = earlier_rounds(cfg.after)
        if cfg.mix_earlier:
            data["earlier"] = [f for facts in earlier for f in facts]
    if cfg.parallel == "fsdp" and method.fsdp_params is None:
        raise cli.ConfigError(
            f"--parallel fsdp: the LoRA family only; {cfg.method} runs in one process or with ddp"
        )
    meta = adapters.read_tensors(svf_paths[0], identity)[1]  # another checkpoint's is refused
    targets = parse_targets(cfg.targets or meta["targets"])
    check_rank(folder, cfg.rank, targets)  # A and B are sized by it: refused before allocation
    resolved = resolved_config(cfg, out, svf_paths, targets, meta.get("data"))
    if cfg.mix_skill == "expert":  # replay the skill the expert was trained on
        data["skill"] = skill_examples(resolved.mix_skill)
    skill = skill_examples(resolved.skill_data) if resolved.skill_data else []
    return Plan(
        cfg=resolved,
        method=method,
        rule=rule,
        memory=memory,
        data=data,
        skill=skill,
        out=out,
        folder=folder,
        identity=identity,
        svf=svf_paths,
        targets=targets,
        earlier=earlier,
    )


def resolved_config(cfg: Config, out: Path, svf: list, targets: tuple, expert_data) -> Config:
    """cfg with every default that depends on the files made explicit: the experts, the targets,
    the output folder, the skill's data (the expert's, from its metadata), the known facts whose
    inputs palora_act protects."""
    method = adapters.record(cfg.method)
    skilled = method.input_bases or method.background  # both are built from the skill's data
    needs_data = cfg.mix_skill == "expert" or (skilled and not cfg.skill_data)
    if expert_data is None and needs_data:
        raise cli.ConfigError(
            f"{svf[0]}: its metadata names no training data; pass "
            f"--mix-skill FILE (or none) and --skill-data FILE"
        )
    act_known = cfg.act_known
    if act_known == "auto":  # the known facts mixed in have their inputs protected too
        act_known = cfg.mix_known if method.input_bases else ""
    return dataclasses.replace(
        cfg,
        svf=[str(p) for p in svf],
        targets=",".join(targets),
        out=str(out),
        mix_skill=str(REPO / expert_data) if cfg.mix_skill == "expert" else cfg.mix_skill,
        skill_data=cfg.skill_data or (str(REPO / expert_data) if skilled else ""),
        act_known=act_known,
    )


def make_model(plan: Plan) -> tuple:
    """(model, tokenizer, the experts' z, the encoded examples): the checkpoint loaded (under
    torchrun, one process per rank), the experts checked against its shapes, the data tokenized."""
    cfg = plan.cfg
    device = setup_distributed(resolve_device(cfg.device))  # torchrun: one process per rank
    torch.manual_seed(cfg.seed)
    model, tokenizer = model_lib.load(
        plan.folder, device=device, dtype=resolve_dtype(cfg.dtype, device)
    )
    experts = [adapters.load_svf(p, plan.identity, model)[0] for p in plan.svf]
    palora.find_targets(model, plan.targets)  # an unknown target name fails here
    examples = encode(tokenizer, plan.data, cfg)
    if plan.method.background:
        plan.memory.corpus = corpus(tokenizer, plan.skill + plan.data.get("known", []), cfg)
    return model, tokenizer, experts, examples


@dataclass
class Protection:
    """What protect() computed: the merged expert's SVD of each target (what the method's layers
    are built from), the indices the method keeps off, palora_act's input bases, the counts of the
    probe's S, and the merged expert's folder (the PEFT adapter's base)."""

    expert: dict | None
    protected: dict
    bases: dict | None
    counts: dict
    base: Path


def protect(model, tokenizer, plan: Plan, experts: list) -> tuple:
    """(the model to train on, Protection): the first expert merged in, the probe of all of them,
    the set the method protects (written to probe.safetensors), palora_act's input bases. In a
    stream the earlier rounds are merged in after the probe: what is protected stays the
    expert's."""
    cfg = plan.cfg
    with main_first():  # rank 0 computes and writes the SVD cache and the merged folder first
        expert, S, protected = make_base(model, plan.identity, cfg, experts, plan.targets)
        base = merged_folder(model, plan.folder, plan.svf[0])
    if cfg.after:
        model, _ = adapters.load_run(model, Path(cfg.after), plan.identity)
    counts = {n: len(s) for n, s in S.items()}
    bases = None
    if plan.method.input_bases:
        bases = input_bases(model, tokenizer, cfg, counts, plan.earlier)
    meta = {
        "method": cfg.method,
        "svf": svf_record(plan),
        "score": cfg.probe_score,
        "selection": json.dumps(plan.rule),
        "seed": cfg.seed,
        "output_side": cfg.output_side,
    }
    if is_main():
        adapters.save_probe(plan.out / "probe.safetensors", protected, plan.identity, meta)
    return model, Protection(expert, protected, bases, counts, base)


def svf_record(plan: Plan) -> str:
    """The expert files as the probe and the run's files record them (JSON list)."""
    return json.dumps([str(p) for p in plan.svf])


def attach(model, plan: Plan, protection: Protection, n_examples: int) -> tuple:
    """(the module that trains and answers, name -> trainable Parameter): the method on the frozen
    model (adapters.attach)."""
    cfg = plan.cfg
    model.requires_grad_(False)
    trained, params = adapters.attach(
        model,
        cfg.method,
        cfg.rank,
        cfg.alpha,
        cfg.seed,
        protection.expert,
        protection.protected,
        protection.bases,
        plan.memory,
    )
    for p in params.values():
        p.requires_grad_(True)
    if is_main():
        n_trainable = sum(p.numel() for p in params.values())
        print(
            f"{cfg.method}: {n_trainable:,} trainable parameters, {n_examples} examples, "
            f"{sum(protection.counts.values()):,} components protected by the probe"
        )
    return trained, params


@dataclass
class Ending:
    """What finish() writes beside the training result: the trained module, the plan, the counts
    summary.json reports, and when training began."""

    trained: torch.nn.Module  # what attach returned, wrapped (DDP) or sharded (FSDP2)
    plan: Plan
    base: Path
    examples: int
    trainable: int
    model_parameters: int
    t0: float


def finish(end: Ending, folder: Path, result: dict) -> dict:
    """The trained part and summary.json in folder (rank 0): the run's, or an epoch's."""
    cfg = end.plan.cfg
    summary = {
        "method": cfg.method,
        "steps": result["steps"],
        "examples": end.examples,
        "final_loss": result["loss"],
        "recall": result["recall"],  # of the kept parameters, on the checked facts
        "epoch": result["epoch"],
        "target_reached": result["reached"],
        "trainable": end.trainable,
        "model_parameters": end.model_parameters,
        "share": end.trainable / end.model_parameters,
        "base": str(end.base),
        "wall_s": time.time() - end.t0,
    }
    run_meta = {"svf": svf_record(end.plan)}  # every rank: FSDP2 gathers the layers, rank 0 writes
    module = unwrap(end.trained)
    adapters.save_run(module, cfg.method, folder, end.plan.identity, str(end.base), run_meta)
    if is_main():
        tasks.atomic_write_json(folder / "summary.json", summary)
    return summary


def keep_epoch(end: Ending, epoch: int, steps: int, loss: float, last: float):
    """--keep-epochs: this epoch's run as a folder of its own, evaluate.py's --adapter."""
    out = end.plan.out
    folder = out / "epochs" / f"{out.name}-e{epoch:02d}"
    if is_main():
        for name in ("config.json", "probe.safetensors"):
            tasks.atomic_write_bytes(folder / name, (out / name).read_bytes())
    reached = last >= end.plan.cfg.recall_target
    result = {"steps": steps, "loss": loss, "recall": last, "epoch": epoch, "reached": reached}
    finish(end, folder, result)


def main(cfg: Config) -> dict:
    plan = resolve(cfg)  # every input checked; nothing loaded, nothing written yet
    model, tokenizer, experts, examples = make_model(plan)
    if is_main():
        ignore = (*RUN_ONLY, "keep_epochs")  # not the result's
        resolved = plan.cfg
        reads = [plan.folder, *resolved.svf, resolved.facts, resolved.mix_known]
        reads += [resolved.mix_skill, resolved.skill_data, resolved.act_known, resolved.after]
        # refuses another run's folder, and one that holds what this run reads
        open_run(plan.out, resolved, cfg.resume, cfg.overwrite, ignore, inputs=reads)
    n_model = sum(p.numel() for p in model.parameters())
    model, protection = protect(model, tokenizer, plan, experts)
    trained, params = attach(model, plan, protection, len(examples))
    protection.expert = (
        None  # the full SVD factors (440 MB on SmolLM2): the layers keep what they need
    )
    n_trainable = sum(p.numel() for p in params.values())
    t0 = time.time()
    trained = wrap(trained, cfg.parallel)  # under torchrun DDP or FSDP2, else the module itself
    if cfg.parallel == "fsdp":  # fully_shard replaced the parameters by shards: train those
        params = plan.method.fsdp_params(trained)
    end = Ending(trained, plan, protection.base, len(examples), n_trainable, n_model, t0)
    snapshot = partial(keep_epoch, end) if cfg.keep_epochs else None
    result = train(
        trained,
        tokenizer,
        params,
        examples,
        plan.data["facts"],
        plan.cfg,
        plan.out,
        plan.memory,
        snapshot,
    )
    if not result["reached"] and is_main():  # said plainly, and in summary.json
        print(
            f"warning: recall {result['recall']:.3f} < --recall-target {cfg.recall_target} after "
            f"{cfg.epochs} epochs; kept epoch {result['epoch']}, the best checked",
            file=sys.stderr,
        )
    return finish(end, plan.out, result)


if __name__ == "__main__":
    cli.run(main, cli.parse_config(Config, description=__doc__.split("\n\n")[0]))
    teardown()
