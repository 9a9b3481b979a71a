"""The tokenizer of a Hugging Face checkpoint folder: tokenizer.json through the `tokenizers`
library, and the chat
template from tokenizer_config.json (or chat_template.jinja) rendered by jinja2 with the environment
transformers
uses, so that prompts are byte-for-byte the ones the model was tuned on (tests/test_model.py checks
both against
transformers). model.load returns one beside the model.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2.ext
import jinja2.sandbox
import tokenizers

from checkpoints import CheckpointError, read_json


def chat_template(folder: Path, config: dict):
    """The checkpoint's jinja2 chat template, compiled with the environment transformers uses to
    render it."""
    source = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # where transformers>=4.43 saves it
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(source, list):  # several named templates
        source = next((t["template"] for t in source if t["name"] == "default"), None)
    if source is None:
        return None

    def raise_exception(
        message,
    ):  # templates call it to reject a conversation, e.g. roles out of order
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x, ensure_ascii=False, indent=None, separators=None, sort_keys=False
    ):  # jinja's own escapes HTML
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt)
    )
    return env.from_string(source)


class Tokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder / 'tokenizer.json'}: file not found")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise CheckpointError(f"{folder / 'tokenizer.json'}: unreadable ({e})") from None
        config = read_json(folder / "tokenizer_config.json", default={})
        self.folder, self.chat_template = folder, chat_template(folder, config)
        # special tokens are strings or {"content": ...} dicts; templates read them as bos_token,
        # eos_token, ...
        self.special = {
            k: v["content"] if isinstance(v, dict) else v
            for k, v in config.items()
            if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v is not None
        }
        ids = {k: self.tokenizer.token_to_id(v) for k, v in self.special.items()}
        self.bos_id = ids.get("bos_token")
        self.eos_ids = {ids["eos_token"]} if ids.get("eos_token") is not None else set()
        for name in (
            "generation_config.json",
            "config.json",
        ):  # Llama 3.1 lists several: end of turn, of text, ...
            eos = read_json(folder / name, default={}).get("eos_token_id")
            self.eos_ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = (
            ids["pad_token"] if ids.get("pad_token") is not None else min(self.eos_ids, default=0)
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, with a BOS only where tokenizer.json's post-processor adds one (HF's encode
        does the same).
        Text from apply_chat_template holds its special tokens already: encode it with
        add_special_tokens=False."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # no clean_up_tokenization_spaces: transformers>=5 ignores it for BPE tokenizers (it
        # corrupts text)
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise CheckpointError(f"{self.folder / 'tokenizer_config.json'}: no chat_template")
        return self.chat_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.special,
        )
