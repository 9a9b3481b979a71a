"""The whole comparison in one command: the SVF expert (reused if one exists for --ckpt), each
method x seed injected on the same facts with the same rank, replay and stopping rule (imsm and smf
too: adapters.METHODS), then evaluate.py's table with paired intervals. The only script that runs
the others.

    python reproduce.py                          # every method x seeds 0,1,2, then the table
    python reproduce.py --methods palora,lora --seeds 0
    python reproduce.py --methods palora,imsm,smf       # the other answers: siamese, memory layers
    python reproduce.py --sweep all          # PALoRA's settings: lr, recall target, replay, probe
    python reproduce.py --sweep fraction-0.1,fraction-0.9 --seeds 0   # some of them
    python reproduce.py --frontier --seeds 2   # retention against reliability, epoch by epoch
    python reproduce.py --stream 5 --n-facts 40   # 5 rounds of 40 new facts, each merged in

Runs live in --out as <setting>-s<seed>/. A finished run whose config.json matches is reused, a
half-done one resumed, and one made with other settings refused (inject.py's run-folder guard): a
killed reproduction continues where it stopped, and `python evaluate.py --adapter ...` on the
finished folders prints a partial table at any time. The table: --out/eval/results.json (--sweep:
--out/sweep/, --frontier: --out/frontier/, --stream: --out/stream/).

--frontier: each run keeps its epochs (inject.py --keep-epochs) and every epoch is scored, so that a
method is judged by its curve, retention against reliability as training goes on, not by the one
point where it stopped: --out/frontier/ holds frontier.md (retention interpolated at reliability
0.5, 0.7 and 0.9, mean ± std over seeds), frontier.json and, with --plot, frontier.png.

--stream K: a continual stream, K rounds of --n-facts new facts (the next lines of --facts). Round 1
is the comparison's run <method>-s<seed>; round k (--out/stream/<method>-r<k>-s<seed>) trains on
round k-1's merged model (inject.py --after), the probe staying the expert's. Every round is scored
on all K rounds' facts: --out/stream/stream.md and .json hold, per method and round, the skill's
retention, the recall of this round's facts and of the earlier rounds' (the later rounds', never
trained, are the floor) and locality; --plot adds stream.png.
"""

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

import adapters
import checkpoints
import cli
import evaluate
import inject
import tasks
import train_svf
from training import check_context, parse_targets, refuse_inputs, resolve_device

REPO = Path(__file__).resolve().parent
NAN = float("nan")
# The comparison's settings where inject.py's defaults moved on since (2026-12-07: many facts): the
# 2026-12-01 table and stream reproduce with them.
COMPARISON = {
    "batch_size": 8,
    "mix_skill": "expert",
    "schedule": "constant",
    "act_earlier": 0,
    "mix_earlier": 0.0,
}
UNSET = {"targets": "", "mix_skill": "expert", "skill_data": "", "act_known": "auto"}  # resolved


