"""Stage one of PALoRA: train an SVF expert (Singular Value Fine-tuning; Transformer², 2501.06252).

Each target weight W (out x in) is split once, W = U diag(s) Vh, and only a vector z (one number per
singular value) is trained: W' = U diag(s ⊙ z) Vh · c, c = Σs / Σ(s ⊙ z). On SmolLM2-135M's MLP
matrices that is 30 x 3 x 576 = 51,840 parameters (0.04% of the model); on Llama 3.1 8B,
32 x 3 x 4096 = 393,216 (0.0049%). The trained z is the skill's geometric probe for stage two.

Run:
    python train_svf.py                                # SmolLM2-135M-Instruct, CPU, ~10 minutes
    python train_svf.py --ckpt llama31_8b --steps 400  # on a GPU, bfloat16 autocast (auto)
    python train_svf.py --data gsm8k_train.jsonl --eval-data gsm8k_test.jsonl  # GSM8K's layout
    python train_svf.py --resume                       # continue the run in --out
    python train_svf.py --overwrite                    # start the run in --out again
    python train_svf.py --objective rl                 # REINFORCE + KL penalty, as Transformer²
    python train_svf.py --mix-known data/known/known_keep.jsonl  # known facts trained beside
    torchrun --standalone --nproc_per_node 8 train_svf.py --ckpt llama31_8b   # DDP, 8 GPUs
    torchrun --standalone --nproc_per_node 8 train_svf.py --ckpt llama31_8b --parallel fsdp

Under torchrun: --batch-size is the GLOBAL batch, split over the processes, so z does not
depend on their number (sft; rl samples each rank's questions from its own stream, and its
baseline is the mean of that rank's samples); rank 0 alone writes; the state resumes under any
process count and either --parallel. ddp: every rank holds the whole model, held-out scoring is
sharded over the ranks and gathered. fsdp (FSDP2): every parameter, the frozen factors too, is
sharded over the ranks while training (each rank still loads the whole model first); every rank
scores all held-out items, as each forward is a collective.

Outputs in --out (default runs/svf-<ckpt>-<data>/): config.json, metrics.jsonl (one row per step;
the held-out scores are a learning curve, not a model selection: there is no validation split, so
the expert is the last z), state.safetensors (the resume point), svf.safetensors (the expert: z
vectors and metadata), summary.json.
"""

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
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
    all_sum,
    answer_all,
    answer_loss,
    autocast,
    batch_indices,
    check_context,
    check_finite,
    check_targets,
    full,
    is_main,
    load_state,
    main_first,
    open_run,
    option,
    parse_targets,
    rank,
    resolve_device,
    resolve_dtype,
    restart_metrics,
    save_state,
    setup_distributed,
    shard,
    shard_total,
    step_generator,
    teardown,
    world,
    wrap,
)

REPO = Path(__file__).resolve().parent
MAX_SAMPLED = 65536  # rl: answers sampled per step, the rows of one batch (inject.py's batch bound)


