"""Benchmark palora.py on the default checkpoint: the costs docs/performance.md quotes, as ratios.

1. an SVF training step in factored form (palora.SVFLinear: y = ((x Vhᵀ) ⊙ s ⊙ m) Uᵀ) against
   rebuilding W' = U diag(s ⊙ m) Vh for every target at every step, as Transformer²'s code does;
   time and peak memory. Goal: factored >= 1.5x faster, lower peak memory.
2. a PALoRA step (palora.LoRALinear with the projections, half of each spectrum protected) against
   a plain LoRA step of the same rank. Goal: PALoRA at most 5% slower.
3. the one-off SVD of all targets (seconds), and loading it back from the cache (adapters.svds,
   checksums verified).

Peak resident memory (/proc VmHWM, reset after set-up): each mode in a subprocess of its own. Speed
ratios: the two models of a pair in one process, their steps alternating after a warm-up step,
median of --steps each, so that load from other processes on a shared machine hits both alike. The
rebuilt mode keeps only U, s, Vh, z (Transformer²'s code also keeps W), so its measured memory is a
lower bound on that code's.

Run:
    python benchmarks/bench_palora.py                          # smollm2_135m, CPU, a few minutes
    python benchmarks/bench_palora.py --ckpt path/to/hf_folder --batch 2 --seq 32 --steps 3
"""

import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import adapters  # noqa: E402
import checkpoints  # noqa: E402
import model as model_lib  # noqa: E402
import palora  # noqa: E402
from cli import parse_config  # noqa: E402

MODES = ("svf", "svf_rebuild", "lora", "palora")


