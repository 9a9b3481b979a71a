"""Stage two of PALoRA (arXiv 2605.24549): inject facts with LoRA on a merged SVF expert, the update kept off the
components its probe marks as the skill's: dW = (I - U_S U_Sᵀ) B A (I - V_S V_Sᵀ) · alpha/r, so U_Sᵀ dW = 0 = dW V_S.
S = the components whose multiplier m = z·c the expert moved furthest from 1 (indices in the base weight's spectrum).
Several --svf experts: the first is the base, all are probes (S's united). Baselines on the same layers, facts, rank
and steps: lora, pissa, milora, topk (OPLoRA: the merged expert's k largest directions, k = the probe's count per
matrix); palora_act, this project's extension (not the paper's), takes the input side from the skill's activations.

    python inject.py                                   # PALoRA on data/facts/facts.jsonl, the newest SVF expert
    python inject.py --method lora --seed 1            # a baseline, another seed
    python inject.py --svf runs/svf-a/svf.safetensors --svf runs/svf-b/svf.safetensors   # protect two skills
    python inject.py --probe-global-fraction 0.5 --mix-known data/known/known_facts.jsonl --resume

Outputs in --out (default runs/inject-<method>-<facts>-s<seed>/): adapter_config.json + adapter_model.safetensors
(peft layout; base_model_name_or_path = the merged expert, written once beside it as merged-<svf sha>/),
probe.safetensors (weight name -> int64 protected indices in the base spectrum, largest singular value first, with
checkpoint, svf files, score and selection), config.json, metrics.jsonl, summary.json, state.safetensors (resume).
"""
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import model as model_lib
import palora
import tasks
from training import (answer_loss, batch_indices, check_finite, load_state, resolve_device,
                      resolve_dtype, restart_metrics, save_config, save_state)

REPO = Path(__file__).resolve().parent
RUNS = REPO / "runs"


