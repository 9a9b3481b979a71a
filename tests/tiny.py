"""Tiny random Hugging Face checkpoints for tests: written by transformers itself, so they are the
reference format.

    make_tiny_llama(path, tie=False) -> Path   LlamaForCausalLM, GQA, llama3 rope scaling, sharded
    safetensors
    make_tiny_mistral(path) -> Path            MistralForCausalLM, GQA, head_dim != hidden/heads,
    sliding window 5
    make_tokenizer(path) -> Path               byte-level BPE tokenizer.json + ChatML chat template
    (SmolLM2-like)
    write_jsonl(path, records) -> Path         one JSON object per line, as the scripts read their
    data

Every folder holds config.json, generation_config.json, model.safetensors.index.json with several
shards,
tokenizer.json and tokenizer_config.json. Special tokens: 0 <|endoftext|>, 1 <|im_start|> (bos), 2
<|im_end|> (eos).
Builds in well under a second on CPU; no downloads.
"""

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# model vocabulary: the tokenizer's 300 ids plus unused rows, as real checkpoints pad theirs
VOCAB_SIZE = 320
CHATML = (  # SmolLM2-135M-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 + 678 = 7023!",
    "def add(a, b):\n    return a + b  # code, with    spaces",
    "Ünïcödé: café, naïve, 東京, emoji 🙂, and ‘quotes’.",
    "Question: what is 7 * 6? Answer: 42.",
]
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    # not HF's defaults (1e-6, 10000), so that a model.py ignoring either fails the parity tests
    rms_norm_eps=1e-3,
    rope_theta=5e5,
)


def make_tokenizer(path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def _save(model, path, max_shard_size) -> Path:
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return make_tokenizer(path)


def make_tiny_llama(path, tie=False, seed=0, max_shard_size="100KB") -> Path:
    """Llama 3.1-style: GQA (4 heads, 2 KV heads), rope_scaling llama3 with a short original context
    (64), so that all three frequency bands occur for head_dim 16 and rope_theta 5e5: the
    wavelength 2π/θ_i of pair 0 (6.3) is under 64/high_freq_factor = 16 (kept), pair 1's (32) lies
    between 16 and 64/low_freq_factor = 64 (interpolated), pairs 2-7 (167 and up) are over 64
    (divided by factor). test_model.py checks it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **COMMON,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    )
    return _save(LlamaForCausalLM(config).eval(), path, max_shard_size)


def make_tiny_mistral(path, seed=0, sliding_window=5, max_shard_size="100KB") -> Path:
    """Mistral-style: GQA, head_dim 24 (not hidden/heads = 16), a sliding window shorter than the
    test sequences."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        **COMMON, head_dim=24, sliding_window=sliding_window, max_position_embeddings=128
    )
    return _save(MistralForCausalLM(config).eval(), path, max_shard_size)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