@dataclass
class Config:
    ckpt: str = option("smollm2_135m", "checkpoint folder or name (smollm2_135m, llama31_8b, ...)")
    data: str = option("data/reasoning/train.jsonl", "training JSONL with question/answer")
    eval_data: str = option(
        "data/reasoning/test.jsonl", "held-out JSONL, scored strict and flexible"
    )
    targets: str = option(",".join(palora.MLP_TARGETS), "comma-separated linear names to adapt")
    steps: int = option(75, "optimizer steps", ge=1)
    batch_size: int = option(8, "examples per step", ge=1)
    lr: float = option(5e-3, "Adam learning rate for z", gt=0)
    seed: int = option(0, "seed for data order and sampling", ge=0)
    out: str = option("", "output folder (default runs/svf-<ckpt>-<data>)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    parallel: str = option(
        "ddp",
        "under torchrun: ddp (whole model per rank) or fsdp (FSDP2: parameters sharded)",
        choices=["ddp", "fsdp"],
    )
    dtype: str = option(
        "auto",
        "frozen weights' dtype: auto (bf16 on CUDA, fp32 on CPU)",
        choices=["auto", "float32", "bfloat16"],
    )
    resume: bool = option(False, "continue the run in --out from its state.safetensors")
    overwrite: bool = option(False, "empty --out (a run folder) and start again")
    objective: str = option(
        "sft",
        "sft: cross-entropy on answers; rl: REINFORCE + KL to the base model",
        choices=["sft", "rl"],
    )
    kl_coef: float = option(0.2, "rl only: KL penalty weight (Transformer² used 0.1-0.3)", ge=0)
    rl_samples: int = option(4, "rl only: sampled answers per question", ge=1)
    eval_every: int = option(25, "steps between held-out evaluations (0: only at the end)", ge=0)
    eval_limit: int = option(0, "score only the first N held-out items (0: all)", ge=0)
    save_every: int = option(25, "steps between resumable checkpoints", ge=1)
    max_len: int = option(512, "longest prompt + answer in tokens; longer items are skipped", ge=2)
    mix_known: str = option(
        "",
        "JSONL of known facts (question/answer) trained beside the skill, so that the expert keeps "
        "them ('': none; e.g. data/known/known_keep.jsonl)",
    )
    known_batch: int = option(
        4, "with --mix-known: known facts per step (their mean loss is added)", ge=1, le=4096
    )
    max_new_tokens: int = option(64, "answer length limit when scoring (answers take ~27)", ge=1)
    eval_batch_size: int = option(64, "questions answered at once when scoring", ge=1)
    svd_cache: str = option(adapters.SVD_CACHE, "folder of cached SVD factors")


def check_config(cfg: Config) -> tuple[str, ...]:
    """Fail before any model is loaded: bad numbers and paths are cheap to catch. -> the targets."""
    cli.check_numbers(cfg)
    if cfg.objective == "rl" and cfg.batch_size * cfg.rl_samples < 2:
        # the baseline is the mean shaped reward of the batch: one sample minus itself is 0
        raise cli.ConfigError(
            "--objective rl: the mean baseline needs --batch-size x --rl-samples >= 2"
        )
    sampled = cfg.batch_size * cfg.rl_samples
    if cfg.objective == "rl" and sampled > MAX_SAMPLED:  # each a row of one generate() call
        raise cli.ConfigError(
            f"--rl-samples: --batch-size x --rl-samples answers sampled per step must be <= "
            f"{MAX_SAMPLED}, got {sampled}"
        )
    if cfg.mix_known and cfg.objective == "rl":
        raise cli.ConfigError("--mix-known trains with --objective sft only")
    cli.check_folder(cfg.svd_cache, "--svd-cache")
    for path in (cfg.data, cfg.eval_data, cfg.mix_known):
        if path:
            tasks.check_file(path)
    return parse_targets(cfg.targets)


def default_out(cfg: Config) -> Path:
    data = Path(cfg.data).parent.name or Path(cfg.data).stem
    return REPO / "runs" / f"svf-{Path(cfg.ckpt).name}-{data}"


# -----------------------------------------------------------------------------
# data: read and validate everything before the first step


