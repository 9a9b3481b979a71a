"""Evaluate PALoRA against every baseline in one table: what each model kept of the skill, and what it learned.

Rows: the base checkpoint, the SVF expert, each adapter (inject.py run folder; seeds <name>-s<seed> of one setting
give one row, mean ± sample std). Greedy, batched, KV cache (tasks.answer). Columns: strict and flexible reasoning
accuracy on the skill's held-out set (lm-evaluation-harness's two GSM8K filters); retention = strict / the expert's;
reliability (facts recalled on their trained questions) and generalization (on held-out paraphrases); locality (of
the known facts the base answers, the share still answered); collapse (share of fact answers taken by the 5 most
frequent; gold_collapse: the same for the golds); leak_out ||U_Sᵀ dW|| / ||dW||, leak_in ||dW V_S|| / ||dW|| against
the PALoRA probe's S, worst matrix (all in the JSON): zero by construction for palora only; trainable parameters,
added ones (z, or A and B, stored beside the base) and share = trainable / model.

    python evaluate.py --adapter runs/inject-palora-facts-s0 --adapter runs/inject-lora-facts-s0 --plot
    python evaluate.py --verify runs/inject-palora-facts-s0   # the guarantee from the files alone, in float64
    python evaluate.py --probe-report runs/svf-smollm2_135m-reasoning/svf.safetensors   # where the probe sits
    python evaluate.py --reproduce --plot   # SVF expert if none, 6 methods x 3 seeds, the table: < 60 min, 2 CPU cores
    python evaluate.py --reproduce --n-facts 0 --limit 0 --epochs 0   # the full setting (hours on a CPU)
    python evaluate.py --sweep --plot       # PALoRA's probe fraction and score, injection strength, mixing

--reproduce is scaled down by these defaults: the first --n-facts 40 of the 240 facts, with 20 replayed skill examples, for --epochs 6 (42 steps), and
reasoning scored on the first --limit 100 of 300 items. Outputs in --out (runs/eval, runs/reproduce or runs/sweep):
results.json (rows, per-item predictions, tasks.PROTOCOL, date, machine); with --plot, tradeoff.png and probe.png.
"""
import dataclasses
import json
import math
import os
import platform
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoints
import inject
import cli
import model as model_lib
import palora
import tasks
import train_svf
from training import resolve_device, resolve_dtype

REPO = Path(__file__).resolve().parent
METHODS = ("palora", "topk", "lora", "pissa", "milora", "palora_act")
COLUMNS = ("strict", "flexible", "retention", "reliability", "generalization", "locality", "collapse", "gold_collapse",
           "leak_out", "leak_in", "trainable", "added", "share")
NAN = float("nan")


