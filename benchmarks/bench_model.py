"""model.py against transformers on the same checkpoint folder, same dtype and thread count, in one
run.

Prints one table with the ratio ours/theirs for: forward tokens/s (batch 8x128, float32 and
bfloat16), one training step with only a small vector trainable (a per-channel scale on each MLP
output, batch 8x64), greedy generation tokens/s (64 new tokens after a 42-token prompt, batch 1
and 8, and batch 1 with our model compiled as `model.py --compile` does), and peak RSS while
loading (each load in a fresh subprocess, /proc VmHWM after loading minus before, divided by the
weights' bytes).
Goals (issue 11): greedy batch 1 at >= 90% of the memory-bandwidth ceiling, batch 8 >= 1.5x
transformers. The ceiling is measured in the same run: a streaming read of as many float32 bytes
as the weights (what a batch-1 decoding step must read), as tokens/s; each generation figure is
also printed as a % of it, beside a row-major matrix-vector product over the same bytes (the
ceiling printed before, which MKL's matvec does not reach the bandwidth for) and the matrix
products of one decoding step alone, model.linear against F.linear. The forward rows are printed
as a % of the arithmetic ceiling: the matrix products of a forward at the speed of one large
float32 matrix product, measured in the same run.
`--only generate` runs the generation rows alone.

Timings are the best of --repeats runs, ours and theirs interleaved, so that load from other
processes on a shared machine hits both alike; the median and the spread (min-max) of each are
printed too, with the load average and the CPU flags.

Run:  python benchmarks/bench_model.py                 (smollm2_135m, 2 threads, about 5 minutes)
      python benchmarks/bench_model.py --ckpt path/to/folder --threads 4 --repeats 5
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402
from checkpoints import resolve  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 42, 64


def best_time(fn, repeats):
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(fn_ours, fn_theirs, repeats):
    """Best seconds of each, measured alternately; the median and spread of each are printed."""
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(best_time(fn_ours, 1))
        theirs.append(best_time(fn_theirs, 1))
    for name, times in (("ours", ours), ("theirs", theirs)):
        spread = f"{min(times):.3f}-{max(times):.3f}"
        print(f"  {name}: median {statistics.median(times):.3f} s, spread {spread} s", flush=True)
    return min(ours), min(theirs)


class Scaled(torch.nn.Module):
    """y = linear(x) * s: a per-channel scale, the only trainable tensor of the training-step
    benchmark."""

    def __init__(self, linear):
        super().__init__()
        self.linear, self.scale = linear, torch.nn.Parameter(torch.ones(linear.out_features))

    def forward(self, x):
        return self.linear(x) * self.scale


def train_step_fn(model, logits_of, tokens):
    model.requires_grad_(False)
    for layer in model.model.layers:  # both models name their layers model.layers[i].mlp.down_proj
        layer.mlp.down_proj = Scaled(layer.mlp.down_proj)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        logits = logits_of(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


LOAD_SNIPPET = """
import sys, torch
# imported lazily by some meta-device paths (~70 MB of modules): count it in the baseline
import torch._dynamo
torch.set_num_threads({threads})
which, folder, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "ours":
    sys.path.insert(0, {root!r}); import model as M
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) benchmark process
def peak_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = peak_kib()
if which == "ours":
    m, _ = M.load(folder, dtype=dtype)
else:  # the model and its tokenizer, as model.load returns both
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    _ = AutoTokenizer.from_pretrained(folder)
after = peak_kib()
with torch.no_grad():  # transformers maps the file and reads it on first use: count that too
    m(torch.zeros(1, 8, dtype=torch.long))
