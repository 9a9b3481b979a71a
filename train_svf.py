"""Stage one of PALoRA: train an SVF expert (Singular Value Fine-tuning, Transformer², arXiv 2501.06252).

Each target weight W (out x in) is split once, W = U diag(s) Vh, and only a vector z (one number per singular
value) is trained: W' = U diag(s ⊙ z) Vh · c, c = Σs / Σ(s ⊙ z). On SmolLM2-135M's MLP matrices that is
30 x 3 x 576 = 51,840 parameters (0.04% of the model); on Llama 3.1 8B, 32 x 3 x 4096 = 393,216 (0.0049%).
The trained z is the skill's geometric probe for stage two (inject.py).

Run:
    python train_svf.py                                   # SmolLM2-135M-Instruct on the CPU, ~10 minutes
    python train_svf.py --ckpt llama31_8b --steps 400     # on a GPU, bfloat16 autocast (auto)
    python train_svf.py --data gsm8k_train.jsonl --eval-data gsm8k_test.jsonl   # GSM8K's own layout works
    python train_svf.py --resume                          # continue the run in --out from its last checkpoint
    python train_svf.py --objective rl                    # REINFORCE with a KL penalty, as Transformer² trains SVF

Outputs in --out (default runs/svf-<ckpt>-<data>/): config.json, metrics.jsonl, state.safetensors (resume
point), svf.safetensors (the expert: z vectors + metadata), svf_best.safetensors (best held-out accuracy).
"""
import json
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import adapters
import checkpoints
import model as model_lib
import palora
import tasks
from training import (answer_loss, batch_indices, check_finite, load_state, resolve_device,
                      resolve_dtype, restart_metrics, save_config, save_state)

REPO = Path(__file__).resolve().parent


