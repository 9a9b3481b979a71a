"""How fast one decoding step's matrix products can read their weights on this CPU, per form, at 1
and 2 threads: the 211 float32 matrices of SmolLM2-135M's step (random values, the same shapes and
538 MB, so they come from memory, not cache), each multiplied by one row.

Forms: a streaming read of the bytes (W.sum(), the ceiling); MKL's matrix-vector product (torch.mv,
what F.linear does for one row); the row and its copy as a 2-column product (model.linear before
2026-12-01 12:40); w's two halves as a batch of two products (torch.bmm, model.linear now).

Run:  python benchmarks/bench_gemv.py
"""

import os
import time

import torch

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def halves(w, x):
    out, inp = w.shape
    return torch.bmm(w.view(2, out // 2, inp), x.T.expand(2, inp, 1))


FORMS = {
    "streaming read, W.sum() (the ceiling)": lambda w, x: w.sum(),
    "matrix-vector product, torch.mv": lambda w, x: torch.mv(w, x[0]),
    "the row and its copy, w @ [x; x]ᵀ": lambda w, x: w @ torch.cat((x, x)).T,
    "two halves, torch.bmm (model.linear)": halves,
}


def main():
    torch.manual_seed(0)
    weights = [torch.randn(s) for s in LAYER * 30] + [torch.randn(49152, 576)]  # + lm_head
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    flags = open("/proc/cpuinfo").read().split()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {nbytes / 1e6:.0f} MB of weights")
    print("cpu flags:", " ".join(f for f in wanted if f in flags))
    print(f"{'form':40s} {'threads':>7s} {'GB/s':>6s} {'ms/step':>8s}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, form in FORMS.items():
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for w in weights:
                    form(w, rows[w.shape[1]])
                best = min(best, time.perf_counter() - start)
            print(f"{name:40s} {threads:7d} {nbytes / best / 1e9:6.1f} {1e3 * best:8.1f}")


if __name__ == "__main__":
    main()
