"""Memory of an SVF model against its base, computed from the config alone (no weights needed).

SVF replaces each target W (out, in) by U (out, R), s (R,), Vh (R, in), R = min(out, in), plus a
trainable z (R,) and Adam's two moments of z (float32). W is not kept beside its factors, so the
ratio is (out + in) R / (out · in) per matrix, 1 + min/max: 1.29x for Llama 3.1 8B's 4096 x 14336
MLP matrices.

    python benchmarks/svf_memory.py                      # Llama 3.1 8B and Mistral 7B (their
    published configs)
    python benchmarks/svf_memory.py --ckpt smollm2_135m  # any checkpoint folder or name at hand
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# the published config.json values these figures need (meta-llama/Llama-3.1-8B-Instruct,
# mistralai/Mistral-7B-Instruct-v0.3)
PUBLISHED = {
    "llama31_8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "mistral_7b": dict(
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


def parameter_counts(c: dict) -> dict:
    """Parameters of the base model, of its MLP matrices, and of the SVF model that replaces them by
    U, s, Vh."""
    D, F, L, Dh = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["head_dim"]
    attention = (
        D * Dh * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    )  # q, o and k, v
    per_layer = attention + 3 * D * F + 2 * D  # + two RMSNorm weights
    embeddings = c["vocab_size"] * D * (1 if c["tie_word_embeddings"] else 2)
    base = L * per_layer + embeddings + D
    R = min(D, F)
    mlp, factors = (
        L * 3 * D * F,
        L * 3 * ((D + F) * R + R),
    )  # W (out, in) -> U (out, R), s (R,), Vh (R, in)
    z = L * 3 * R
    return {"base": base, "mlp": mlp, "svf": base - mlp + factors, "z": z}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ckpt",
        action="append",
        help="checkpoint folder or name (default: the published 8B/7B configs)",
    )
    args = parser.parse_args()
    configs = dict(PUBLISHED)
    if args.ckpt:
        from checkpoints import resolve

        configs = {}
        for name in args.ckpt:
            c = json.loads((resolve(name) / "config.json").read_text())
            configs[name] = {
                **c,
                "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                "num_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
            }
    print(
        f"{'model':12s} {'params':>8s} {'bf16 base':>10s} {'bf16 SVF':>9s} {'ratio':>6s} "
        f"{'z':>9s} {'z share':>8s}"
    )
    for name, c in configs.items():
        n = parameter_counts(c)
        # bf16 weights and factors (2 bytes), float32 s stays negligible; z + Adam's two moments in
        # float32 (12 bytes)
        base_gb, svf_gb = 2 * n["base"] / 1e9, (2 * n["svf"] + 12 * n["z"]) / 1e9
        print(
            f"{name:12s} {n['base'] / 1e9:7.2f}B {base_gb:8.2f} GB {svf_gb:6.2f} GB "
            f"{svf_gb / base_gb:5.2f}x "
            f"{n['z']:9,d} {100 * n['z'] / n['base']:7.4f}%"
        )


if __name__ == "__main__":
    main()