@dataclass
class Config:
    ckpt: str = field(default="smollm2_135m", metadata={"help": "checkpoint folder or name (smollm2_135m, llama31_8b, mistral_7b)"})
    data: str = field(default="data/reasoning/train.jsonl", metadata={"help": "training JSONL with question/answer (GSM8K layout accepted)"})
    eval_data: str = field(default="data/reasoning/test.jsonl", metadata={"help": "held-out JSONL scored strict and flexible"})
    targets: str = field(default=",".join(palora.MLP_TARGETS), metadata={"help": "comma-separated linear names to adapt in every layer"})
    steps: int = field(default=75, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate for z"})
    seed: int = field(default=0, metadata={"help": "seed for data order and sampling"})
    out: str = field(default="", metadata={"help": "output folder (default runs/svf-<ckpt>-<data>)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N", })
    dtype: str = field(default="auto", metadata={"help": "frozen weights' dtype: auto (bf16 on CUDA, fp32 on CPU)", "choices": ["auto", "float32", "bfloat16"]})
    resume: bool = field(default=False, metadata={"help": "continue from --out/state.safetensors"})
    objective: str = field(default="sft", metadata={"help": "sft: cross-entropy on answers; rl: REINFORCE + KL to the base", "choices": ["sft", "rl"]})
    kl_coef: float = field(default=0.2, metadata={"help": "rl only: KL penalty weight (Transformer² used 0.1-0.3)"})
    rl_samples: int = field(default=4, metadata={"help": "rl only: sampled answers per question"})
    eval_every: int = field(default=25, metadata={"help": "steps between held-out evaluations (0: only at the end)"})
    eval_limit: int = field(default=0, metadata={"help": "score only the first N held-out items (0: all)"})
    save_every: int = field(default=25, metadata={"help": "steps between resumable checkpoints"})
    max_len: int = field(default=512, metadata={"help": "longest prompt + answer in tokens; longer items are skipped and counted"})
    max_new_tokens: int = field(default=64, metadata={"help": "answer length limit when scoring (the default answers take ~27 tokens)"})
    eval_batch_size: int = field(default=64, metadata={"help": "questions answered at once when scoring"})
    svd_cache: str = field(default=adapters.SVD_CACHE, metadata={"help": "folder of cached SVD factors"})


def check_config(cfg: Config):
    """Fail before any model is loaded: bad numbers and paths are cheap to catch."""
    if cfg.steps <= 0:
        raise ValueError(f"--steps must be positive, got {cfg.steps}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {cfg.batch_size}")
    for path in (cfg.data, cfg.eval_data):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")


def default_out(cfg: Config) -> Path:
    return REPO / "runs" / f"svf-{Path(cfg.ckpt).name}-{Path(cfg.data).parent.name or Path(cfg.data).stem}"


# -----------------------------------------------------------------------------
# data: read and validate everything before the first step


def load_examples(cfg: Config, tokenizer):
    """(kept train records, their encoded (ids, labels), held-out records), all checked before the first step.
    The first two are parallel lists: the batch indices of either objective name the same item in both."""
    train = tasks.read_jsonl(cfg.data)
    tasks.check_reasoning(train, cfg.data)
    held_out = tasks.read_jsonl(cfg.eval_data)
    tasks.check_reasoning(held_out, cfg.eval_data)
    if cfg.eval_limit:
        held_out = held_out[: cfg.eval_limit]
    kept, examples, skipped = [], [], 0
    for r in train:
        ids, labels = tasks.encode_example(tokenizer, r["question"], r["answer"], cfg.max_len)
        if ids is None:
            skipped += 1
            continue
        kept.append(r)
        examples.append((ids, labels))
    if skipped:
        print(f"{cfg.data}: skipped {skipped} of {len(train)} items longer than --max-len {cfg.max_len}", file=sys.stderr)
    if not examples:
        raise ValueError(f"{cfg.data}: no item fits in --max-len {cfg.max_len}")
    return kept, examples, held_out


def evaluate(model, tokenizer, held_out, cfg: Config) -> dict:
    """Held-out accuracy, strict (`#### N`) and flexible (last number), as lm-evaluation-harness scores GSM8K."""
    predictions = tasks.answer(model, tokenizer, [r["question"] for r in held_out], cfg.max_new_tokens, cfg.eval_batch_size)
    scores = [tasks.score_reasoning(p, r["answer"]) for p, r in zip(predictions, held_out)]
    n = len(scores)
    return {"strict": sum(s["strict"] for s in scores) / n, "flexible": sum(s["flexible"] for s in scores) / n, "n": n}


# -----------------------------------------------------------------------------
# objectives


def sft_loss(model, examples, idx, pad_id, device):
    tokens, labels, mask = (t.to(device) for t in tasks.collate([examples[i] for i in idx], pad_id))
    return answer_loss(model, tokens, labels, mask), int((labels != -100).sum())


@contextmanager
def base_model(z: dict):
    """Temporarily set every z to 1: SVF with z = 1 reproduces W exactly, so this is the base model."""
    saved = {n: p.detach().clone() for n, p in z.items()}
    with torch.no_grad():
        for p in z.values():
            p.fill_(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in z.items():
                p.copy_(saved[n])


def rl_loss(model, tokenizer, records, idx, z, cfg: Config, device):
    """REINFORCE with a KL penalty to the base model (z = 1), the objective Transformer² trains SVF with.

    For each question, `rl_samples` answers y are sampled; r = 1 when the strict `#### N` answer is right. The KL
    penalty enters the reward, r' = r - kl_coef · (log p_z(y) - log p_1(y)) (the sampled estimate of KL(p_z || p_1)),
    and the loss is -mean[(r' - mean r') · log p_z(y)]: the score-function gradient of E[r'] with a mean baseline.
    (Adding kl_coef · mean(log p_z - log p_1) to the loss instead would be wrong: its gradient is kl_coef · ∇log p_z,
    zero in expectation over samples of p_z, so it would not pull z back to the base.)
    """
    prompts = [tokenizer.encode(tasks.chat_prompt(tokenizer, records[i]["question"]), add_special_tokens=False)
               for i in idx for _ in range(cfg.rl_samples)]
    golds = [records[i]["answer"] for i in idx for _ in range(cfg.rl_samples)]
    with torch.no_grad():
        samples = model_lib.generate(model, prompts, cfg.max_new_tokens, tokenizer.eos_ids, temperature=1.0)
    rewards = torch.tensor([float(tasks.score_reasoning(tokenizer.decode(s), g)["strict"]) for s, g in zip(samples, golds)])
    eos = min(tokenizer.eos_ids)
    examples = [(p + s + [eos], [-100] * len(p) + s + [eos]) for p, s in zip(prompts, samples)]
    tokens, labels, mask = (t.to(device) for t in tasks.collate(examples, tokenizer.pad_id))

    def answer_logprob():  # (N,) summed log p of each sampled answer
        logits = model(tokens, attention_mask=mask)[:, :-1].float()  # (N, T-1, V)
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (target != -100)).sum(-1)

    with torch.no_grad(), base_model(z):  # first: base_model writes z in place, which a built graph must not see
        logp_base = answer_logprob()
    logp = answer_logprob()
    shaped = rewards.to(device) - cfg.kl_coef * (logp.detach() - logp_base)  # (N,)
    loss = -((shaped - shaped.mean()) * logp).mean()
    return loss, int((labels != -100).sum())


# -----------------------------------------------------------------------------


def main(cfg: Config):
    check_config(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    targets = tuple(t.strip() for t in cfg.targets.split(",") if t.strip())
    torch.manual_seed(cfg.seed)

    folder = checkpoints.resolve(cfg.ckpt)
    identity = checkpoints.identity(folder)
    model, tokenizer = model_lib.load(folder, device=device, dtype=dtype)
    palora.find_targets(model, targets)  # an unknown target name fails here, before the SVD
    records, examples, held_out = load_examples(cfg, tokenizer)
    cfg.out = str(out)  # resolved, as saved
    save_config(cfg, out / "config.json")

    n_model = sum(p.numel() for p in model.parameters())  # before SVF replaces the target weights
    # Stage 1: replace each target W by its SVD factors and a trainable z (W itself is freed: memory ~1.3x W).
    svds = adapters.svds(model, targets, identity, cfg.svd_cache)
    z = palora.add_svf(model, svds)  # name -> Parameter (S,), float32, initialised at 1
    for p in model.parameters():
        p.requires_grad_(False)
    for p in z.values():
        p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in z.values())
    print(f"trainable z: {n_trainable:,} parameters for {len(z)} matrices, {100 * n_trainable / n_model:.4f}% of the model")
    optimizer = torch.optim.Adam(list(z.values()), lr=cfg.lr)

    start, best = 0, {"strict": -1.0}
    state_path = out / "state.safetensors"
    if cfg.resume:
        if not state_path.exists():
            raise FileNotFoundError(f"{state_path}: nothing to resume from")
        start, extra = load_state(state_path, z, optimizer)
        best = extra.get("best", best)
        print(f"resumed from {state_path} at step {start}")
    restart_metrics(out / "metrics.jsonl", start)

    meta = {"ckpt": str(cfg.ckpt), "targets": ",".join(targets), "data": cfg.data}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and dtype == torch.bfloat16 else nullcontext()
    if start == 0:
        base = evaluate(model, tokenizer, held_out, cfg)
        tasks.append_jsonl(out / "metrics.jsonl", {"step": 0, "held_out": base})
        print(f"base model held-out: strict {base['strict']:.3f} flexible {base['flexible']:.3f} (n={base['n']})")

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="svf")
    t0, train_s, tokens_seen = time.time(), 0.0, 0  # tokens/s counts training time only, not held-out scoring
    for step in bar:
        t_step = time.time()
        idx = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
        with autocast:
            if cfg.objective == "sft":
                loss, n_tok = sft_loss(model, examples, idx, tokenizer.pad_id, device)
            else:
                loss, n_tok = rl_loss(model, tokenizer, records, idx, z, cfg, device)
        check_finite(loss, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens_seen, train_s = tokens_seen + n_tok, train_s + time.time() - t_step
        tok_s = tokens_seen / train_s
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:.0f}")
        row = {"step": step + 1, "loss": loss.item(), "tokens_per_s": tok_s}
        done = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done:
            row["held_out"] = acc = evaluate(model, tokenizer, held_out, cfg)
            bar.write(f"step {step + 1}: held-out strict {acc['strict']:.3f} flexible {acc['flexible']:.3f}")
            if acc["strict"] > best["strict"]:
                best = {**acc, "step": step + 1}
                adapters.save_svf(out / "svf_best.safetensors", z, identity, {**meta, "steps": str(step + 1), "held_out": json.dumps(acc)})
        tasks.append_jsonl(out / "metrics.jsonl", row)
        if (step + 1) % cfg.save_every == 0 or done:
            save_state(state_path, z, optimizer, step + 1, {"best": best})

    final = row.get("held_out") or evaluate(model, tokenizer, held_out, cfg)
    adapters.save_svf(out / "svf.safetensors", z, identity, {**meta, "steps": str(cfg.steps), "held_out": json.dumps(final)})
    summary = {"held_out": final, "best": best, "trainable": n_trainable, "model_parameters": n_model,
               "share": n_trainable / n_model, "wall_s": time.time() - t0, "train_s": train_s,
               "tokens_per_s": tokens_seen / max(train_s, 1e-9), "device": str(device), "dtype": str(dtype)}
    tasks.atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    cli.run(main, cli.parse_config(Config, description=__doc__.split("\n")[0]))
