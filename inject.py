"""Stage two of PALoRA (arXiv 2605.24549): inject facts with LoRA on a merged SVF expert, the
update kept off the components its probe marks as the skill's:
dW = (I - U_S U_Sᵀ) B A (I - V_S V_Sᵀ) · alpha/r. S = the components whose multiplier m = z·c
the expert moved furthest from 1 (indices in the base weight's spectrum). Several --svf experts:
the first is the base, all are probes (their S united).
Training stops when greedy answers recall --recall-target of the trained facts (checked after every
epoch), or after --epochs. The defaults are the setting that measured best on facts it was not
chosen on (README, "Stage two on facts it never saw"): palora_act (the probe's output side, the
skill's input directions), known facts mixed in and their input directions protected, lr 2e-3. The
baselines and what each protects: adapters.METHODS, palora.METHODS; imsm (a frozen and a LoRA stream
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
    is_main,
    load_state,
    main_first,
    open_run,
    option,
    parse_targets,
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
        0.9,
        "stop once greedy answers recall this share of the trained facts (0: run --epochs)",
        ge=0,
        le=1,
    )
    epochs: int = option(20, "most passes over the facts (plus mixed-in examples)", ge=1)
    lr: float = option(2e-3, "Adam learning rate for A and B (smf: SparseAdam's, for V)", gt=0)
    gate_lr: float = option(
        5e-3,
        ("imsm: the gate's Adam lr, stated (the reference code's gate silently gets 1e-3)"),
        gt=0,
    )
    smf_slots: int = option(4096, "smf: memory slots per layer, a square n² (product keys)", ge=4)
    smf_topk: int = option(16, "smf: slots each token reads, <= n", ge=1)
    smf_top_t: int = option(64, "smf: value rows updated per layer and step (top-T by score)", ge=1)
    smf_score: str = field(
        default="tfidf",
        metadata={"help": "smf: slot ranking against the background", "choices": ["tfidf", "kl"]},
    )
    smf_background: int = option(
        128, "smf: skill (and --mix-known) examples in the background corpus", ge=1
    )
    batch_size: int = option(8, "examples per step", ge=1)
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
        "data/known/known_mix.jsonl",
        "JSONL of facts the model knows, mixed into training (2502.14502; '': none)",
    )
    mix_skill: str = option(
        "expert",
        (
            "JSONL of the skill's examples mixed in (replay); 'expert': the SVF expert's training "
            "data, from its metadata; 'none': no replay"
        ),
    )
    mix_ratio: float = option(0.5, "mixed-in examples per fact, from each --mix-* file", ge=0)
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
    act_examples: int = option(64, "palora_act: examples run to estimate each covariance", ge=1)
    fact_tokens: int = option(16, "answer length when checking recall", ge=1)
    save_every: int = option(25, "steps between resumable checkpoints", ge=1)
    keep_epochs: bool = option(
        False, "also keep each epoch's adapter, in --out/epochs/ (a frontier from one run)"
    )
    after: str = option(
        "",
        "a finished run (LoRA family) to continue a stream from: its model, merged, is this "
        "run's base; the probe stays the expert's",
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
    if method not in palora.METHODS:
        raise cli.ConfigError(f"--after: only the LoRA family continues a stream, not {method}")
    if after.resolve() == out.resolve():
        raise cli.ConfigError(f"--after {after}: the same folder as --out")
    before = adapters.run_method(after)  # a missing or unfinished run names its folder
    if before not in palora.METHODS:
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
    return expert, S, palora.same_count(cfg.method, S, expert, cfg.seed)


def input_bases(model, tokenizer, cfg: Config, counts: dict) -> dict:
    """palora_act: V_act (in, k) per weight, the top-k directions of the skill's inputs (and, with
    --act-known, of the known facts' inputs too: covariances scaled to unit trace, then added)."""

    def covariances(path):
        records = mixed(tasks.read_jsonl(path), cfg.act_examples, cfg.seed)
        return tasks.input_covariances(model, tokenizer, records, list(counts), cfg.max_len)

    covs = covariances(cfg.skill_data)
    if cfg.act_known:
        known = covariances(cfg.act_known)
        covs = {n: C / C.trace() + known[n] / known[n].trace() for n, C in covs.items()}
    return palora.activation_bases(covs, counts)


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