@dataclass
class Config:
    ckpt: str = field(default="smollm2_135m", metadata={"help": "checkpoint folder or name"})
    svf: str = field(default="", metadata={"help": "SVF expert for its own row (default: the first adapter's, else the newest for --ckpt; 'none': no row)"})
    adapter: list = field(default_factory=list, metadata={"help": "inject.py run folder, one row each"})
    reasoning: str = field(default="data/reasoning/test.jsonl", metadata={"help": "the skill's held-out set"})
    facts: str = field(default="", metadata={"help": "injected facts (default: the first adapter's --facts, else data/facts/facts.jsonl)"})
    known: str = field(default="data/known/known_facts.jsonl", metadata={"help": "facts the base knows, for locality (skipped if missing)"})
    limit: int = field(default=100, metadata={"help": "score the first N reasoning items (0: all)"})
    max_new_tokens: int = field(default=96, metadata={"help": "answer length limit for reasoning"})
    fact_tokens: int = field(default=16, metadata={"help": "answer length limit for facts (scored on the first line)"})
    batch_size: int = field(default=64, metadata={"help": "questions answered at once"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "weights' dtype", "choices": ["auto", "float32", "bfloat16"]})
    out: str = field(default="", metadata={"help": "output folder (default runs/eval, runs/reproduce or runs/sweep)"})
    plot: bool = field(default=False, metadata={"help": "write tradeoff.png and probe.png (needs matplotlib)"})
    verify: str = field(default="", metadata={"help": "RUN_DIR: its adapter against its probe from the files alone, float64; exit 1 if a palora run leaks"})
    probe_report: str = field(default="", metadata={"help": "SVF_FILE: where its probe (|m - 1|, half of each matrix) sits in the spectrum, and its overlap with top-k"})
    tolerance: float = field(default=1e-4, metadata={"help": "--verify: worst leakage allowed for palora (float32 factors' rounding)"})
    reproduce: bool = field(default=False, metadata={"help": "the whole pipeline on --ckpt: SVF expert if none, every method x --seeds, the table"})
    sweep: bool = field(default=False, metadata={"help": "PALoRA variants x --seeds: probe fraction and score, epochs, lr, mixing"})
    seeds: str = field(default="0,1,2", metadata={"help": "--reproduce/--sweep: seeds"})
    n_facts: int = field(default=40, metadata={"help": "--reproduce/--sweep: inject the first N facts (0: all)"})
    epochs: int = field(default=6, metadata={"help": "--reproduce/--sweep: injection epochs (0: inject.py's default)"})
    svd_cache: str = field(default="cache/svd", metadata={"help": "folder of cached SVD factors"})


# -----------------------------------------------------------------------------
# metrics: small pure functions, each pinned by a hand-made case in tests/test_evaluate.py

def top_share(answers: list, k: int = 5) -> float:
    """Share of the answers taken by the k most frequent normalised first lines: k/n when all differ."""
    counts = Counter(tasks.normalize_answer(next((x for x in a.splitlines() if x.strip()), "")) for a in answers)
    return sum(c for _, c in counts.most_common(k)) / len(answers) if answers else NAN

def locality(base_correct: list, now_correct: list) -> float:
    """Of the known facts the base answered correctly, the share still answered correctly."""
    kept = [now for base, now in zip(base_correct, now_correct) if base]
    return sum(kept) / len(kept) if kept else NAN

def leakage_table(layers: dict, svds: dict, protected: dict) -> dict:
    """name -> (||U_Sᵀ dW|| / ||dW||, ||dW V_S|| / ||dW||) in float64, dW = (alpha/r) B A of each LoRALinear,
    U_S (out, k) and V_S (in, k) the base weight's singular vectors at the probe's indices."""
    table = {}
    for name in (n for n in layers if n in protected):
        dW = layers[name].scale * (layers[name].B.double() @ layers[name].A.double())  # (out, r) @ (r, in) -> (out, in)
        table[name] = palora.leakage(dW, *(t.double() for t in palora.protected_bases(svds[name], protected[name])))
    return table

def add_retention(rows: list) -> list:
    """retention = strict accuracy / the SVF expert row's (NaN without an expert, or when it scores 0)."""
    expert = next((r["strict"] for r in rows if r["group"] == "svf"), NAN)
    for r in rows:
        r["retention"] = r["strict"] / expert if expert else NAN
    return rows

def mean(values: list) -> float:
    return sum(values) / len(values) if values else NAN


# -----------------------------------------------------------------------------
# one row: load the model it describes, answer every question set, score

def check_run(run: Path, identity: str) -> dict:
    """The run's config.json; its adapter and probe must be made for this checkpoint (the error names the file)."""
    for name in ("config.json", "summary.json", "adapter_config.json", "adapter_model.safetensors", "probe.safetensors"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name}: missing (is {run} a finished inject.py run?)")
        if name.endswith(".safetensors"):
            palora.read_tensors(run / name, identity)
    return json.loads((run / "config.json").read_text())

