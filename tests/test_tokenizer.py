"""tokenizer.py against transformers' AutoTokenizer on a tiny byte-level BPE (tests/tiny.py): ids,
decoding, the chat template and the special ids, with and without a BOS-adding post-processor.
CPU only, no downloads."""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.tiny import CORPUS, make_tokenizer
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# uses bos_token, raise_exception and indented blocks (trim_blocks/lstrip_blocks matter)
LLAMA3_LIKE = (
    "{{ bos_token }}\n{% for message in messages %}\n    {% if message['role'] not in ['system', "
    "'user', 'assistant'] %}\n"
    "        {{ raise_exception('unknown role ' + message['role']) }}\n    {% endif %}\n"
    "    {{ '<|im_start|>' + message['role'] + '\\n\\n' + message['content'] | trim + '<|im_end|>' "
    "}}\n"
    "{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}"
)


def with_bos_template(folder, tmp_path):
    """A copy whose tokenizer adds BOS on encode (as Llama 3's does) and whose chat template writes
    bos_token."""
    copy = Path(shutil.copytree(folder, tmp_path / "bos"))
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}
        },
    }
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=LLAMA3_LIKE)))
    return copy


@pytest.mark.parametrize("variant", ["chatml", "bos_and_template"])
def test_tokenizer_matches_transformers(folder, tmp_path, variant):
    folder = folder if variant == "chatml" else with_bos_template(folder, tmp_path)
    ours, theirs = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in CORPUS + ["unseen wörds 99 \t\n", "<|im_start|>user\nhi<|im_end|>", ""]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(
            text, add_special_tokens=False
        )
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    chats = [
        [{"role": "user", "content": "What is 7 * 6?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi "},
            {"role": "assistant", "content": "Hello"},
        ],
    ]
    for chat in chats:
        for gen in (True, False):
            assert ours.apply_chat_template(
                chat, add_generation_prompt=gen
            ) == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    assert (ours.bos_id, ours.eos_ids, ours.pad_id) == (
        theirs.bos_token_id,
        {theirs.eos_token_id},
        theirs.pad_token_id,
    )
    if variant != "chatml":
        with pytest.raises(Exception, match="unknown role tool"):
            ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_a_torn_tokenizer_json_is_a_checkpoint_error_naming_it(folder, tmp_path):
    """The Rust reader raises a bare Exception: refused as the checkpoint's fault, one line."""
    from checkpoints import CheckpointError

    copy = shutil.copytree(folder, tmp_path / "torn")
    (copy / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: unreadable"):
        Tokenizer(copy)