def train(
    model,
    tokenizer,
    params: dict,
    examples: list,
    facts: list,
    cfg: Config,
    out: Path,
    memory=None,
    snapshot=None,
):
    """adapters.optimizer on params, adapters.step per batch (model: what attach returned). The
    data order is a function of (seed, step) and the state is saved every --save-every steps and
    at every recall check, so --resume ends with the same adapter as an uninterrupted run.
    snapshot(epoch, steps, loss, recall), if given, is called at every recall check. Returns (steps
    run, last loss, last recall or None)."""
    optimizer = adapters.optimizer(cfg.method, params, cfg.lr, cfg.gate_lr)
    device = next(model.parameters()).device  # no autocast: LoRALinear runs in the input's dtype
    per_epoch = max(1, len(examples) // cfg.batch_size)  # batch_indices' epoch length
    steps = cfg.epochs * per_epoch
    start, extra = 0, {}
    if cfg.resume:
        start, extra = load_state(out / "state.safetensors", params, optimizer)
    restart_metrics(out / "metrics.jsonl", start)
    loss, last = extra.get("loss", math.nan), extra.get("recall")
    if extra.get("stopped"):
        return start, loss, last
    t0, tokens_seen = time.time(), 0
    bar = tqdm(
        range(start, steps),
        initial=start,
        total=steps,
        desc=f"inject {cfg.method}",
        disable=not is_main(),
    )
    for step in bar:
        idx = shard(batch_indices(len(examples), cfg.batch_size, step, cfg.seed))  # rank's slice
        batch = tasks.collate([examples[i] for i in idx], tokenizer.pad_id)
        tokens, labels, mask = (t.to(device) for t in batch)
        total = shard_total(labels)  # under torchrun: the global batch's answer tokens
        batch_loss = adapters.step(
            cfg.method, model, optimizer, tokens, labels, mask, memory, total
        )
        check_finite(batch_loss, step, params)  # before anything of this step is saved
        loss = all_sum(batch_loss.item()) / world()  # the global batch's mean
        tokens_seen += int(all_sum(int((labels != tasks.IGNORE_INDEX).sum())))
        tok_s = tokens_seen / (time.time() - t0)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
        row = {"step": step + 1, "loss": loss, "tokens_per_s": tok_s}
        checked = cfg.recall_target and (step + 1) % per_epoch == 0
        if checked:
            row["recall"] = last = recall(model, tokenizer, facts, cfg)
            if is_main():
                bar.write(f"epoch {(step + 1) // per_epoch}: recall {last:.3f}")
        if is_main():  # rank 0 alone writes; every rank holds the same A, B and moments
            tasks.append_jsonl(out / "metrics.jsonl", row)
        if checked and snapshot:
            snapshot((step + 1) // per_epoch, step + 1, loss, last)
        stopped = bool(checked and last >= cfg.recall_target)
        saving = (step + 1) % cfg.save_every == 0 or checked or step + 1 == steps
        if saving:  # every rank: FSDP2 gathers the state; rank 0 writes it
            state = {"loss": loss, "recall": last, "stopped": stopped}
            save_state(out / "state.safetensors", params, optimizer, step + 1, state, cfg)
        if stopped:
            return step + 1, loss, last
    return steps, loss, last


# -----------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    rule = palora.probe_rule(cfg.probe_fraction, cfg.probe_threshold, cfg.probe_global_fraction)
    memory = adapters.Memory(cfg.smf_slots, cfg.smf_topk, cfg.smf_top_t, cfg.smf_score)  # checked
    if cfg.act_known not in ("auto", "") and cfg.method != "palora_act":
        raise cli.ConfigError(
            f"--act-known: only palora_act protects input directions (--method {cfg.method})"
        )
    check_files(cfg)  # then every data file is read and checked, with path:LINE errors
    data = {"facts": tasks.read_jsonl(cfg.facts)}
    tasks.check_facts(data["facts"], cfg.facts)
    if cfg.mix_known:
        data["known"] = tasks.read_jsonl(cfg.mix_known)
    if cfg.mix_skill not in ("expert", "none"):
        data["skill"] = skill_examples(cfg.mix_skill)
    out = Path(cfg.out or RUNS / f"inject-{cfg.method}-{Path(cfg.facts).stem}-s{cfg.seed}")
    folder = checkpoints.resolve(cfg.ckpt)
    check_context(folder, {"--fact-tokens": cfg.fact_tokens})
    identity = checkpoints.identity(folder)
    svf_paths = [Path(p) for p in cfg.svf] or [latest_svf(identity, cfg.ckpt)]
    if cfg.after:
        check_after(Path(cfg.after), cfg.method, svf_paths[0], out)
    if cfg.parallel == "fsdp" and cfg.method not in palora.METHODS:
        raise cli.ConfigError(
            f"--parallel fsdp: the LoRA family only; {cfg.method} runs in one process or with ddp"
        )
    device = setup_distributed(resolve_device(cfg.device))  # torchrun: one process per rank
    torch.manual_seed(cfg.seed)

    model, tokenizer = model_lib.load(folder, device=device, dtype=resolve_dtype(cfg.dtype, device))
    # another checkpoint's expert is refused
    loaded = [adapters.load_svf(p, identity, model) for p in svf_paths]
    targets = parse_targets(cfg.targets or loaded[0][1]["targets"])
    palora.find_targets(model, targets)  # an unknown target name fails here
    expert_data = loaded[0][1].get("data")
    skilled = cfg.method in ("palora_act", "smf")  # an input basis, a background corpus
    needs_data = cfg.mix_skill == "expert" or (skilled and not cfg.skill_data)
    if expert_data is None and needs_data:
        raise cli.ConfigError(
            f"{svf_paths[0]}: its metadata names no training data; pass "
            f"--mix-skill FILE (or none) and --skill-data FILE"
        )
    if cfg.mix_skill == "expert":  # replay the skill the expert was trained on
        data["skill"] = skill_examples(REPO / expert_data)
    examples = encode(tokenizer, data, cfg)
    act_known = cfg.act_known
    if act_known == "auto":  # the known facts mixed in have their inputs protected too
        act_known = cfg.mix_known if cfg.method == "palora_act" else ""
    resolved = dataclasses.replace(
        cfg,
        svf=[str(p) for p in svf_paths],
        targets=",".join(targets),
        out=str(out),
        mix_skill=str(REPO / expert_data) if cfg.mix_skill == "expert" else cfg.mix_skill,
        skill_data=cfg.skill_data or (str(REPO / expert_data) if skilled else ""),
        act_known=act_known,
    )
    skill = skill_examples(resolved.skill_data) if resolved.skill_data else []
    if cfg.method == "smf":
        memory.corpus = corpus(tokenizer, skill + data.get("known", []), resolved)
    if is_main():
        ignore = (*RUN_ONLY, "keep_epochs")  # not the result's
        reads = [folder, *resolved.svf, resolved.facts, resolved.mix_known, resolved.mix_skill]
        reads += [resolved.skill_data, resolved.act_known, resolved.after]
        # refuses another run's folder, and one that holds what this run reads
        open_run(out, resolved, cfg.resume, cfg.overwrite, ignore, inputs=reads)

    n_model = sum(p.numel() for p in model.parameters())
    with main_first():  # rank 0 computes and writes the SVD cache and the merged folder first
        expert, S, protected = make_base(model, identity, resolved, [z for z, _ in loaded], targets)
        base = merged_folder(model, folder, svf_paths[0])
    if cfg.after:  # a stream: the earlier rounds merged in; what is protected stays the expert's
        model, _ = adapters.load_run(model, Path(cfg.after), identity)
    counts = {n: len(s) for n, s in S.items()}
    bases = input_bases(model, tokenizer, resolved, counts) if cfg.method == "palora_act" else None
    meta = {
        "method": cfg.method,
        "svf": json.dumps([str(p) for p in svf_paths]),
        "score": cfg.probe_score,
        "selection": json.dumps(rule),
        "seed": cfg.seed,
    }
    if is_main():
        adapters.save_probe(out / "probe.safetensors", protected, identity, meta)
    model.requires_grad_(False)
    trained, params = adapters.attach(
        model, cfg.method, cfg.rank, cfg.alpha, cfg.seed, expert, protected, bases, memory
    )
    del expert  # the full SVD factors (440 MB on SmolLM2): the layers keep what they need
    for p in params.values():
        p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in params.values())
    if is_main():
        print(
            f"{cfg.method}: {n_trainable:,} trainable parameters, {len(examples)} examples, "
            f"{sum(counts.values()):,} components protected by the probe"
        )
    t0 = time.time()
    trained = wrap(trained, cfg.parallel)  # under torchrun DDP or FSDP2, else the module itself
    if cfg.parallel == "fsdp":  # fully_shard replaced the parameters by shards: train those
        params = palora.lora_params(trained)

    def finish(folder: Path, steps: int, loss: float, last) -> dict:
        """The trained part and summary.json in folder (rank 0): the run's, or an epoch's."""
        summary = {
            "method": cfg.method,
            "steps": steps,
            "examples": len(examples),
            "final_loss": loss,
            "recall": last,
            "trainable": n_trainable,
            "model_parameters": n_model,
            "share": n_trainable / n_model,
            "base": str(base),
            "wall_s": time.time() - t0,
        }
        run_meta = {"svf": meta["svf"]}  # every rank: FSDP2 gathers the layers, rank 0 writes
        adapters.save_run(unwrap(trained), cfg.method, folder, identity, str(base), run_meta)
        if is_main():
            tasks.atomic_write_json(folder / "summary.json", summary)
        return summary

    def snapshot(epoch: int, steps: int, loss: float, last: float):
        """--keep-epochs: this epoch's run as a folder of its own, evaluate.py's --adapter."""
        folder = out / "epochs" / f"{out.name}-e{epoch:02d}"
        if is_main():
            for name in ("config.json", "probe.safetensors"):
                tasks.atomic_write_bytes(folder / name, (out / name).read_bytes())
        finish(folder, steps, loss, last)

    steps, loss, last = train(
        trained,
        tokenizer,
        params,
        examples,
        data["facts"],
        resolved,
        out,
        memory,
        snapshot if cfg.keep_epochs else None,
    )
    return finish(out, steps, loss, last)


if __name__ == "__main__":
    cli.run(main, cli.parse_config(Config, description=__doc__.split("\n\n")[0]))
    teardown()