def load_row(cfg: Config, svf, run):
    """(model, tokenizer, info): the base checkpoint, the SVF expert merged, the run's adapter loaded. The adapter's
    leakage is measured against the run's probe, then it is merged too (generation as fast as the base's)."""
    device = resolve_device(cfg.device)
    model, tokenizer = model_lib.load(cfg.ckpt, device=device, dtype=resolve_dtype(cfg.dtype, device))
    info, n_model = {"trainable": 0, "added": 0, "leak_out": NAN, "leak_in": NAN}, sum(p.numel() for p in model.parameters())
    protected = palora.read_tensors(run / "probe.safetensors", model.identity)[0] if run else {}
    z = palora.load_svf(svf, model=model)[0] if svf else {}
    short = tuple(sorted({n.rpartition(".")[2] for n in [*z, *protected]}))
    svds = palora.compute_svds(model, short, cache_dir=REPO / cfg.svd_cache) if short else {}
    if z:
        palora.add_svf(model, {n: svds[n] for n in z}, z)
        palora.merge_svf(model)
        info["trainable"] = info["added"] = sum(t.numel() for t in z.values())
    if run:
        layers = palora.load_peft(model, run)
        info["leakage"] = leak = leakage_table(layers, svds, protected)
        info["leak_out"], info["leak_in"] = (max((v[i] for v in leak.values()), default=NAN) for i in (0, 1))
        info["trainable"] = json.loads((run / "summary.json").read_text())["trainable"]
        info["added"] = sum(m.A.numel() + m.B.numel() for m in layers.values())
        s = {n: svd[1] for n, svd in palora.expert_svds(svds, z).items()}  # top-k's choice: the merged expert's largest
        info["spectrum"] = {n: {"R": len(s[n]), "probe": S.tolist(), "topk": torch.argsort(s[n].abs(), descending=True)[
            : len(S)].tolist()} for n, S in protected.items()}
        palora.merge_lora(model)
    return model, tokenizer, {**info, "share": info["trainable"] / n_model}

def score(model, tokenizer, data: dict, cfg: Config):
    """Greedy answers to every question set -> (metrics, predictions, which known facts were right)."""
    pairs = {"facts": [(r["question"], r["answer"]) for r in data["facts"]], "known": [(r["question"], r["answer"]) for r in data["known"]],
             "paraphrases": [(p, r["answer"]) for r in data["facts"] for p in r.get("paraphrases", [])]}
    pred = {k: tasks.answer(model, tokenizer, [q for q, _ in v], cfg.fact_tokens, cfg.batch_size) for k, v in pairs.items()}
    right = {k: [tasks.fact_correct(p, g) for p, (_, g) in zip(pred[k], v)] for k, v in pairs.items()}
    pred["reasoning"] = tasks.answer(model, tokenizer, [r["question"] for r in data["reasoning"]], cfg.max_new_tokens, cfg.batch_size)
    reasoning = [tasks.score_reasoning(p, r["answer"]) for p, r in zip(pred["reasoning"], data["reasoning"])]
    return {"strict": mean([s["strict"] for s in reasoning]), "flexible": mean([s["flexible"] for s in reasoning]),
            "reliability": mean(right["facts"]), "generalization": mean(right["paraphrases"]),
            "collapse": top_share(pred["facts"]), "gold_collapse": top_share([g for _, g in pairs["facts"]])}, pred, right["known"]

def evaluate_rows(cfg: Config, data: dict, svf, runs: list, configs: list) -> list:
    """Rows for the base, the expert (if any) and each run, in that order; locality against the base's answers."""
    entries = [("base", None, None)] + [("svf", svf, None)] * bool(svf) + [
        (re.sub(r"-s\d+$", "", run.name), Path(c["svf"][0]), run) for run, c in zip(runs, configs)]
    rows, base_known = [], None
    for group, svf_path, run in entries:
        t0 = time.time()
        model, tokenizer, info = load_row(cfg, svf_path, run)
        metrics, pred, known = score(model, tokenizer, data, cfg)
        base_known = known if base_known is None else base_known
        rows.append({"name": run.name if run else group, "group": group, **metrics, "locality": locality(base_known, known),
                     **info, "predictions": pred, "seconds": time.time() - t0})
        print(f"{rows[-1]['name']}: strict {metrics['strict']:.3f}, reliability {metrics['reliability']:.3f} ({time.time() - t0:.0f} s)")
    return add_retention(rows)