@dataclass
class Config:
    ckpt: str = field(default=checkpoints.DEFAULT, metadata={"help": "checkpoint folder or name"})
    svf: str = field(
        default="", metadata={"help": "SVF expert (default: the newest, or train one)"}
    )
    facts: str = field(default=inject.Config.facts, metadata={"help": "facts JSONL to inject"})
    n_facts: int = field(default=100, metadata={"help": "the first N facts (0: all)", "ge": 0})
    methods: str = field(default=",".join(adapters.METHODS), metadata={"help": "comma-separated"})
    seeds: str = field(default="0,1,2", metadata={"help": "comma-separated seeds"})
    sweep: str = field(
        default="",
        metadata={
            "help": "PALoRA's settings instead of the methods: names of sweep_variants, or all"
        },
    )
    lr: float = field(default=5e-3, metadata={"help": "every run's lr (the comparison's)", "gt": 0})
    recall_target: float = field(
        default=0.9,
        metadata={"help": "every run stops at this recall (0: runs --epochs)", "ge": 0, "le": 1},
    )
    epochs: int = field(
        default=inject.Config.epochs, metadata={"help": "every run's most epochs", "ge": 1}
    )
    smf_lr: float = field(
        default=2.0,
        metadata={"help": "smf's lr (SparseAdam on memory values: 5e-3 learns nothing)", "gt": 0},
    )
    mix_known: str = field(
        default="", metadata={"help": "known facts mixed into every run ('': none)"}
    )
    frontier: bool = field(
        default=False, metadata={"help": "score every epoch of every run: retention vs reliability"}
    )
    every: int = field(
        default=1, metadata={"help": "--frontier: score every N-th epoch (and the last)", "ge": 1}
    )
    limit: int = field(
        default=0, metadata={"help": "reasoning items scored per split (0: all)", "ge": 0}
    )
    reasoning: str = field(default=evaluate.Config.reasoning, metadata={"help": "in-template set"})
    reasoning_ood: str = field(
        default=evaluate.Config.reasoning_ood, metadata={"help": "held-out-template set"}
    )
    known: str = field(default=evaluate.Config.known, metadata={"help": "known facts (locality)"})
    max_new_tokens: int = field(
        default=evaluate.Config.max_new_tokens,
        metadata={"help": "reasoning answer length", "ge": 1},
    )
    out: str = field(default="runs/reproduce", metadata={"help": "output folder"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    stream: int = field(
        default=0,
        metadata={"help": "rounds of --n-facts new facts, each on the last (0: off)", "ge": 0},
    )
    plot: bool = field(default=False, metadata={"help": "tradeoff.png and probe.png"})


def sweep_variants(lr: float) -> dict:
    """name -> inject.Config overrides for PALoRA (the paper's method, whatever inject.py's default)
    on the same facts, rank and seeds; "palora" is the comparison's own run, every variant's
    reference."""
    variants = {
        "lr-x0.5": {"lr": lr / 2},
        "lr-x2": {"lr": lr * 2},
        "target-0.7": {"recall_target": 0.7},
        "target-1.0": {"recall_target": 1.0},
        "replay-0": {"mix_skill": "none"},
        "replay-1.0": {"mix_ratio": 1.0},
        **{f"fraction-{f}": {"probe_fraction": f} for f in (0.1, 0.25, 0.75, 0.9)},
        "energy": {"probe_score": "energy"},
        "global-0.5": {"probe_global_fraction": 0.5},
        "mix-known": {"mix_known": "data/known/known_mix.jsonl"},
        "rank-16": {"rank": 16, "alpha": 32.0},
    }
    return {name: {"method": "palora", **v} for name, v in {"palora": {}, **variants}.items()}


def expert(cfg: Config, identity: str) -> Path:
    """The SVF expert: --svf, else the newest for the checkpoint, else one trained now."""
    if cfg.svf:
        return Path(cfg.svf)
    try:
        return inject.latest_svf(identity, cfg.ckpt)
    except FileNotFoundError:
        train_svf.main(train_svf.Config(ckpt=cfg.ckpt, eval_every=0, device=cfg.device))
        return inject.latest_svf(identity, cfg.ckpt)


def same_run(out: Path, run: inject.Config):
    """A finished run is reused only if its config.json records every setting of `run` (today's
    defaults included), but for where it ran and the fields inject.py fills in when left unset. A
    setting missing from the file (an option added since) counts as its default; the expert is
    the same file however its path is written."""
    saved = {**dataclasses.asdict(inject.Config(facts="")), **adapters.run_config(out)}
    want = dataclasses.asdict(run)
    for config in (saved, want):
        config["svf"] = [str(Path(p).resolve()) for p in config["svf"]]
    for k in ("out", "resume", "overwrite", "device", "keep_epochs"):
        del want[k]
    for k, unset in UNSET.items():
        if want[k] == unset:
            del want[k]
    differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in want.items() if saved.get(k) != v]
    if differ:
        raise cli.ConfigError(
            f"{out}: a finished run with other settings ({', '.join(differ)}); "
            f"move it away or use another --out"
        )


def inject_one(cfg: Config, svf: Path, facts: Path, seed: int, out: Path, overrides: dict):
    """One run at the comparison's settings: reused when finished with the same config, else
    (re)run, resumed where it stopped."""
    run = inject.Config(
        ckpt=cfg.ckpt,
        svf=[str(svf)],
        facts=str(facts),
        seed=seed,
        out=str(out),
        device=cfg.device,
        keep_epochs=cfg.frontier,
        **{
            **COMPARISON,
            "lr": cfg.lr,
            "mix_known": cfg.mix_known,
            "recall_target": cfg.recall_target,
            "epochs": cfg.epochs,
            **overrides,
        },
    )
    if (out / "summary.json").exists():  # inject.py's last write: a finished run
        same_run(out, run)
        if cfg.frontier and not (out / "epochs").is_dir():
            raise cli.ConfigError(
                f"{out}: finished without --keep-epochs, so it has no frontier; move it "
                f"away or use another --out"
            )
        return
    state = (out / "state.safetensors").exists()
    inject.main(dataclasses.replace(run, resume=state, overwrite=not state))


def inject_all(cfg: Config, svf: Path, facts: Path) -> list[Path]:
    """Every (setting, seed) run."""
    settings = {m: {"method": m} for m in parse_targets(cfg.methods)}
    if "smf" in settings:  # its own lr: docs/results.md, "SMF at a learning rate of its own"
        settings["smf"]["lr"] = cfg.smf_lr
    if cfg.sweep:
        variants = sweep_variants(cfg.lr)
        names = list(variants) if cfg.sweep == "all" else ["palora", *parse_targets(cfg.sweep)]
        settings = {name: variants[name] for name in names}
    runs = []
    for seed in seeds(cfg):
        for name, overrides in settings.items():
            runs.append(Path(cfg.out) / f"{name}-s{seed}")
            inject_one(cfg, svf, facts, seed, runs[-1], overrides)
    return runs


def seeds(cfg: Config) -> list[int]:
    """--seeds '0,1,2' -> [0, 1, 2]; each an integer in [0, cli.INT_MAX], as inject.py's --seed."""
    try:
        values = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise cli.ConfigError(f"--seeds: comma-separated integers, got {cfg.seeds!r}") from None
    bad = [s for s in values if not 0 <= s <= cli.INT_MAX]
    if bad:
        raise cli.ConfigError(f"--seeds: each in [0, {cli.INT_MAX}], got {bad[0]}")
    return values


def check_config(cfg: Config):
    """The flags that can be wrong, refused before any training (a sweep never on the locked
    confirmation files)."""
    seeds(cfg)  # refused now, not after the expert is trained
    for name in parse_targets(cfg.methods):
        if name not in adapters.METHODS:
            raise cli.ConfigError(f"--methods: unknown method {name!r}")
    for name in parse_targets(cfg.sweep) if cfg.sweep not in ("", "all") else []:
        if name not in sweep_variants(cfg.lr):
            raise cli.ConfigError(
                f"--sweep: unknown setting {name!r}: all, or some of "
                f"{', '.join(sweep_variants(cfg.lr))}"
            )
    locked = [p for p in (cfg.facts, cfg.reasoning, cfg.reasoning_ood, cfg.known, cfg.mix_known)]
    locked = [p for p in locked if Path(p).name in tasks.LOCKED]
    if cfg.sweep and locked:  # a sweep chooses: never on the confirmation files
        raise cli.ConfigError(f"--sweep: {locked[0]} is a locked confirmation file (tasks.LOCKED)")
    if cfg.plot:  # before hours of training, not after
        evaluate.pyplot()
    if cfg.stream and (cfg.frontier or cfg.sweep or not cfg.n_facts):
        raise cli.ConfigError("--stream: rounds of --n-facts N > 0, without --frontier or --sweep")


MARK = "reproduce.json"  # the config of the last reproduce.py run in a folder: this is its folder


def claim(folder: Path, cfg: Config):
    """--out is empty, new, or reproduce.py's own (it holds MARK): its files (facts.jsonl, the runs,
    eval/) are never written into a folder of the user's. Then MARK is (re)written."""
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if held and MARK not in held:
        raise cli.ConfigError(
            f"--out {folder}: holds {held[0]}, and no {MARK}: not a reproduce.py folder "
            f"(pick a new or empty one)"
        )
    tasks.atomic_write_json(folder / MARK, dataclasses.asdict(cfg))


def main(cfg: Config) -> dict:
    check_config(cfg)
    folder = Path(cfg.out)
    ckpt = checkpoints.resolve(cfg.ckpt)
    resolve_device(cfg.device)  # refused now, not when the first run starts
    check_context(ckpt, {"--max-new-tokens": cfg.max_new_tokens})  # not after hours of training
    # its facts.jsonl and stream/ files are written in --out: never over a file this run reads
    reads = [ckpt, cfg.svf, cfg.facts, cfg.mix_known, cfg.reasoning, cfg.reasoning_ood, cfg.known]
    refuse_inputs(folder, reads)
    identity = checkpoints.identity(ckpt)
    facts = Path(cfg.facts)
    lines = facts.read_text().splitlines(True)
    if len(lines) < cfg.n_facts * cfg.stream:
        raise cli.ConfigError(
            f"{facts}: {len(lines)} facts, fewer than --n-facts {cfg.n_facts} x {cfg.stream} rounds"
        )
    claim(folder, cfg)  # the last check: from here on the folder is this script's
    if cfg.n_facts:  # the same subset for every run, kept beside them
        facts = folder / "facts.jsonl"
        tasks.atomic_write_text(facts, "".join(lines[: cfg.n_facts]))
    svf = expert(cfg, identity)
    if cfg.stream:
        runs, facts = stream_runs(cfg, svf, facts, lines)
    else:
        runs = inject_all(cfg, svf, facts)
    return score(cfg, svf, runs, facts)


def score(cfg: Config, svf: Path, runs: list, facts: Path) -> dict:
    """evaluate.py's table of the runs (every kept epoch with --frontier), then the frontier or
    the stream's table."""
    folder = Path(cfg.out)
    scoring = {
        k: getattr(cfg, k)
        for k in (
            "limit",
            "reasoning",
            "reasoning_ood",
            "known",
            "max_new_tokens",
            "device",
            "plot",
        )
    }
    kind = "frontier" if cfg.frontier else "stream" if cfg.stream else "sweep" if cfg.sweep else ""
    eval_folder = folder / (kind or "eval")
    if cfg.frontier:  # every epoch a row (every N-th, and the last)
        epochs = [sorted((run / "epochs").iterdir()) for run in runs]
        runs = [
            e for run in epochs for i, e in enumerate(run, 1) if i % cfg.every == 0 or e == run[-1]
        ]
    result = evaluate.main(
        evaluate.Config(
            ckpt=cfg.ckpt,
            svf=str(svf),
            adapter=[str(r) for r in runs],
            facts=str(facts),
            out=str(eval_folder),
            score_cache=str(folder / "eval" / "scores"),  # a seed or row added costs only itself
            **{**scoring, "plot": cfg.plot and not (cfg.frontier or cfg.stream)},
        )
    )
    if cfg.frontier:
        result["frontier"] = frontier(result["rows"], eval_folder, cfg.plot)
    if cfg.stream:
        rounds = (cfg.stream, cfg.n_facts)
        result["stream"] = stream_table(result["rows"], *rounds, eval_folder, cfg.plot)
    return result


# -----------------------------------------------------------------------------
# --frontier: retention against reliability, epoch by epoch

LEVELS = (0.5, 0.7, 0.9)


def at_level(xs: list, ys: list, level: float) -> float:
    """y where x first reaches level along the path (x_i, y_i), linearly interpolated between the
    points around the crossing; NaN if x never reaches it."""
    for i, x in enumerate(xs):
        if x >= level:
            if i == 0 or x == xs[i - 1]:
                return ys[i]
            t = (level - xs[i - 1]) / (x - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return float("nan")


def frontier(rows: list, folder: Path, plot: bool) -> dict:
    """Per run its path from the expert (reliability 0, retention 1) epoch by epoch; per method the
    retention (both splits) at each reliability level, mean ± std over seeds."""
    expert = next(r for r in rows if r["group"] == "svf")
    paths = {}
    for r in rows:
        epoch = re.fullmatch(r"(.+-s\d+)-e\d+", r["name"])  # inject.py's names, in epoch order
        if epoch:
            paths.setdefault(epoch[1], [expert]).append(r)
    table = {}
    for run, path in paths.items():
        method = run.rpartition("-s")[0]
        xs = [r["reliability"] for r in path]
        for split in ("retention_ood", "retention"):
            for level in LEVELS:
                value = at_level(xs, [r[split] for r in path], level)
                table.setdefault(method, {}).setdefault(f"{split}@{level}", []).append(value)
    lines = ["| method | seeds | " + " | ".join(next(iter(table.values()))) + " |"]
    lines.append("|---" * (len(lines[0].split("|")) - 2) + "|")
    for method, cells in table.items():
        text = []
        for values in cells.values():
            t = torch.tensor(values, dtype=torch.float64)
            text.append(
                evaluate.cell("retention", t.mean().item(), t.std().item() if len(t) > 1 else 0)
            )
        lines.append(f"| {method} | {len(values)} | " + " | ".join(text) + " |")
    markdown = "\n".join(lines)
    print(markdown)
    points = {
        run: [
            {k: r[k] for k in ("name", "reliability", "retention", "retention_ood")} for r in path
        ]
        for run, path in paths.items()
    }
    tasks.atomic_write_text(folder / "frontier.md", markdown + "\n")
    tasks.atomic_write_json(folder / "frontier.json", {"table": table, "paths": points})
    if plot:
        plot_frontier(paths, folder)
    return {"table": table, "paths": points, "markdown": markdown}


def plot_frontier(paths: dict, folder: Path):
    """frontier.png: retention on the held-out templates against reliability, a curve per run."""
    plt = evaluate.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = {}
    for run, path in paths.items():
        method = run.rpartition("-s")[0]
        label = None if method in colors else method  # one legend entry per method
        color = colors.setdefault(method, f"C{len(colors)}")
        xs, ys = [r["reliability"] for r in path], [r["retention_ood"] for r in path]
        ax.plot(xs, ys, "o-", color=color, markersize=3, label=label)
    ax.set(
        xlabel="reliability (trained facts recalled)",
        ylabel="retention, held-out templates (strict / expert's)",
    )
    ax.legend(fontsize=7)
    tasks.atomic_write_figure(fig, folder / "frontier.png")


# -----------------------------------------------------------------------------
# --stream: rounds of new facts, each injected on the last round's merged model


def stream_runs(cfg: Config, svf: Path, first: Path, lines: list) -> tuple[list, Path]:
    """Round 1 is the comparison's run; round k trains --after round k-1 on the next --n-facts
    lines. -> (every round's run, the file of all rounds' facts, in order: what is scored)."""
    folder, n = Path(cfg.out) / "stream", cfg.n_facts
    files = [first] + [folder / f"facts-r{k}.jsonl" for k in range(2, cfg.stream + 1)]
    for k, path in enumerate(files[1:], 2):
        tasks.atomic_write_text(path, "".join(lines[(k - 1) * n : k * n]))
    every = folder / "facts-all.jsonl"
    tasks.atomic_write_text(every, "".join(lines[: cfg.stream * n]))
    runs = []
    for seed in seeds(cfg):
        for method in parse_targets(cfg.methods):
            after = ""
            outs = [Path(cfg.out) / f"{method}-s{seed}"]
            outs += [folder / f"{method}-r{k}-s{seed}" for k in range(2, cfg.stream + 1)]
            for facts, out in zip(files, outs):
                inject_one(cfg, svf, facts, seed, out, {"method": method, "after": after})
                after = str(out)
            runs += outs
    return runs, every


STREAM_COLUMNS = ("retention_ood", "retention", "this", "earlier", "first", "later", "locality")


def stream_table(rows: list, rounds: int, n: int, folder: Path, plot: bool) -> dict:
    """Per method and round, mean ± std over seeds: retention (both splits), recall of this
    round's facts, of every earlier round's, of round 1's, of the later rounds' (never trained: the
    floor), locality; recall[k][j] of round j's facts after round k in stream.json."""
    cells = {}
    for r in rows:
        name = re.fullmatch(r"(.+?)(?:-r(\d+))?-s\d+", r["name"])
        if r["group"] == "svf":
            method, k = "expert", 0
        elif name:
            method, k = name[1], int(name[2] or 1)
        else:
            continue  # the base model
        ok = r["items"]["facts_ok"]
        recall = [evaluate.mean(ok[j * n : (j + 1) * n]) for j in range(rounds)]
        values = {
            "retention_ood": r["retention_ood"],
            "retention": r["retention"],
            "this": recall[k - 1] if k else NAN,
            "earlier": evaluate.mean(ok[: (k - 1) * n]) if k > 1 else NAN,
            "first": recall[0],
            "later": evaluate.mean(ok[k * n :]),
            "locality": r["locality"],
            "recall": recall,
        }
        cells.setdefault(method, {}).setdefault(k, []).append(values)
    header = "| method | round | seeds | " + " | ".join(STREAM_COLUMNS) + " |"
    lines = [header, "|---" * (len(STREAM_COLUMNS) + 3) + "|"]
    table = {}
    for method, by_round in cells.items():
        for k, seeds in sorted(by_round.items()):
            stats = {}
            for c in STREAM_COLUMNS:
                t = torch.tensor([v[c] for v in seeds], dtype=torch.float64)
                stats[c] = (t.mean().item(), t.std().item() if len(t) > 1 else 0.0)
            stats["recall"] = torch.tensor([v["recall"] for v in seeds]).mean(0).tolist()
            table.setdefault(method, {})[k] = stats
            text = " | ".join(evaluate.cell(c, *stats[c]) for c in STREAM_COLUMNS)
            lines.append(f"| {method} | {k} | {len(seeds)} | {text} |")
    markdown = "\n".join(lines)
    print(markdown)
    tasks.atomic_write_text(folder / "stream.md", markdown + "\n")
    tasks.atomic_write_json(folder / "stream.json", {"rounds": rounds, "facts": n, "table": table})
    if plot:
        plot_stream(table, folder)
    return {"table": table, "markdown": markdown}


def plot_stream(table: dict, folder: Path):
    """stream.png: one panel per metric, rounds on the x axis, a line per method (from the expert,
    round 0, where the metric has a value there)."""
    plt = evaluate.pyplot()
    panels = {
        "retention_ood": "retention, held-out templates",
        "this": "recall of this round's facts",
        "first": "recall of round 1's facts",
        "locality": "locality (known facts kept)",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    expert = table.get("expert", {}).get(0, {})
    for ax, (column, title) in zip(axes, panels.items()):
        for method, by_round in table.items():
            if method == "expert":
                continue
            points = {0: expert[column][0]} if expert and math.isfinite(expert[column][0]) else {}
            points.update({k: v[column][0] for k, v in by_round.items()})
            ax.plot(list(points), list(points.values()), "o-", markersize=3, label=method)
        ax.set(title=title, xlabel="round")
    axes[0].legend(fontsize=7)
    tasks.atomic_write_figure(fig, folder / "stream.png")


if __name__ == "__main__":
    cli.run(main, cli.parse_config(Config, description=__doc__.split("\n\n")[0]))
