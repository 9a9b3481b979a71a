"""A Llama / Mistral decoder that loads Hugging Face checkpoints key for key, its tokenizer, and generation.

Read top to bottom: config -> layers -> model -> generation -> loading -> command line (the tokenizer: tokenizer.py).
References:
- Llama 2/3: https://arxiv.org/abs/2307.09288, https://arxiv.org/abs/2407.21783 (llama3 rope scaling)
- Mistral 7B (grouped-query attention, sliding window): https://arxiv.org/abs/2310.06825
- RoPE https://arxiv.org/abs/2104.09864, RMSNorm https://arxiv.org/abs/1910.07467, SwiGLU https://arxiv.org/abs/2002.05202
- transformers models/llama/modeling_llama.py: module names and the rotate_half rope layout, so checkpoints load
  with no weight permutation. safetensors format: https://github.com/huggingface/safetensors

Run:  python model.py "What is the capital of France?"          (default checkpoint smollm2_135m)
      python model.py --ckpt path/to/hf_folder --dtype bfloat16 --temperature 0.7 "Tell me a story"

Dimension letters: B batch, T query positions, S key positions (cache slots), D hidden size, H query heads,
Hkv key/value heads, Dh head size, F MLP hidden size, V vocabulary. Linear weights are (out, in).
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import CheckpointError, identity, read_json, resolve
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: the checkpoint's config.json, read through an explicit key map

REQUIRED = object()
CONFIG_KEYS = {  # config.json key -> its default when absent (HF's), or REQUIRED
    "vocab_size": REQUIRED, "hidden_size": REQUIRED, "intermediate_size": REQUIRED, "num_hidden_layers": REQUIRED,
    "num_attention_heads": REQUIRED, "rms_norm_eps": REQUIRED, "max_position_embeddings": REQUIRED,
    "num_key_value_heads": None,  # None -> num_attention_heads (no GQA)
    "head_dim": None,  # None -> hidden_size // num_attention_heads
    "tie_word_embeddings": False,  # Llama 3.2 1B/3B and SmolLM2 share lm_head with the embedding
}
ARCHITECTURES = {  # config.json architectures[0] -> the keys it adds, with HF's default
    "LlamaForCausalLM": {},
    # sliding_window null = full attention; HF's num_key_value_heads default (8) is Mistral 7B's size: require it
    "MistralForCausalLM": {"sliding_window": 4096, "num_key_value_heads": REQUIRED},
}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None
    head_dim: int | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3 rope: the LLAMA3_ROPE_KEYS
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 keys before it

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, config: dict, source="config.json") -> "ModelArgs":
        arch = config.get("architectures", ["(missing key 'architectures')"])[0]
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{source}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
        if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias") or config.get("mlp_bias"):
            raise CheckpointError(f"{source}: only hidden_act 'silu' without attention or MLP biases is supported")
        # rope: transformers>=5 writes rope_parameters (theta inside); Hub files write rope_theta + rope_scaling
        rope = config.get("rope_parameters") or dict(config.get("rope_scaling") or {}, rope_theta=config.get("rope_theta"))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise CheckpointError(f"{source}: unsupported rope type {kind!r} (supported: default, llama3)")
        values = {k: config.get(k, default) for k, default in (CONFIG_KEYS | ARCHITECTURES[arch]).items()}
        scaling = {k: rope.get(k, REQUIRED) for k in LLAMA3_ROPE_KEYS} if kind == "llama3" else {}
        missing = [k for k, v in (values | scaling).items() if v is REQUIRED]
        if missing:
            raise CheckpointError(f"{source}: missing key {missing[0]!r} (needed for {arch})")
        return cls(**values, rope_theta=rope.get("rope_theta") or 10000.0, rope_scaling=scaling or None)


# -----------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back before the weight, as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_frequencies(args: ModelArgs, device) -> torch.Tensor:
    """theta_i = base^(-2i/Dh), (Dh/2,) float32. llama3 keeps short wavelengths, divides long ones by `factor`
    and interpolates in between (Llama 3 paper, sec. 3.3; HF _compute_llama3_parameters)."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim)
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    ratio = s["original_max_position_embeddings"] * inv_freq / (2 * torch.pi)  # old context / wavelength
    smooth = ((ratio - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, Dh) in `dtype`; the angles are float32 so long positions stay exact."""
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, Dh): rotate_half pairs dim i with i + Dh/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, Dh) -> x * cos + rotate_half(x) * sin, where rotate_half(a, b) = (-b, a)."""
    a, b = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    return x * cos + torch.cat((-b, a), dim=-1) * sin


def causal_mask(valid, q_slots, num_keys: int, window: int | None):
    """Which keys each query sees: (B or 1, 1, T, S) bool, or None when plain causal attention will do.

    valid (B, S) marks real tokens (False = left padding); q_slots (T,) are the queries' slots among the S keys.
    A padding query would see no key at all (NaN in some kernels), so it sees itself; its output is never used.
    """
    if valid is None and window is None:
        return None
    k, q = torch.arange(num_keys, device=q_slots.device), q_slots[:, None]  # (S,), (T, 1)
    allowed = (k <= q) & (k > q - window) if window else k <= q  # (T, S)
    return allowed if valid is None else (allowed & valid[:, None, None, :]) | (k == q)  # (B, 1, T, S)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, Hkv, self.head_dim = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = nn.Linear(D, H * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, Hkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, Hkv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(H * self.head_dim, D, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, T, H*Dh) -> (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: write slots start..start+T-1 of the preallocated cache, read its prefix
            k_cache, v_cache = cache  # (B, Hkv, S_max, Dh) each
            k_cache[:, :, start:start + T], v_cache[:, :, start:start + T] = k, v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # (B, Hkv, S, Dh)
        # enable_gqa: each group of H/Hkv query heads shares a key/value head. Without a mask either T == S
        # (training, prefill: causal) or T == 1 (a new token sees every slot), so is_causal is right in both cases.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, Dh) -> (B, T, H*Dh) -> (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), (B, T, D) -> (B, T, F) -> (B, T, D)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(  # named like HF's LlamaModel, so state_dict keys are the checkpoint's keys
            embed_tokens=nn.Embedding(args.vocab_size, args.hidden_size),
            layers=nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers)),
            norm=RMSNorm(args.hidden_size, args.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens, attention_mask=None):
        """tokens (B, T), attention_mask (B, T) with 1 = token, 0 = left padding -> logits (B, T, V)."""
        B, T = tokens.shape
        slots = torch.arange(T, device=tokens.device)
        if attention_mask is None:
            valid, positions = None, slots.expand(B, T)
        else:  # left padding: a row's first real token is position 0 (HF: cumsum of the mask)
            valid, positions = attention_mask.bool(), (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.model.embed_tokens(tokens)  # (B, T, D)
        cos, sin = rope_cos_sin(rope_frequencies(self.args, tokens.device), positions, h.dtype)
        mask = causal_mask(valid, slots, T, self.args.sliding_window)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.model.norm(h))  # (B, T, D) -> (B, T, V)

    def new_cache(self, batch_size: int, max_len: int):
        """Per layer a (key, value) pair of (B, Hkv, S_max, Dh) buffers, in the model's device and dtype."""
        shape = (batch_size, self.args.num_key_value_heads, max_len, self.args.head_dim)
        w = self.model.embed_tokens.weight
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in self.model.layers]

    def forward_cached(self, tokens, start, cos, sin, valid, cache):
        """tokens (B, T) fill cache slots start..start+T-1 -> logits of the last one (B, V). Used by generate only.

        cos, sin (B, 1, S_max, Dh) and valid (B, S_max) (or None: no padding) describe every slot of the cache.
        """
        T = tokens.shape[1]
        slots = torch.arange(start, start + T, device=tokens.device)
        mask = causal_mask(None if valid is None else valid[:, :start + T], slots, start + T, self.args.sliding_window)
        cos, sin = cos[:, :, start:start + T], sin[:, :, start:start + T]  # (B, 1, T, Dh)
        h = self.model.embed_tokens(tokens)  # (B, T, D)
        for layer, layer_cache in zip(self.model.layers, cache):
            h = layer(h, cos, sin, mask, layer_cache, start)
        return self.lm_head(self.model.norm(h[:, -1]))  # (B, D) -> (B, V)