# -----------------------------------------------------------------------------
# the table, the figures

def aggregate(rows: list) -> list:
    """One row per group (the seeds of one setting): (mean, sample std) of every column."""
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(torch.tensor([float(r.get(c, NAN)) for c in COLUMNS], dtype=torch.float64))
    stats = {g: (torch.stack(v).mean(0), torch.stack(v).std(0) if len(v) > 1 else torch.zeros(len(COLUMNS))) for g, v in groups.items()}
    return [{"group": g, "n": len(groups[g]), **{c: (m[i].item(), s[i].item()) for i, c in enumerate(COLUMNS)}} for g, (m, s) in stats.items()]

def markdown(groups: list) -> str:
    def cell(column, m, s):
        if math.isnan(m) or column in ("trainable", "added"):
            return "-" if math.isnan(m) else f"{m:,.0f}"
        form = ".2e" if column.startswith("leak") else ".3f"
        return (f"{100 * m:.3f}%" if column == "share" else f"{m:{form}}") + (f" ± {s:{form}}" if s > 0 else "")
    lines = ["| model | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    return "\n".join(lines + [f"| {g['group']} | {g['n']} | " + " | ".join(cell(c, *g[c]) for c in COLUMNS) + " |" for g in groups])

def plot(groups: list, spectrum: dict, folder: Path):
    """tradeoff.png: retention against reliability, one point per setting, seeds as error bars. probe.png: for each
    target matrix, where in its spectrum (0 = largest) the probe's protected components sit, and top-k's choice."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib (an optional dependency): pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in groups:
        ax.errorbar(g["retention"][0], g["reliability"][0], xerr=g["retention"][1], yerr=g["reliability"][1], fmt="o", capsize=3, label=g["group"])
    ax.set(xlabel="retention (strict accuracy / SVF expert's)", ylabel="reliability (trained facts recalled)")
    ax.legend(fontsize=7)
    fig.savefig(folder / "tradeoff.png", dpi=150, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(12, 4))  # one column per target matrix, in model order (layer by layer)
    for x, sp in enumerate(spectrum.values()):
        for key, dx, color in (("probe", -0.2, "C0"), ("topk", 0.2, "C3")):
            ax.scatter([x + dx] * len(sp[key]), [i / sp["R"] for i in sp[key]], s=0.5, c=color, label=key if x == 0 else None)
    kinds = "/".join(dict.fromkeys(n.rpartition(".")[2] for n in spectrum))
    ax.set(xlabel=f"target matrix ({kinds}, layer by layer)", ylabel="position in the spectrum (0 = largest)", ylim=(1, 0))
    ax.legend(markerscale=10)
    fig.savefig(folder / "probe.png", dpi=150, bbox_inches="tight")


# -----------------------------------------------------------------------------
# --verify, --reproduce, --sweep

def verify(run: Path, cfg: Config) -> dict:
    """The guarantee from the files alone, in float64: dW from the adapter (projections folded in), U_S and V_S from
    the base checkpoint's SVD (palora.compute_svds, float32 and cached, as in training) at probe.safetensors' indices.
    Every file must name the base checkpoint. A palora run passes when its worst leakage is within --tolerance."""
    run_cfg = json.loads((run / "config.json").read_text())
    model, _ = model_lib.load(run_cfg["ckpt"], device="cpu", dtype=torch.float32)
    check_run(run, model.identity)
    for svf in run_cfg["svf"]:
        palora.load_svf(svf, model=model)  # an expert of another checkpoint fails here, named
    protected = palora.read_tensors(run / "probe.safetensors", model.identity)[0]
    svds = palora.compute_svds(model, tuple({n.rpartition(".")[2] for n in protected}), cache_dir=REPO / cfg.svd_cache)
    leak = leakage_table(palora.load_peft(model, run), svds, protected)
    name = max(leak, key=lambda n: max(leak[n]))
    worst, ok = max(leak[name]), run_cfg["method"] != "palora" or max(leak[name]) <= cfg.tolerance
    print(f"{run}: {run_cfg['method']}, {len(leak)} matrices; worst leakage {worst:.3e} at {name} (U side "
          f"{leak[name][0]:.3e}, V side {leak[name][1]:.3e}): {'OK' if ok else 'FAILED'} (palora tolerance {cfg.tolerance:g})")
    return {"run": str(run), "method": run_cfg["method"], "worst": worst, "leakage": leak, "ok": ok}

def report_probe(svf: Path, cfg: Config) -> dict:
    """The probe of one expert (score |m - 1|, half of each matrix protected): per matrix kind, the shares of the
    protected components in the top, middle and bottom thirds of the spectrum, and the share top-k would also pick."""
    model, _ = model_lib.load(cfg.ckpt, device="cpu", dtype=torch.float32)
    z = palora.load_svf(svf, model=model)[0]
    svds = palora.compute_svds(model, tuple({n.rpartition(".")[2] for n in z}), cache_dir=REPO / cfg.svd_cache)
    protected = palora.probe(svds, z, fraction=0.5)
    rows, merged = palora.probe_report(protected, svds), palora.expert_svds(svds, z)
    for r in rows:  # top-k's choice: the merged expert's len(S) largest singular values
        topk = set(torch.argsort(merged[r["name"]][1].abs(), descending=True)[: r["count"]].tolist())
        r["topk_overlap"] = len(topk & set(protected[r["name"]].tolist())) / max(r["count"], 1)
    print("| matrices | top third | middle third | bottom third | mean position | shared with top-k |\n|---|---|---|---|---|---|")
    for kind in [*dict.fromkeys(r["matrix"] for r in rows), "all"]:
        sel = [r for r in rows if kind in ("all", r["matrix"])]
        print(f"| {kind} ({len(sel)}) | " + " | ".join(f"{mean([r[k] for r in sel]):.3f}" for k in
                                                      ("top", "middle", "bottom", "mean_pos", "topk_overlap")) + " |")
    m = torch.cat([palora.multiplier(svds[n][1], z[n].to(svds[n][1])) for n in z])
    print(f"multipliers m = z·c over {len(m):,} components: {m.min():.3f} to {m.max():.3f}, median |m - 1| {(m - 1).abs().median():.4f}")
    return {"rows": rows}

def sweep_variants(cfg: Config) -> dict:
    """name -> inject.Config overrides for PALoRA on the same facts, rank and seeds."""
    epochs, lr = cfg.epochs or inject.Config.epochs, inject.Config.lr
    return {**{f"fraction-{f}": {"probe_fraction": f} for f in (0.25, 0.5, 0.75, 0.9)}, "global-0.5": {"probe_global_fraction": 0.5},
            "energy": {"probe_score": "energy"}, f"epochs-{epochs // 2}": {"epochs": max(1, epochs // 2)}, f"epochs-{2 * epochs}":
            {"epochs": 2 * epochs}, f"lr-{lr / 3:.0e}": {"lr": lr / 3}, f"lr-{lr * 3:.0e}": {"lr": lr * 3},
            "mix-known": {"mix_known": cfg.known}, "no-replay": {"mix_skill": "none"}}

def pipeline(cfg: Config, identity: str) -> tuple:
    """Train the SVF expert if there is none, then every method (--reproduce) or PALoRA variant (--sweep) x seed, on
    the same facts, in-process. A run folder holding an adapter is reused and a half-done one resumed, so an
    interrupted pipeline continues where it stopped. Returns (svf, run folders)."""
    try:
        svf = Path(cfg.svf) if cfg.svf else inject.latest_svf(identity, cfg.ckpt)
    except FileNotFoundError:
        train_svf.main(train_svf.Config(ckpt=cfg.ckpt, eval_every=0))
        svf = inject.latest_svf(identity, cfg.ckpt)
    facts, folder = Path(cfg.facts or inject.Config.facts), Path(cfg.out)
    if cfg.n_facts:  # the same subset for every run, kept beside them
        tasks.atomic_write_text(folder / "facts.jsonl", "".join(facts.read_text().splitlines(True)[: cfg.n_facts]))
        facts = cfg.facts = folder / "facts.jsonl"
    settings = {"ckpt": cfg.ckpt, "svf": [str(svf)], "facts": str(facts), "device": cfg.device, "svd_cache": cfg.svd_cache,
                **({"epochs": cfg.epochs} if cfg.epochs else {})}
    runs = []
    for seed in [int(s) for s in cfg.seeds.split(",")]:
        for name, overrides in (sweep_variants(cfg) if cfg.sweep else {m: {"method": m} for m in METHODS}).items():
            runs.append(out := folder / f"{name}-s{seed}")
            if not (out / "adapter_model.safetensors").exists():
                inject.main(inject.Config(**{**settings, "seed": seed, "out": str(out), "resume": (out / "state.safetensors").exists(), **overrides}))
    return svf, runs

def main(cfg: Config) -> dict:
    if cfg.verify:
        return verify(Path(cfg.verify), cfg)
    if cfg.probe_report:
        return report_probe(Path(cfg.probe_report), cfg)
    cfg.out = cfg.out or str(REPO / "runs" / ("sweep" if cfg.sweep else "reproduce" if cfg.reproduce else "eval"))
    identity = checkpoints.identity(checkpoints.resolve(cfg.ckpt))
    svf, runs = pipeline(cfg, identity) if cfg.reproduce or cfg.sweep else (None, [Path(a) for a in cfg.adapter])
    configs = [check_run(run, identity) for run in runs]  # every adapter and probe checked before any scoring
    if not svf and cfg.svf != "none":
        svf = Path(cfg.svf) if cfg.svf else Path(configs[0]["svf"][0]) if configs else None
    facts = str(cfg.facts or (configs[0]["facts"] if configs else inject.Config.facts))
    data = {"reasoning": tasks.read_jsonl(cfg.reasoning)[: cfg.limit or None], "facts": tasks.read_jsonl(facts),
            "known": tasks.read_jsonl(cfg.known) if Path(cfg.known).is_file() else []}
    tasks.check_reasoning(data["reasoning"], cfg.reasoning)
    tasks.check_facts(data["facts"], facts)
    if not data["known"]:
        print(f"{cfg.known}: not found, locality is not measured")
    rows = evaluate_rows(cfg, data, svf, runs, configs)
    groups, spectrum = aggregate(rows), next((r["spectrum"] for r in rows if "spectrum" in r), {})
    table = markdown(groups)
    print(table)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    tasks.atomic_write_json(Path(cfg.out) / "results.json", {
        "protocol": tasks.PROTOCOL, "config": {**dataclasses.asdict(cfg), "facts": facts}, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "table": table, "groups": groups, "rows": [{k: v for k, v in r.items() if k != "spectrum"} for r in rows]})
    if cfg.plot:
        plot(groups, spectrum, Path(cfg.out))
    return {"rows": rows, "groups": groups, "table": table, "ok": True}


if __name__ == "__main__":
    raise SystemExit(0 if cli.run(main, cli.parse_config(Config, description=__doc__.split("\n\n")[0])).get("ok", True) else 1)