used = peak_kib()
weights = sum(p.numel() * p.element_size() for p in {{id(p): p for p in m.parameters()}}.values())
print(before * 1024, after * 1024, used * 1024, weights)
"""


def load_peak(which, folder, dtype, threads):
    """(peak RSS added by loading, and by loading plus one forward, weights' bytes), in a fresh
    process each."""
    code = LOAD_SNIPPET.format(threads=threads, root=str(Path(M.__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", code, which, str(folder), dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after, used, weights = map(int, out.stdout.split()[-4:])
    return after - before, used - before, weights


def bandwidth_ceilings(weight_bytes, repeats):
    """Tokens/s if a decoding step did nothing but read the weights once, two ways: `read`, a
    streaming sum over weight_bytes of float32 (the machine's memory bandwidth, the ceiling), and
    `matvec`, a row-major matrix-vector product over as many bytes, (N, 576) @ (576,) (the
    ceiling this benchmark printed until 2026-12-01: MKL's matvec reads at about half the
    bandwidth on the EPYC measured, so it was not one)."""
    cols = 576
    W = torch.randn(weight_bytes // 4 // cols, cols)  # (N, 576), float32
    x = torch.randn(cols)
    read = 1.0 / best_time(lambda: W.sum(), max(repeats, 5))
    matvec = 1.0 / best_time(lambda: W @ x, max(repeats, 5))
    return read, matvec


def linear_weights(model) -> list:
    """Every projection's and the head's weight: what a forward multiplies by."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def arithmetic_ceiling(model, repeats):
    """Tokens/s of a float32 forward if it did nothing but its matrix products at the speed of one
    large one (2048 x 2048 x 2048): 2 flops per weight of every projection and the head per
    token (attention's own products, a few % at 128 positions, not counted)."""
    flops = 2 * sum(w.numel() for w in linear_weights(model))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flop_s = 2 * 2048**3 / best_time(lambda: a @ b, max(repeats, 5))
    return flop_s / flops, flop_s


def step_matmuls(model, rows, repeats):
    """Seconds for the matrix products of one decoding step at `rows` rows (every projection
    and the head, each weight read once), through model.linear (ours) and F.linear (theirs)."""
    weights = linear_weights(model)
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    return compare(
        lambda: [M.linear(xs[w.shape[1]], w) for w in weights],
        lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
        repeats,
    )


def cpu_flags():
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in open("/proc/cpuinfo")
            if line.startswith("flags")
        ),
        [],
    )
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--only", choices=["generate"], help="run the generation rows alone")
    parser.add_argument("--ckpt", default="smollm2_135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(args.threads)
    folder = resolve(args.ckpt)
    ours, tokenizer = M.load(folder)
    rows = []  # (measure, ours, theirs, unit, higher is better)
    g = torch.Generator().manual_seed(0)
    V = ours.args.vocab_size

    weights = {id(p): p for p in ours.parameters()}.values()  # tied: count the embedding once
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    ceiling, matvec = bandwidth_ceilings(weight_bytes, args.repeats)
    for name, tok_s in (("read (the ceiling)", ceiling), ("row-major matvec", matvec)):
        gb_s = weight_bytes * tok_s / 1e9
        print(f"bandwidth, {name}: {tok_s:.1f} tok/s at batch 1 ({gb_s:.1f} GB/s)", flush=True)

    # the matrix products of one decoding step: the (w xᵀ)ᵀ forms against F.linear
    for B in (1, 8):
        t_ours, t_theirs = step_matmuls(ours, B, args.repeats)
        rows.append(
            (f"matmuls of a decoding step, batch {B} (steps/s)", 1 / t_ours, 1 / t_theirs, True)
        )
        print(rows[-1], f"ours: {100 / t_ours / ceiling:.0f}% of the ceiling", flush=True)

    # forward: logits for every position, no autograd
    if args.only is None:
        compute, flop_s = arithmetic_ceiling(ours, args.repeats)
        print(f"arithmetic ceiling: {compute:.0f} tok/s ({flop_s / 1e9:.0f} GFLOP/s)", flush=True)
    for dtype in (torch.float32, torch.bfloat16) if args.only is None else ():
        a, _ = M.load(folder, dtype=dtype)
        b = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        tokens = torch.randint(0, V, (8, 128), generator=g)
        with torch.no_grad():
            t_ours, t_theirs = compare(
                lambda a=a, x=tokens: a(x), lambda b=b, x=tokens: b(x).logits, args.repeats
            )
        rows.append(
            (
                f"forward {str(dtype)[6:]} 8x128 (tok/s)",
                tokens.numel() / t_ours,
                tokens.numel() / t_theirs,
                True,
            )
        )
        print(rows[-1], f"ours: {100 * rows[-1][1] / compute:.0f}% of the arithmetic ceiling")
        del a, b

    # greedy generation, float32: 64 new tokens after a 42-token prompt; eos is disabled so all 64
    # are made. Each row asks for another story: the rows share the chat template's system turn
    # (generate computes it once, as in evaluation), not the whole prompt.
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def prompt(row: int) -> list[int]:
        story = "a long story about a lighthouse keeper who finds a message in a bottle"
        content = f"Story {row + 1}: write {story} on a stormy winter night by the sea."
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}])
        return (tokenizer.encode(text, add_special_tokens=False) * 2)[:PROMPT_LEN]

    no_eos = GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    for B in (1, 8):
        prompts = torch.tensor([prompt(b) for b in range(B)])
        shared = M.shared_prefix(prompts.tolist(), ours, PROMPT_LEN + NEW_TOKENS)
        print(f"batch {B}: {shared} of the {PROMPT_LEN} prompt tokens shared by every row")

        def run_ours(prompts=prompts):
            out = M.generate(ours, prompts.tolist(), NEW_TOKENS, eos_ids=set())
            assert all(len(row) == NEW_TOKENS for row in out)

        def run_theirs(prompts=prompts):
            with torch.no_grad():
                out = theirs.generate(
                    prompts, attention_mask=torch.ones_like(prompts), generation_config=no_eos
                )
            assert out.shape[1] == PROMPT_LEN + NEW_TOKENS

        t_ours, t_theirs = compare(run_ours, run_theirs, args.repeats)
        rows.append(
            (
                f"generate greedy batch {B} (tok/s)",
                B * NEW_TOKENS / t_ours,
                B * NEW_TOKENS / t_theirs,
                True,
            )
        )
        steps = NEW_TOKENS / t_ours  # decoding steps/s, each reading every weight once
        print(rows[-1], f"ours: {100 * steps / ceiling:.0f}% of the ceiling's steps/s", flush=True)
        if B == 1:
            theirs_b1, prompts_b1 = run_theirs, prompts.tolist()

    # batch 1 with our model compiled (inductor, its C++ wrapper: no Python between the kernels;
    # dynamic shapes, one compilation for every step), the compile time printed apart, the greedy
    # tokens compared with eager's: what `model.py --compile` does
    import torch._inductor.config as inductor

    with inductor.patch(cpp_wrapper=True):
        compiled = torch.compile(ours, dynamic=True)
        start = time.perf_counter()
        first = M.generate(compiled, prompts_b1, NEW_TOKENS, eos_ids=set())
        seconds = time.perf_counter() - start
        same = first == M.generate(ours, prompts_b1, NEW_TOKENS, eos_ids=set())
        print(f"compiled: first call {seconds:.0f} s; the same greedy tokens as eager: {same}")

        def run_compiled():
            M.generate(compiled, prompts_b1, NEW_TOKENS, eos_ids=set())

        t_ours, t_theirs = compare(run_compiled, theirs_b1, args.repeats)
    rows.append(
        (
            "generate greedy batch 1, compiled (tok/s)",
            NEW_TOKENS / t_ours,
            NEW_TOKENS / t_theirs,
            True,
        )
    )
    steps = NEW_TOKENS / t_ours
    print(rows[-1], f"ours: {100 * steps / ceiling:.0f}% of the ceiling's steps/s", flush=True)
    rows.append(("bandwidth ceiling, read (tok/s at batch 1)", ceiling, ceiling, True))
    if args.only is None:
        rows.append(("arithmetic ceiling, float32 forward (tok/s)", compute, compute, True))
    rows.append(("row-major matvec over the weights (tok/s)", matvec, matvec, True))
    if args.only == "generate":
        return report(args, folder, rows)

    # one training step (forward, backward, AdamW) with only a per-channel scale on each MLP output
    # trainable
    tokens = torch.randint(0, V, (8, 64), generator=g)
    step_ours, n_ours = train_step_fn(ours, ours, tokens)
    step_theirs, n_theirs = train_step_fn(theirs, lambda x: theirs(x).logits, tokens)
    assert n_ours == n_theirs
    t_ours, t_theirs = compare(step_ours, step_theirs, args.repeats)
    rows.append(
        (
            f"train step 8x64, {n_ours} trainable (tok/s)",
            tokens.numel() / t_ours,
            tokens.numel() / t_theirs,
            True,
        )
    )

    # peak RSS while loading, each in a fresh process
    for dtype in ("float32", "bfloat16"):
        (load_ours, used_ours, weights), (load_theirs, used_theirs, _) = (
            load_peak(which, folder, dtype, args.threads) for which in ("ours", "transformers")
        )
        rows.append(
            (
                f"load {dtype}: peak RSS / weights ({weights / 2**20:.0f} MiB)",
                load_ours / weights,
                load_theirs / weights,
                False,
            )
        )
        rows.append(
            (
                f"load {dtype} + 1 forward: peak RSS / weights",
                used_ours / weights,
                used_theirs / weights,
                False,
            )
        )

    report(args, folder, rows)


def report(args, folder, rows):
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"\n{datetime.date.today()}  {cpu}, {os.cpu_count()} cores, {args.threads} threads, torch "
        f"{torch.__version__}, "
        f"transformers {transformers.__version__}, checkpoint {folder.name}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"cpu flags: {cpu_flags()}")
    print(f"{'measure':52s} {'ours':>10s} {'transformers':>13s} {'ours/theirs':>12s}")
    for name, a, b, _ in rows:
        print(f"{name:52s} {a:10.2f} {b:13.2f} {a / b if b else float('nan'):11.2f}x")
    print(json.dumps({name: {"ours": a, "transformers": b} for name, a, b, _ in rows}))


if __name__ == "__main__":
    main()