# -----------------------------------------------------------------------------
# generation


def sample(logits, temperature: float, top_p: float, generator=None):
    """logits (B, V) -> tokens (B,): argmax if temperature == 0, else nucleus sampling with HF's rule (drop a token
    when the tokens more likely than it already hold top_p of the mass; the most likely one always stays)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = F.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)  # (B, V)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]  # multinomial renormalises


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, eos_ids, temperature=0.0, top_p=1.0, generator=None):
    """prompts: lists of token ids, left-padded into one batch -> each row's new tokens, cut before its first eos."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    w = model.model.embed_tokens.weight
    B, P, S = len(prompts), max(map(len, prompts)), max(map(len, prompts)) + max_new_tokens
    pad = torch.tensor([P - len(p) for p in prompts], device=w.device)  # (B,)
    tokens = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=w.device)  # (B, P)
    slots = torch.arange(S, device=w.device)
    valid = slots >= pad[:, None] if pad.any() else None  # (B, S): the slot holds a real token
    cos, sin = rope_cos_sin(rope_frequencies(model.args, w.device), (slots - pad[:, None]).clamp(min=0), w.dtype)
    cache, eos = model.new_cache(B, S), torch.tensor(sorted(eos_ids), dtype=torch.long, device=w.device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=w.device)
    done = torch.zeros(B, dtype=torch.bool, device=w.device)
    logits = model.forward_cached(tokens, 0, cos, sin, valid, cache)  # the whole prompt at once: (B, V)
    for t in range(max_new_tokens):
        out[:, t] = next_token = sample(logits, temperature, top_p, generator)  # (B,)
        done |= torch.isin(next_token, eos)
        if t + 1 == max_new_tokens or done.all():  # rows that finished early keep going until all have
            break
        logits = model.forward_cached(next_token[:, None], P + t, cos, sin, valid, cache)
    rows = out[:, :t + 1].tolist()
    return [row[:next((i for i, x in enumerate(row) if x in eos_ids), len(row))] for row in rows]


