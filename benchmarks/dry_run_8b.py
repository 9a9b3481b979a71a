"""An 8B-shaped dry run on the CPU, no weights needed: one transformer block of Llama 3.1 8B /
Mistral 7B (their block shapes are the same; only the vocabulary differs), random bfloat16
weights, batch 1 x --seq tokens. Measures one SVF step and one PALoRA step (time, resident memory,
bytes autograd saves), the float32 SVD of one 4096 x 14336 matrix, and checks the memory plan
(plan(), computed for the whole model) against the measured block; then prints the plan for 1, 2
and 8 GPUs under DDP and FSDP2, in bfloat16.

    python benchmarks/dry_run_8b.py                   # step at 1 x 64 tokens, plan at 1 x 512
    python benchmarks/dry_run_8b.py --seq 512 --no-svd  # the step at the plan's length (slow)

On a CPU without AVX512-BF16 (the 2-core AMD EPYC this was written on), torch 2.13's bfloat16
matmul of a backward pass takes ~30 s per 14336 x 4096 matrix at 32 tokens (the forward ~0.6 s):
the step times are that kernel's, not a GPU's; the memory figures are the point of this run.

Memory is read from /proc/self/status (VmRSS, and VmHWM after resetting it through clear_refs).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as model_lib  # noqa: E402
import palora  # noqa: E402
from svf_memory import PUBLISHED  # noqa: E402

# the published 8B/7B configs, written once (benchmarks/svf_memory.py)
CONFIGS = PUBLISHED
GB = 1e9
BF16, F32 = 2, 4


def plan(c: dict, stage: str, tokens: int, rank=8, fraction=0.5) -> dict:
    """Bytes per component for the whole model, bfloat16 frozen tensors, float32 trainables.

    Activations: what autograd keeps for one block whose input needs a gradient (every block but
    the first), counted tensor by tensor: both RMSNorm inputs in float32 (4 D), q k v after rope
    and the attention output (bf16), the float32 log-sum-exp; MLP: silu's input, its output and
    up's output (3 F, bf16), plus per stage SVF's h = x Vhᵀ of each matrix (3 R) or LoRA's inputs
    (D + F) of A. The head adds the logits (bf16), their float32 copy and log-softmax (10 V).
    """
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    H, Hkv, Dh = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    R = min(D, F)
    attention = D * Dh * (2 * H + 2 * Hkv)
    mlp = 3 * D * F
    act_block = 4 * D * 2 + BF16 * Dh * (2 * H + 2 * Hkv) + F32 * H + BF16 * 3 * F
    p = {"embed+head": BF16 * 2 * V * D, "attention": BF16 * L * attention}
    if stage == "svf":  # W replaced by U (out, R), Vh (R, in) bf16; s, z float32
        p["mlp W / factors"] = L * (BF16 * 3 * (D + F) * R + F32 * 3 * R)
        p["trainable+grad+adam"] = L * 3 * R * F32 * 4
        p["protected bases"] = 0
        act_block += BF16 * 3 * R
    else:  # the merged expert's W (bf16); A (r, in), B (out, r) float32; U_S, V_S float32
        p["mlp W / factors"] = BF16 * L * mlp
        p["trainable+grad+adam"] = L * 3 * rank * (D + F) * F32 * 4
        p["protected bases"] = L * 3 * (D + F) * round(fraction * R) * F32
        act_block += BF16 * (D + F)
    p["activations"] = tokens * (L * act_block + 10 * V)
    return p


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")


def make_block(c: dict, seed=0) -> model_lib.Block:
    args = model_lib.ModelArgs(**c, rms_norm_eps=1e-5, max_position_embeddings=8192)
    torch.manual_seed(seed)
    block = model_lib.Block(args).to(torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(False)
    return block, args


def one_step(block, args, params: list, seq: int) -> dict:
    """Forward, backward and Adam on one block, its input needing a gradient (a middle block)."""
    D = args.hidden_size
    x = torch.randn(1, seq, D, dtype=torch.bfloat16, requires_grad=True)
    inv_freq = model_lib.rope_frequencies(args, "cpu")
    cos, sin = model_lib.rope_cos_sin(inv_freq, torch.arange(seq)[None], torch.bfloat16)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    before, _ = rss()
    reset_peak()
    t0 = time.time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x, cos, sin, None)
    loss = y.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    seconds = time.time() - t0
    peak = rss()[1]
    frozen = {p.untyped_storage().data_ptr() for p in block.parameters()}
    frozen |= {b.untyped_storage().data_ptr() for b in block.buffers()}
    activations = sum(n for ptr, n in saved.items() if ptr not in frozen)
    return {"s": seconds, "peak_over_static": peak - before, "saved": activations}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=64, help="tokens of the measured step (batch 1)")
    parser.add_argument("--plan-seq", type=int, default=512, help="tokens (batch 1) of the plan")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--fraction", type=float, default=0.5, help="protected share per matrix")
    parser.add_argument(
        "--svd",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the float32 SVD (--no-svd: random factors, same shapes)",
    )
    args_ = parser.parse_args()
    torch.manual_seed(0)
    c = CONFIGS["llama31_8b"]
    one = dict(c, num_hidden_layers=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1 x {args_.seq}")

    # the SVD of one 4096 x 14336 matrix in float32 (gate and up are 14336 x 4096: the same size)
    W = torch.randn(c["intermediate_size"], c["hidden_size"]) * 0.02
    if args_.svd:
        t0 = time.time()
        U, s, Vh = palora.svd(W)
        print(f"SVD float32 {tuple(W.shape)}: {time.time() - t0:.1f} s")
    else:  # timing and memory do not depend on the factors' values: random ones, no SVD
        U, s, Vh = W, torch.rand(c["hidden_size"]).sort(descending=True).values, W[:4096].clone()
    del W
    # down (4096 x 14336) is the transpose of an up-shaped matrix: its factors are the transposes
    down = (Vh.T.contiguous(), s, U.T.contiguous())

    results = {}
    for stage in ("svf", "palora"):
        static0, _ = rss()
        block, args = make_block(one)
        mlp = block.mlp
        if stage == "svf":  # the one SVD stands for all three (down's is its transpose)
            factors = {"gate_proj": (U, s, Vh), "up_proj": (U, s, Vh), "down_proj": down}
            svds = {f"mlp.{n}": f for n, f in factors.items()}
            params = list(palora.add_svf(block, svds).values())
        else:
            k = round(args_.fraction * len(s))
            S = {f"mlp.{n}": torch.arange(k) * 2 for n in palora.MLP_TARGETS}  # every other one
            factors = {"gate_proj": (U, s, Vh), "up_proj": (U, s, Vh), "down_proj": down}
            svds = {f"mlp.{n}": f for n, f in factors.items()}
            params = list(palora.add_lora(block, "palora", args_.rank, 16.0, svds, S).values())
        for p in params:
            p.requires_grad_(True)
        del mlp
        static = rss()[0] - static0
        step = one_step(block, args, params, args_.seq)
        step["static"] = static
        results[stage] = step
        p = plan(one, stage, args_.seq, args_.rank, args_.fraction)
        planned_static = sum(v for key, v in p.items() if key not in ("embed+head", "activations"))
        planned_static -= p["trainable+grad+adam"] * 3 / 4  # grads and moments come at the step
        planned_act = p["activations"] - args_.seq * 10 * c["vocab_size"]
        print(f"\n{stage}: one block step {step['s']:.1f} s")
        print(
            f"  static (weights, factors, bases, trainables): measured {static / GB:.3f} GB, "
            f"plan {planned_static / GB:.3f} GB ({100 * (static / planned_static - 1):+.1f}%)"
        )
        print(
            f"  activations autograd keeps: measured {step['saved'] / GB:.3f} GB, "
            f"plan {planned_act / GB:.3f} GB ({100 * (step['saved'] / planned_act - 1):+.1f}%)"
        )
        print(
            f"  peak RSS over static during the step: {step['peak_over_static'] / GB:.3f} GB "
            f"(activations, gradients in flight, temporaries)"
        )
        del block, params, svds
    table(args_.plan_seq, args_.rank, args_.fraction)


def table(seq: int, rank: int, fraction: float):
    """GB per GPU, whole model, bfloat16, micro-batch 1 x seq per GPU. DDP replicates everything.
    FSDP2 shards every parameter over G: W, embeddings, z, A, B and their Adam state, and the frozen
    SVD factors and protected bases too (palora.py holds them as frozen parameters, not buffers);
    activations stay per GPU. (The one gathered block at a time is left out.)"""
    print(
        f"\nmemory plan, GB per GPU, bfloat16, 1 x {seq} tokens per GPU, r {rank}, "
        f"protected fraction {fraction}"
    )
    print(f"{'model':11s} {'stage':7s} {'G':>2s} {'DDP':>7s} {'FSDP2':>7s}   parts (1 GPU)")
    for name, c in CONFIGS.items():
        for stage in ("svf", "palora"):
            p = plan(c, stage, seq, rank, fraction)
            for G in (1, 2, 8):
                ddp = sum(p.values())
                fsdp = (ddp - p["activations"]) / G + p["activations"]
                parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in p.items()) if G == 1 else ""
                print(f"{name:11s} {stage:7s} {G:2d} {ddp / GB:7.2f} {fsdp / GB:7.2f}   {parts}")


if __name__ == "__main__":
    main()