def read_data(cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(training records, held-out records, known facts mixed in), all checked; needs no model, so
    it runs first."""
    train = tasks.read_jsonl(cfg.data)
    tasks.check_reasoning(train, cfg.data)
    held_out = tasks.read_jsonl(cfg.eval_data)
    tasks.check_reasoning(held_out, cfg.eval_data)
    if cfg.eval_limit:
        held_out = held_out[: cfg.eval_limit]
    known = tasks.read_jsonl(cfg.mix_known) if cfg.mix_known else []
    tasks.check_facts(known, cfg.mix_known)
    return train, held_out, known


def encode_examples(records: list[dict], tokenizer, max_len: int, path: str):
    """(kept records, their encoded (ids, labels)): parallel lists, so the batch indices of either
    objective name the same item in both. Items longer than --max-len are skipped and counted."""
    kept, examples = [], []
    for r in records:
        ids, labels = tasks.encode_example(tokenizer, r["question"], r["answer"], max_len)
        if ids is not None:
            kept.append(r)
            examples.append((ids, labels))
    skipped = len(records) - len(kept)
    if skipped:
        why = f"items longer than --max-len {max_len}"
        print(f"{path}: skipped {skipped} of {len(records)} {why}", file=sys.stderr)
    if records and not examples:
        raise tasks.DataError(f"{path}: no item fits in --max-len {max_len}")
    return kept, examples


def held_out_accuracy(model, tokenizer, held_out, cfg: Config, desc: str) -> dict:
    """Strict (`#### N`) and flexible (last number) accuracy, as lm-eval-harness scores GSM8K
    (the answering shared out under torchrun: training.answer_all)."""
    questions = [r["question"] for r in held_out]
    predictions = answer_all(
        model, tokenizer, questions, cfg.max_new_tokens, cfg.eval_batch_size, cfg.parallel, desc
    )
    scores = [tasks.score_reasoning(p, r["answer"]) for p, r in zip(predictions, held_out)]
    n = len(scores)
    strict = sum(s["strict"] for s in scores) / n
    flexible = sum(s["flexible"] for s in scores) / n
    return {"strict": strict, "flexible": flexible, "n": n}


# -----------------------------------------------------------------------------
# objectives


def sft_loss(model, batch: list[tuple], pad_id: int, device):
    """batch: (ids, labels) pairs -> (answer-token cross-entropy, number of answer tokens)."""
    tokens, labels, mask = (t.to(device) for t in tasks.collate(batch, pad_id))
    loss = answer_loss(model, tokens, labels, mask, shard_total(labels), pack=True)  # global mean
    return loss, int((labels != tasks.IGNORE_INDEX).sum())


@contextmanager
def base_model(z: dict):
    """Temporarily set every z to 1: SVF with z = 1 reproduces W exactly, so this is the base model.
    (It belongs beside SVFLinear in palora.py, as `svf_disabled`; here until that moves.)"""
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


def answer_logprob(model, tokens, labels, mask) -> torch.Tensor:
    """(N,) summed log p of each row's answer tokens (labels != IGNORE_INDEX)."""
    logits = model(tokens, attention_mask=mask)[:, :-1].float()  # (N, T-1, V)
    target = labels[:, 1:]  # (N, T-1)
    logp = torch.log_softmax(logits, -1)
    logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return (logp * (target != tasks.IGNORE_INDEX)).sum(-1)


def reinforce_loss(logp, logp_base, rewards, kl_coef: float) -> torch.Tensor:
    """-mean[(r' - mean r') · log p_z(y)], r' = r - kl_coef · (log p_z(y) - log p_1(y)); all (N,).

    The KL penalty enters the reward (log p_z - log p_1 of a sample of p_z estimates
    KL(p_z || p_1)), and the mean baseline removes what all samples share. (Adding kl_coef ·
    mean(log p_z - log p_1) to the loss instead would be wrong: its gradient is kl_coef · ∇log p_z,
    zero in expectation over samples of p_z, so it would not pull z back to the base.)"""
    shaped = rewards - kl_coef * (logp.detach() - logp_base)  # (N,)
    return -((shaped - shaped.mean()) * logp).mean()


def rl_loss(model, tokenizer, batch: list[dict], z: dict, cfg: Config, generator):
    """REINFORCE with a KL penalty to the base model (z = 1), the objective Transformer² trains SVF
    with: for each question, `rl_samples` answers y are sampled with `generator`; r = 1 when the
    strict `#### N` answer is right. -> (reinforce_loss, number of sampled answer tokens)."""
    device = next(iter(z.values())).device
    chats = [tasks.chat_prompt(tokenizer, r["question"]) for r in batch]
    prompts = [tokenizer.encode(c, add_special_tokens=False) for c in chats]
    prompts = [p for p in prompts for _ in range(cfg.rl_samples)]
    golds = [r["answer"] for r in batch for _ in range(cfg.rl_samples)]
    eos_ids = tokenizer.eos_ids
    with torch.no_grad():
        samples = model_lib.generate(
            model, prompts, cfg.max_new_tokens, eos_ids, temperature=1.0, generator=generator
        )
    texts = [tokenizer.decode(s) for s in samples]
    rewards = [float(tasks.score_reasoning(t, g)["strict"]) for t, g in zip(texts, golds)]
    eos = min(eos_ids)
    ignore = tasks.IGNORE_INDEX
    examples = [(p + s + [eos], [ignore] * len(p) + s + [eos]) for p, s in zip(prompts, samples)]
    tokens, labels, mask = (t.to(device) for t in tasks.collate(examples, tokenizer.pad_id))
    with torch.no_grad(), base_model(z):  # first: a graph built on z must not see it written
        logp_base = answer_logprob(model, tokens, labels, mask)
    logp = answer_logprob(model, tokens, labels, mask)
    loss = reinforce_loss(logp, logp_base, torch.tensor(rewards, device=device), cfg.kl_coef)
    return loss, int((labels != ignore).sum())


# -----------------------------------------------------------------------------
# the loop


def batch_loss(model, tokenizer, z: dict, data: tuple, cfg: Config, step: int) -> tuple:
    """(the objective on this rank's slice of the global batch at `step` (all of it without
    torchrun), its answer tokens). data: (records, their encoded examples, known facts' encoded
    examples). With known facts, sft adds their mean answer-token loss to the skill's, so that a
    short answer weighs as much as a long worked solution."""
    records, examples, known = data
    device = next(iter(z.values())).device
    idx = shard(batch_indices(len(examples), cfg.batch_size, step, cfg.seed))
    if cfg.objective == "rl":
        generator = step_generator(cfg.seed, step, device, rank())
        return rl_loss(model, tokenizer, [records[i] for i in idx], z, cfg, generator)
    loss, n_tokens = sft_loss(model, [examples[i] for i in idx], tokenizer.pad_id, device)
    if known:
        idx = shard(batch_indices(len(known), cfg.known_batch, step, cfg.seed + 1))
        batch = [known[i] for i in idx]
        known_loss, known_tokens = sft_loss(model, batch, tokenizer.pad_id, device)
        loss, n_tokens = loss + known_loss, n_tokens + known_tokens
    return loss, n_tokens


def train(model, tokenizer, z: dict, data: tuple, cfg: Config, out: Path) -> tuple[dict, dict]:
    """Steps from the resume point (0, or the state's) to cfg.steps.
    data: (records, their encoded examples, known facts' examples, held-out records).
    -> (last metrics row, stats)."""
    records, examples, known, held_out = data
    device = next(iter(z.values())).device
    dtype = resolve_dtype(cfg.dtype, device)
    optimizer = torch.optim.Adam(list(z.values()), lr=cfg.lr)
    state, metrics = out / "state.safetensors", out / "metrics.jsonl"
    start, stats = 0, {"train_s": 0.0, "tokens": 0}  # tokens/s: training time only, not scoring
    if cfg.resume:
        start, stats = load_state(state, z, optimizer)
        print(f"resumed from {state} at step {start}", file=sys.stderr)
    rows = restart_metrics(metrics, start)
    if start == 0:
        base = held_out_accuracy(model, tokenizer, held_out, cfg, "held-out, base model")
        rows = [{"step": 0, "held_out": base}]
        if is_main():
            tasks.append_jsonl(metrics, rows[0])
            print(
                f"base model held-out: strict {base['strict']:.3f} flexible {base['flexible']:.3f}"
            )
    last = rows[-1]
    steps = range(start, cfg.steps)
    bar = tqdm(
        steps, initial=start, total=cfg.steps, desc="svf", file=sys.stderr, disable=not is_main()
    )
    for step in bar:
        t = time.time()
        with autocast(device, dtype):
            loss, n_tokens = batch_loss(model, tokenizer, z, (records, examples, known), cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        check_finite(loss, step, z)  # before any row or state of this step is written
        stats["train_s"] += time.time() - t
        stats["tokens"] += int(all_sum(n_tokens))
        tok_s = stats["tokens"] / stats["train_s"]
        loss_value = all_sum(loss.item()) / world()  # the global batch's loss (sft: its mean)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:.0f}")
        last = {"step": step + 1, "loss": loss_value, "tokens_per_s": tok_s}
        done = step + 1 == cfg.steps
        if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            acc = held_out_accuracy(model, tokenizer, held_out, cfg, f"held-out, step {step + 1}")
            last["held_out"] = acc
            if is_main():
                bar.write(
                    f"step {step + 1}: held-out strict {acc['strict']:.3f} "
                    f"flexible {acc['flexible']:.3f}",
                    file=sys.stderr,
                )
        if is_main():  # rank 0 alone writes
            tasks.append_jsonl(metrics, last)
        if done or (step + 1) % cfg.save_every == 0:  # every rank: FSDP2 gathers, rank 0 writes
            save_state(state, z, optimizer, step + 1, stats, config=cfg)
    bar.close()
    return last, stats


# -----------------------------------------------------------------------------


def main(cfg: Config):
    targets = check_config(cfg)
    train_records, held_out, known_records = read_data(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg = dataclasses.replace(cfg, out=str(out))  # the resolved copy is what config.json records
    device = setup_distributed(resolve_device(cfg.device))  # torchrun: one process per rank
    if cfg.mix_known and cfg.known_batch < world():
        raise cli.ConfigError(f"--known-batch must be at least the {world()} processes")
    folder = checkpoints.resolve(cfg.ckpt)
    check_context(folder, {"--max-new-tokens": cfg.max_new_tokens})
    check_targets(folder, targets)  # before --out is made
    if is_main():  # never a folder that holds what this run reads
        inputs = [folder, cfg.data, cfg.eval_data, *filter(None, [cfg.mix_known])]
        open_run(out, cfg, cfg.resume, cfg.overwrite, inputs=inputs)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)

    identity = checkpoints.identity(folder)
    model, tokenizer = model_lib.load(folder, device=device, dtype=dtype)
    palora.find_targets(model, targets)  # an unknown target name fails here, before the SVD
    records, examples = encode_examples(train_records, tokenizer, cfg.max_len, cfg.data)
    known = encode_examples(known_records, tokenizer, cfg.max_len, cfg.mix_known)[1]
    n_model = sum(p.numel() for p in model.parameters())  # before SVF replaces the target weights
    z = attach_svf(model, identity, targets, cfg.svd_cache, n_model)
    n_trainable = sum(p.numel() for p in z.values())

    t0 = time.time()
    trained = wrap(model, cfg.parallel)  # under torchrun DDP or FSDP2, else the model itself
    if cfg.parallel == "fsdp":  # fully_shard replaced the parameters by shards: train those
        z = {n: model.get_submodule(n).z for n in z}
    last, stats = train(trained, tokenizer, z, (records, examples, known, held_out), cfg, out)
    final = last.get("held_out") or held_out_accuracy(model, tokenizer, held_out, cfg, "held-out")
    summary = {
        "held_out": final,
        "final_loss": last.get("loss"),
        "steps": cfg.steps,
        "trainable": n_trainable,
        "model_parameters": n_model,
        "share": n_trainable / n_model,
        "wall_s": time.time() - t0,
        "train_s": stats["train_s"],
        "tokens_per_s": stats["tokens"] / max(stats["train_s"], 1e-9),
        "device": str(device),
        "dtype": str(dtype),
    }
    finish(z, cfg, identity, targets, summary)
    return summary


def attach_svf(model, identity: str, targets: tuple, cache: str, n_model: int) -> dict:
    """Each target W replaced by its SVD factors and a trainable z (W is freed: memory ~1.3x W),
    everything else frozen -> name -> z."""
    with main_first():  # rank 0 computes and caches the SVDs; the others read them
        svds = adapters.svds(model, targets, identity, cache)
    z = palora.add_svf(model, svds)  # name -> Parameter (S,), float32, initialised at 1
    for p in model.parameters():
        p.requires_grad_(False)
    for p in z.values():
        p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in z.values())
    if is_main():
        share = n_trainable / n_model
        print(f"trainable z: {n_trainable:,} parameters in {len(z)} matrices, {100 * share:.4f}%")
    return z


def finish(z: dict, cfg: Config, identity: str, targets: tuple, summary: dict):
    """The expert (svf.safetensors, its metadata naming the checkpoint, targets, data, steps and
    held-out score) and summary.json; every rank gathers z (FSDP2), rank 0 writes."""
    meta = {
        "ckpt": str(cfg.ckpt),
        "targets": ",".join(targets),
        "data": cfg.data,
        "steps": str(cfg.steps),
        "held_out": json.dumps(summary["held_out"]),
    }
    z = {n: full(p) for n, p in z.items()}  # every rank: FSDP2's shards gathered whole
    if is_main():
        out = Path(cfg.out)
        adapters.save_svf(out / "svf.safetensors", z, identity, meta)
        tasks.atomic_write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    cli.run(main, cli.parse_config(Config, description=__doc__.split("\n")[0]))
    teardown()