# -----------------------------------------------------------------------------
# loading: config.json, then (sharded) safetensors read tensor by tensor into the final dtype and device

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A .safetensors file is a u64 header size, a JSON header {name: {dtype, shape, data_offsets}}, then raw
    little-endian data. -> (header, offset where the data starts)."""
    with open(path, "rb") as f:
        try:
            size = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(size)), 8 + size
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None


def read_safetensors(path: Path, out: dict, chunk_bytes=1 << 24):
    """Fill the tensors of `out` (name -> allocated tensor, any dtype and device) from one .safetensors file, through
    one 16 MiB buffer; no memory map, whose pages would stay resident beside the converted copies."""
    header, data_start = safetensors_header(path)
    with open(path, "rb") as f:
        for name, tensor in out.items():
            info = header.get(name)
            if info is None or info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} is " + ("not in this file" if info is None else
                                      f"of unsupported dtype {info['dtype']}"))
            if tuple(info["shape"]) != tuple(tensor.shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(info['shape'])}, expected "
                                      f"{tuple(tensor.shape)} from config.json")
            src = SAFETENSORS_DTYPES[info["dtype"]]
            f.seek(data_start + info["data_offsets"][0])
            flat, step = tensor.view(-1), chunk_bytes // src.itemsize
            buffer = torch.empty(min(step, flat.numel()), dtype=src)
            for i in range(0, flat.numel(), step):
                chunk = buffer[:min(step, flat.numel() - i)]
                if f.readinto(chunk.view(torch.uint8).numpy()) != chunk.numel() * src.itemsize:
                    raise CheckpointError(f"{path}: file ends inside tensor {name!r} (truncated?)")
                flat[i:i + chunk.numel()].copy_(chunk)  # converts to the target dtype and device


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the file holding it, from model.safetensors.index.json or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {name: folder / shard for name, shard in read_json(index).get("weight_map", {}).items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
        return files
    if (folder / "model.safetensors").is_file():
        names = safetensors_header(folder / "model.safetensors")[0].keys() - {"__metadata__"}
        return {name: folder / "model.safetensors" for name in names}
    raise CheckpointError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def load(ckpt, device=None, dtype=None):
    """A checkpoint folder or name (checkpoints.resolve) -> (Transformer, Tokenizer); dtype default float32."""
    folder, device = resolve(ckpt), torch.device(device or "cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    config_path = folder / "config.json"
    args = ModelArgs.from_hf_config(read_json(config_path), source=config_path)
    with torch.device("meta"):  # shapes only: each weight is allocated once, below, in its final dtype and device
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    files = weight_files(folder)
    if args.tie_word_embeddings:  # the head is the embedding; some exporters store a copy anyway
        del expected["lm_head.weight"]
        files.pop("lm_head.weight", None)
    for names, problem in ((files.keys() - expected, "unexpected tensor"), (expected.keys() - files, "missing tensor")):
        if names:
            name = min(names)
            raise CheckpointError(f"{files.get(name, folder)}: {problem} {name!r} for the model in {config_path.name}")
    state = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in expected.items()}
    for path in sorted(set(files.values())):
        read_safetensors(path, {name: state[name] for name, p in files.items() if p == path})
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)  # assign: the meta parameters become these tensors
    if args.tie_word_embeddings:  # assign made two Parameters of one tensor: make them one, as in __init__
        model.lm_head.weight = model.model.embed_tokens.weight
    model.folder, model.config_path, model.identity = folder, config_path, identity(folder)
    return model, Tokenizer(folder)


# -----------------------------------------------------------------------------
# command line: answer one prompt through the checkpoint's chat template


def main(argv=None):
    parser = argparse.ArgumentParser(description="Answer a prompt with a checkpoint, through its chat template.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--ckpt", default="smollm2_135m", help="folder or name: smollm2_135m, llama31_8b, mistral_7b")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.ckpt, args.device, args.dtype)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    answer = generate(model, [tokenizer.encode(prompt, add_special_tokens=False)], args.max_new_tokens, tokenizer.eos_ids,
                      args.temperature, args.top_p, torch.Generator(args.device).manual_seed(args.seed))
    print(tokenizer.decode(answer[0]))


if __name__ == "__main__":
    main()