@dataclass
class Config:
    facts: str = field(default="data/facts/facts.jsonl", metadata={"help": "facts JSONL: question, answer, optional paraphrases (held out) and text"})
    ckpt: str = field(default="smollm2_135m", metadata={"help": "checkpoint folder or name (smollm2_135m, llama31_8b, mistral_7b)"})
    svf: list = field(default_factory=list, metadata={"help": "SVF expert file (default: the newest runs/svf-*/svf.safetensors of --ckpt); given several times, the FIRST is the base the adapter trains on and ALL are probes, their protected sets united"})
    method: str = field(default="palora", metadata={"help": "palora: probe-protected; lora, pissa, milora, topk (OPLoRA): baselines; palora_act: input side from the skill's activations (our extension)", "choices": list(palora.METHODS)})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: dW is scaled by alpha/r"})
    targets: str = field(default="", metadata={"help": "comma-separated linear names to adapt (default: the SVF expert's targets)"})
    probe_score: str = field(default="delta", metadata={"help": "delta: |m - 1|; energy: s * |m - 1|", "choices": ["delta", "energy"]})
    probe_fraction: float = field(default=0.5, metadata={"help": "share of each matrix's components protected (unless a threshold or global fraction is given)"})
    probe_threshold: float = field(default=0.0, metadata={"help": "protect every component scoring above this (0: off)"})
    probe_global_fraction: float = field(default=0.0, metadata={"help": "protect this share of all components pooled: one threshold, the rank adapts per matrix (0: off)"})
    epochs: int = field(default=3, metadata={"help": "passes over the facts (plus mixed-in examples)"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate for A and B (1e-3 recalled 11% of 64 facts after 6 epochs, 5e-3 72%: README)"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    seed: int = field(default=0, metadata={"help": "seed for A's initialisation, data order and mixing"})
    out: str = field(default="", metadata={"help": "output folder (default runs/inject-<method>-<facts>-s<seed>)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "frozen weights' dtype: auto (bf16 on CUDA, fp32 on CPU)", "choices": ["auto", "float32", "bfloat16"]})
    resume: bool = field(default=False, metadata={"help": "continue from --out/state.safetensors"})
    mix_known: str = field(default="", metadata={"help": "JSONL of facts the model already knows, mixed into training (arXiv 2502.14502)"})
    mix_skill: str = field(default="expert", metadata={"help": "JSONL of the skill's own examples mixed in (replay); 'expert': the SVF expert's training data, from its metadata; 'none': no replay (without it every method lost the skill's format: README)"})
    mix_ratio: float = field(default=0.5, metadata={"help": "mixed-in examples per fact, from each --mix-* file"})
    skill_data: str = field(default="", metadata={"help": "palora_act: skill examples whose activations give the input basis (default: the expert's training data)"})
    act_examples: int = field(default=64, metadata={"help": "palora_act: skill examples run to estimate the activation covariance"})
    save_every: int = field(default=25, metadata={"help": "steps between resumable checkpoints"})
    max_len: int = field(default=256, metadata={"help": "longest prompt + answer in tokens"})
    svd_cache: str = field(default="cache/svd", metadata={"help": "folder of cached SVD factors"})


def check_config(cfg: Config) -> dict:
    """Fail before any model is loaded (bad numbers, missing files); returns the probe's rule as palora.select's
    keyword: a threshold or global fraction if one is given, else the per-matrix fraction."""
    for name in ("rank", "alpha", "epochs", "lr", "batch_size", "save_every", "act_examples"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.probe_fraction < 1 or not 0 <= cfg.probe_global_fraction < 1 or cfg.mix_ratio < 0 or (
            cfg.probe_threshold and cfg.probe_global_fraction):
        raise ValueError("want --probe-fraction in (0, 1), --probe-global-fraction in [0, 1) (or a --probe-threshold, "
                         "not both) and --mix-ratio >= 0")
    for path in [cfg.facts, *cfg.svf, cfg.mix_known, cfg.mix_skill.replace("expert", "").replace("none", ""), cfg.skill_data]:
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    if cfg.probe_threshold:
        return {"threshold": cfg.probe_threshold}
    return {"global_fraction": cfg.probe_global_fraction} if cfg.probe_global_fraction else {"fraction": cfg.probe_fraction}

def latest_svf(identity: str, ckpt: str) -> Path:
    """The newest runs/svf-*/svf.safetensors made for this checkpoint."""
    for path in sorted(RUNS.glob("svf-*/svf.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
        if palora.read_tensors(path)[1].get("checkpoint") == identity:
            return path
    raise FileNotFoundError(f"no SVF expert for checkpoint {ckpt} ({identity}) in {RUNS}/svf-*/svf.safetensors: "
                            f"run `python train_svf.py --ckpt {ckpt}` first, or pass --svf FILE")


# -----------------------------------------------------------------------------
# data: facts plus optional mixed-in examples

def skill_examples(path: str) -> list:
    """The skill's examples for replay, checked like train_svf.py checks them (path:line errors)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (skill examples for --mix-skill)")
    records = tasks.read_jsonl(path)
    tasks.check_reasoning(records, path)
    return records

def mixed(records: list, n: int, seed: int) -> list:
    """n records in seeded random order (whole passes over the pool, then part of one)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(records), generator=g) for _ in range(math.ceil(n / len(records)))])
    return [records[i] for i in order[:n].tolist()]

def encode(tokenizer, data: dict, cfg: Config) -> list:
    """(ids, labels), loss on the answer tokens only, through the chat template. A fact longer than --max-len is an
    error (it would silently not be injected); a mixed-in example is skipped and counted."""
    examples, skipped, n_mix = [], 0, round(cfg.mix_ratio * len(data["facts"]))
    for kind in ("facts", "known", "skill"):
        for r in data[kind] if kind == "facts" else mixed(data[kind], n_mix, cfg.seed) if kind in data else []:
            ids, labels = tasks.encode_example(tokenizer, r["question"], r["answer"], cfg.max_len)
            if ids is None and kind == "facts":
                raise tasks.DataError(f"{cfg.facts}:{r['_line']}: question + answer longer than --max-len {cfg.max_len}")
            skipped += ids is None
            examples += [(ids, labels)] if ids else []
    if skipped:
        print(f"skipped {skipped} mixed-in examples longer than --max-len {cfg.max_len}", file=sys.stderr)
    return examples


# -----------------------------------------------------------------------------
# the base (merged expert), the probe, the adapter

def build(model, tokenizer, cfg: Config, svf_paths: list, experts: list, targets: tuple, rule: dict, out: Path):
    """Merge the first expert, probe all of them (S against the BASE weight's SVD, saved as probe.safetensors) and
    put the method's adapter on the targets. The merged W' = U diag(s ⊙ m) Vh keeps the base's singular vectors,
    so S names the same directions in both. Returns (protected, merged expert folder)."""
    names = list(palora.find_targets(model, targets))
    short = set(targets) | {n.rpartition(".")[2] for z in experts for n in z}
    svds = palora.compute_svds(model, tuple(sorted(short)), cache_dir=REPO / cfg.svd_cache)
    palora.add_svf(model, {n: svds[n] for n in experts[0]}, experts[0])
    # The merged HF folder (the adapter's base for peft users) is written once, named by the expert file's hash.
    merged = svf_paths[0].parent / f"merged-{hashlib.sha256(svf_paths[0].read_bytes()).hexdigest()[:8]}"
    if (merged / "model.safetensors").exists():
        palora.merge_svf(model)
    else:
        palora.save_merged_checkpoint(model, model.folder, merged)  # merges (float32, checked), then writes
    protected = palora.probe({n: svds[n] for n in names}, [{n: z[n] for n in names if n in z} for z in experts],
                             cfg.probe_score, **rule)
    palora.save_tensors(protected, out / "probe.safetensors", {
        "format": "palora-probe", "checkpoint": model.identity, "svf": json.dumps([str(p) for p in svf_paths]),
        "score": cfg.probe_score, "selection": json.dumps(rule)})
    bases = None
    if cfg.method == "palora_act":  # V_S (in, k): the top-k directions of the skill's inputs, k = the probe's count
        ids = [tasks.encode_example(tokenizer, r["question"], r["answer"], cfg.max_len)[0]
               for r in mixed(tasks.read_jsonl(cfg.skill_data), cfg.act_examples, cfg.seed)]
        covs = palora.activation_covariances(model, list(protected), lambda: [  # one example per forward: no padding
            model(torch.tensor([x], device=model.lm_head.weight.device)) for x in ids if x])
        bases = palora.activation_bases(covs, {n: len(S) for n, S in protected.items()})
    palora.add_lora(model, cfg.method, cfg.rank, cfg.alpha, svds=palora.expert_svds(svds, experts[0]),
                    protected=protected, targets=targets, input_bases=bases, seed=cfg.seed)
    return protected, merged.resolve()


# -----------------------------------------------------------------------------

def main(cfg: Config) -> dict:
    rule = check_config(cfg)  # then every data file is read and checked, with path:LINE errors, before the model loads
    data = {k: tasks.read_jsonl(p) for k, p in (("facts", cfg.facts), ("known", cfg.mix_known)) if p}
    tasks.check_facts(data["facts"], cfg.facts)  # empty answers, duplicate questions
    if cfg.mix_skill not in ("expert", "none", ""):
        data["skill"] = skill_examples(cfg.mix_skill)
    out = Path(cfg.out) if cfg.out else RUNS / f"inject-{cfg.method}-{Path(cfg.facts).stem}-s{cfg.seed}"
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    model, tokenizer = model_lib.load(cfg.ckpt, device=device, dtype=resolve_dtype(cfg.dtype, device))
    svf_paths = [Path(p) for p in cfg.svf] or [latest_svf(model.identity, cfg.ckpt)]
    loaded = [palora.load_svf(p, model=model) for p in svf_paths]  # another checkpoint's expert fails here, named
    targets = tuple(t.strip() for t in (cfg.targets or loaded[0][1]["targets"]).split(",") if t.strip())
    palora.find_targets(model, targets)  # an unknown target name fails here
    expert_data = str(REPO / loaded[0][1].get("data", "(no 'data' in the SVF expert's metadata)"))
    if cfg.mix_skill == "expert":  # replay the skill the expert was trained on
        cfg.mix_skill, data["skill"] = expert_data, skill_examples(expert_data)
    examples = encode(tokenizer, data, cfg)
    if cfg.method == "palora_act" and not cfg.skill_data:  # the skill's inputs: by default the expert's training data
        cfg.skill_data = expert_data
        check_config(cfg)
    if cfg.resume and not (out / "state.safetensors").exists():
        raise FileNotFoundError(f"{out / 'state.safetensors'}: nothing to resume from")
    out.mkdir(parents=True, exist_ok=True)
    cfg.svf, cfg.targets, cfg.out = [str(p) for p in svf_paths], ",".join(targets), str(out)  # resolved, saved
    save_config(cfg, out / "config.json")
    n_model = sum(p.numel() for p in model.parameters())
    protected, merged = build(model, tokenizer, cfg, svf_paths, [z for z, _ in loaded], targets, rule, out)
    model.requires_grad_(False)
    params = palora.lora_state(model)  # "<weight name>.A" / ".B" -> Parameter, the only trained tensors
    for p in params.values():
        p.requires_grad_(True)
    steps = cfg.epochs * max(1, len(examples) // cfg.batch_size)  # batch_indices' epoch length
    n_trainable = sum(p.numel() for p in params.values())
    print(f"{cfg.method}: {n_trainable:,} trainable parameters, {len(examples)} examples, {steps} steps, "
          f"{sum(len(S) for S in protected.values()):,} components protected by the probe")
    t0 = time.time()
    loss = train(model, tokenizer, params, examples, steps, cfg, out)
    palora.save_peft(model, out, str(merged), {"method": cfg.method, "svf": json.dumps([str(p) for p in svf_paths])})
    summary = {"method": cfg.method, "steps": steps, "examples": len(examples), "final_loss": loss, "trainable": n_trainable,
               "model_parameters": n_model, "share": n_trainable / n_model, "base": str(merged), "wall_s": time.time() - t0}
    tasks.atomic_write_json(out / "summary.json", summary)
    return summary

def train(model, tokenizer, params: dict, examples: list, steps: int, cfg: Config, out: Path) -> float:
    """Adam on A and B. The data order is a function of (seed, step) and the state is saved every --save-every
    steps, so --resume ends with the same adapter as an uninterrupted run. Returns the last loss."""
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    device = model.lm_head.weight.device  # no autocast: LoRALinear runs A, B (float32) in the activations' dtype
    start = load_state(out / "state.safetensors", params, optimizer)[0] if cfg.resume else 0
    restart_metrics(out / "metrics.jsonl", start)
    t0, tokens_seen, loss = time.time(), 0, float("nan")
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc=f"inject {cfg.method}")):
        idx = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
        tokens, labels, mask = (t.to(device) for t in tasks.collate([examples[i] for i in idx], tokenizer.pad_id))
        batch_loss = answer_loss(model, tokens, labels, mask)
        check_finite(batch_loss, step)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        loss, tokens_seen = batch_loss.item(), tokens_seen + int((labels != -100).sum())
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_seen / (time.time() - t0):.0f}")
        tasks.append_jsonl(out / "metrics.jsonl", {"step": step + 1, "loss": loss, "tokens_per_s": tokens_seen / (time.time() - t0)})
        if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            save_state(out / "state.safetensors", params, optimizer, step + 1)
    return loss


if __name__ == "__main__":
    cli.run(main, cli.parse_config(Config, description=__doc__.split("\n\n")[0]))