@dataclass
class Config:
    ckpt: str = field(default="smollm2_135m", metadata={"help": "checkpoint folder or name"})
    batch: int = field(default=8, metadata={"help": "sequences per step"})
    seq: int = field(default=128, metadata={"help": "tokens per sequence"})
    steps: int = field(
        default=5, metadata={"help": "timed steps per mode (after one warm-up step)"}
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank r (alpha = 2r)"})
    protect: float = field(
        default=0.5, metadata={"help": "PALoRA: fraction of each spectrum protected"}
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    seed: int = field(default=0, metadata={"help": "seed for tokens, z and A"})
    svd: bool = field(
        default=True,
        metadata={"help": "time the one-off SVD into an empty cache (minutes on a CPU)"},
    )
    svd_cache: str = field(
        default=adapters.SVD_CACHE,
        metadata={"help": "folder of cached SVD factors, filled before any timing"},
    )
    mode: str = field(
        default="", metadata={"help": "internal: run one mode and print its JSON row"}
    )


class RebuildSVF(nn.Module):
    """Transformer²'s way, for comparison only: W' = U diag(s ⊙ m) Vh rebuilt (out, in) at every
    forward."""

    def __init__(self, layer: palora.SVFLinear):
        super().__init__()
        self.U, self.s, self.Vh, self.z = layer.U, layer.s, layer.Vh, layer.z

    def forward(self, x):
        W = palora.svf_weight(self.U, self.s, self.Vh, self.z)  # (out, in)
        return F.linear(x, W)  # (..., in) @ (in, out)


def rss_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset_peak) of this process, from /proc (Linux)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    line = next(x for x in lines if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak():
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0): the peak then measures training, not
    loading."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def target_svds(cfg: Config, model, cache) -> dict:
    """adapters.svds of the default targets, cached in `cache` under the checkpoint's identity."""
    identity = checkpoints.identity(checkpoints.resolve(cfg.ckpt))
    return adapters.svds(model, palora.MLP_TARGETS, identity, cache)


def setup(cfg: Config, mode: str):
    """The model with `mode`'s layers in, its optimizer over the trainable tensors, and their
    count."""
    model, _ = model_lib.load(cfg.ckpt)
    for p in model.parameters():
        p.requires_grad_(False)
    svds = target_svds(cfg, model, cfg.svd_cache)  # filled by main() before any timing
    if mode in ("svf", "svf_rebuild"):
        params = list(palora.add_svf(model, svds).values())
        if mode == "svf_rebuild":
            layers = [(n, m) for n, m in model.named_modules() if isinstance(m, palora.SVFLinear)]
            for name, layer in layers:
                palora.replace(model, name, RebuildSVF(layer))
    else:
        g = torch.Generator().manual_seed(cfg.seed)  # a stand-in expert: z = exp(N(0, 0.1))
        expert = {
            n: torch.exp(0.1 * torch.randn(len(s), generator=g)) for n, (_, s, _) in svds.items()
        }
        protected = None
        if mode == "palora":
            protected = palora.probe(svds, [expert], ("fraction", cfg.protect))
        _, params = adapters.attach(
            model, mode, cfg.rank, 2.0 * cfg.rank, cfg.seed, svds, protected
        )
        params = list(params.values())
    for p in params:
        p.requires_grad_(True)
    return model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def step(model, optimizer, tokens) -> float:
    """One training step's seconds: next-token cross-entropy on random tokens, backward, AdamW."""
    t0 = time.perf_counter()
    logits = model(tokens[:, :-1])  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def run_mode(cfg: Config) -> dict:
    """In a subprocess of its own: peak resident memory of one mode (and its step time,
    unpaired)."""
    torch.set_num_threads(cfg.threads)
    model, optimizer, trainable = setup(cfg, cfg.mode)
    tokens = random_tokens(cfg, model.args.vocab_size)
    reset_peak()
    setup_mib = rss_mib("VmRSS")
    times = [step(model, optimizer, tokens) for _ in range(2)]
    return {
        "mode": cfg.mode,
        "step_s": times[-1],
        "setup_mib": setup_mib,
        "peak_mib": rss_mib("VmHWM"),
        "trainable": trainable,
    }


def random_tokens(cfg: Config, vocab_size: int) -> torch.Tensor:
    """(B, T + 1) token ids, seeded."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab_size, (cfg.batch, cfg.seq + 1), generator=g)


def paired(cfg: Config, base: str, other: str) -> float:
    """median(other's step) / median(base's step), the two models' steps alternating in one process,
    so that load from other processes on a shared machine hits both alike."""
    torch.set_num_threads(cfg.threads)
    runs = [setup(cfg, base), setup(cfg, other)]
    tokens = random_tokens(cfg, runs[0][0].args.vocab_size)
    times = [[], []]
    for i in range(cfg.steps + 1):
        for t, (model, optimizer, _) in zip(times, runs):
            dt = step(model, optimizer, tokens)
            if i:  # step 0 warms up allocators and kernels
                t.append(dt)
    return statistics.median(times[1]) / statistics.median(times[0])


def svd_times(cfg: Config) -> dict:
    """Seconds for the SVD of every target into an empty cache, then for loading it back (checksums
    included)."""
    torch.set_num_threads(cfg.threads)
    model, _ = model_lib.load(cfg.ckpt)
    warm = torch.randn(64, 32, generator=torch.Generator().manual_seed(cfg.seed))
    palora.svd(warm)  # LAPACK's first call pays its set-up; not the SVD's cost
    with tempfile.TemporaryDirectory() as cache:  # absolute: adapters.svds uses it as is
        t0 = time.perf_counter()
        svds = target_svds(cfg, model, cache)
        t1 = time.perf_counter()
        target_svds(cfg, model, cache)
        t2 = time.perf_counter()
    return {"matrices": len(svds), "svd_s": t1 - t0, "cached_s": t2 - t1}


def main(cfg: Config):
    if cfg.mode:
        print(json.dumps(run_mode(cfg)))
        return
    argv = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("mode", "svd")
    ]
    svd = svd_times(cfg) if cfg.svd else None
    target_svds(cfg, model_lib.load(cfg.ckpt)[0], cfg.svd_cache)  # filled for the timed modes
    rows = {}
    for mode in MODES:
        command = [sys.executable, __file__, *argv, f"--mode={mode}"]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    speedup, palora_ratio = paired(cfg, "svf", "svf_rebuild"), paired(cfg, "lora", "palora")
    print(
        f"checkpoint {cfg.ckpt}, batch {cfg.batch} x {cfg.seq} tokens, rank {cfg.rank}, "
        f"{cfg.protect:.0%} protected, {cfg.threads} threads, torch {torch.__version__}"
    )
    print(
        "| mode | step (s), unpaired | peak RSS in training (MiB) | RSS before training (MiB) "
        "| trainable |"
    )
    print("|---|---|---|---|---|")
    for r in rows.values():
        print(
            f"| {r['mode']} | {r['step_s']:.3f} | {r['peak_mib']:.0f} | {r['setup_mib']:.0f} "
            f"| {r['trainable']:,} |"
        )
    f, b = rows["svf"], rows["svf_rebuild"]
    print(
        f"SVF factored vs rebuilt (paired, median of {cfg.steps}): {speedup:.2f}x faster "
        f"(goal >= 1.5); peak {f['peak_mib']:.0f} vs {b['peak_mib']:.0f} MiB, of which training "
        f"{f['peak_mib'] - f['setup_mib']:.0f} vs {b['peak_mib'] - b['setup_mib']:.0f} MiB "
        f"(goal: lower)"
    )
    print(
        f"PALoRA vs LoRA step (paired, median of {cfg.steps}): {palora_ratio:.3f}x (goal <= 1.05)"
    )
    if svd:
        print(
            f"SVD of {svd['matrices']} matrices: {svd['svd_s']:.1f} s once, "
            f"{svd['cached_s']:.2f} s from the cache ({svd['svd_s'] / svd['cached_s']:.0f}x)"
        )


if __name__ == "__main__":
    main(parse_config(Config, description=__doc__.split("\n")[0]))
