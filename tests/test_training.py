"""Tests for training.py: the run folder (open_run), the targets parser, state files that are never
non-finite and fail with one error naming them, metrics rows, and the per-step generator. CPU,
ms."""

import dataclasses
import fcntl
import json
import math
import os

import pytest
import torch

import model as model_lib
import training
from checkpoints import CheckpointError, read_json
from cli import ConfigError
from tasks import IGNORE_INDEX, DataError

pytestmark = pytest.mark.usefixtures("seeded")


@dataclasses.dataclass
class Cfg:
    lr: float = 0.005
    steps: int = 10
    out: str = ""
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False


def params_and_optimizer():
    params = {"a": torch.nn.Parameter(torch.randn(3)), "b": torch.nn.Parameter(torch.randn(2, 2))}
    optimizer = torch.optim.Adam(list(params.values()), lr=0.1)
    sum(p.sum() for p in params.values()).backward()
    optimizer.step()
    return params, optimizer


def finished(out, cfg):
    """A run folder as a script leaves it: config.json, a state saved under cfg, metrics."""
    training.open_run(out, cfg, resume=False, overwrite=False)
    params, optimizer = params_and_optimizer()
    training.save_state(out / "state.safetensors", params, optimizer, 1, config=cfg)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')


@pytest.mark.parametrize(
    "text, want",
    [
        ("gate_proj,up_proj", ("gate_proj", "up_proj")),
        (" up_proj , ,down_proj,up_proj,", ("up_proj", "down_proj")),
    ],
)
def test_parse_targets(text, want):
    assert training.parse_targets(text) == want


@pytest.mark.parametrize("text", ["", ",", " , ,"])
def test_parse_targets_refuses_no_name(text):
    with pytest.raises(ConfigError, match="--targets: no target name"):
        training.parse_targets(text)


def test_a_fresh_run_writes_its_config_first(tmp_path):
    out = training.open_run(tmp_path / "run", Cfg(out="x"), resume=False, overwrite=False)
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(Cfg(out="x"))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]


def test_another_process_holding_the_folder_is_refused(tmp_path):
    (tmp_path / ".lock").touch()
    with open(tmp_path / ".lock") as held:  # a second open file description: as another process
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another run holds this folder"):
            training.open_run(tmp_path, Cfg(), resume=False, overwrite=False)


def test_orphan_tmp_files_of_this_run_are_removed(tmp_path):
    """A killed atomic write leaves .<name>.<8 chars>.tmp: removed from the run folder's top level
    once the folder is accepted as this run's; a subfolder's files are not the run's to judge."""
    finished(tmp_path, Cfg())
    (tmp_path / ".state.safetensors.k3j2ab_x.tmp").write_bytes(b"half")
    (tmp_path / "epochs").mkdir()
    (tmp_path / "epochs" / ".adapter.abcd1234.tmp").write_bytes(b"half")
    training.open_run(tmp_path, Cfg(), resume=True, overwrite=False)
    assert [p.name for p in tmp_path.rglob("*.tmp")] == [".adapter.abcd1234.tmp"]


def test_a_folder_killed_writing_its_config_counts_as_empty(tmp_path):
    (tmp_path / ".config.json.abcd1234.tmp").write_text("{")
    training.open_run(tmp_path, Cfg(), resume=False, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.json"]


def tree(root) -> dict:
    """Every path under root -> its bytes (None for a folder, the target for a symlink)."""
    return {
        str(p.relative_to(root)): (
            os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        )
        for p in root.rglob("*")
    }


def users_folder(root):
    """A folder of the user's: files, tmp files (one named as our atomic writes name theirs) and a
    subfolder."""
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / ".draft.tmp").write_text("mine")
    (root / ".notes.txt.abcd1234.tmp").write_text("mine")
    (root / "sub" / ".adapter.x.tmp").write_text("mine")
    return root


@pytest.mark.parametrize(
    "resume, overwrite, refusal",
    [
        (False, False, "not empty"),
        (False, True, "holds no config.json, so it is not a run folder"),
        (True, False, "nothing to resume from"),
    ],
)
def test_a_refused_folder_is_left_as_it_was(tmp_path, resume, overwrite, refusal):
    """Refused before anything is written or removed: no tmp file of the user's removed, no .lock
    left behind."""
    out = users_folder(tmp_path / "mine")
    before = tree(out)
    with pytest.raises(ConfigError, match=refusal):
        training.open_run(out, Cfg(), resume=resume, overwrite=overwrite)
    assert tree(out) == before


def test_a_refused_resume_creates_no_folder(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume from"):
        training.open_run(tmp_path / "new", Cfg(), resume=True, overwrite=False)
    assert not (tmp_path / "new").exists()


def test_a_used_folder_needs_resume_or_overwrite(tmp_path):
    finished(tmp_path, Cfg())
    with pytest.raises(ConfigError, match=f"{tmp_path}: not empty.*--resume.*--overwrite"):
        training.open_run(tmp_path, Cfg(lr=0.001), resume=False, overwrite=False)
    training.open_run(tmp_path, Cfg(lr=0.001), resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.json"]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.001


def test_a_lone_config_counts_as_empty(tmp_path):
    training.open_run(tmp_path, Cfg(), resume=False, overwrite=False)  # killed before it trained
    training.open_run(tmp_path, Cfg(lr=0.1), resume=False, overwrite=False)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.1


def test_overwrite_empties_run_folders_only(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a run folder"):
        training.open_run(tmp_path, Cfg(), resume=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@dataclasses.dataclass
class OtherCfg:
    """Another script's config: a folder it ran in is not this script's to empty."""

    facts: str = "facts.jsonl"
    lr: float = 0.005
    out: str = ""
    resume: bool = False
    overwrite: bool = False


def checkpoint(folder):
    """A Hugging Face checkpoint folder: config.json (no run config), weights, a tokenizer."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_checkpoint_folder_is_never_emptied_nor_its_config_replaced(tmp_path, overwrite):
    """Every HF checkpoint holds a config.json: --overwrite empties only a folder whose config.json
    is a run config of this script, and a config.json that is not one is never replaced."""
    ckpt = checkpoint(tmp_path / "ckpt")
    before = tree(ckpt)
    with pytest.raises(ConfigError, match=r"ckpt/config\.json: not a run config of this script"):
        training.open_run(ckpt, Cfg(), resume=False, overwrite=overwrite)
    (ckpt / "model.safetensors").unlink()  # a lone config.json, not a run's: not replaced either
    with pytest.raises(ConfigError, match="not a run config of this script"):
        training.open_run(ckpt, Cfg(), resume=False, overwrite=overwrite)
    del before["model.safetensors"]
    assert tree(ckpt) == before


def test_overwrite_never_empties_another_scripts_run(tmp_path):
    finished(tmp_path, OtherCfg())
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match="not a run config of this script"):
        training.open_run(tmp_path, Cfg(), resume=False, overwrite=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("used", ["data/train.jsonl", "svf.safetensors", "ckpt"])
def test_a_folder_holding_an_input_is_never_emptied(tmp_path, used):
    """--out equal to the checkpoint folder, to the expert's or a data file's folder, or an ancestor
    of one of them: refused, even when it is a run folder of this script."""
    out = tmp_path / "run"
    finished(out, Cfg())
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n")
    (out / "svf.safetensors").write_bytes(b"z")
    checkpoint(out / "ckpt")
    inputs = ["", "none", str(out / used)]  # unset and "none" file flags name no input
    before = tree(out)
    with pytest.raises(
        ConfigError, match=f"^--out: {out} holds {out / used}, which this run reads"
    ):
        training.open_run(out, Cfg(), resume=False, overwrite=True, inputs=inputs)
    assert tree(out) == before
    with pytest.raises(ConfigError, match=f"--out: {out / 'ckpt'} holds {out / 'ckpt'}"):
        training.open_run(out / "ckpt", Cfg(), False, True, inputs=[str(out / "ckpt")])


@pytest.mark.parametrize(
    "text", ["[" * 100_000, "1" + "0" * 5000, "{not json"], ids=["deep", "huge int", "torn"]
)
def test_an_unreadable_config_json_is_one_error_naming_it(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config\.json: unreadable run config"):
        training.open_run(tmp_path, Cfg(), resume=False, overwrite=False)
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read JSON"):
        read_json(tmp_path / "config.json")


def test_a_lock_symlink_is_never_followed(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"run/\.lock: a symlink"):
        training.open_run(tmp_path / "run", Cfg(), resume=False, overwrite=False)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("what", ["file", "dangling symlink"])
def test_out_that_is_no_folder_is_refused(tmp_path, what):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("mine")
    else:
        out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="--out: .*/out is not a folder"):
        training.open_run(out, Cfg(), resume=False, overwrite=True)
    assert not (tmp_path / "nowhere").exists()


def test_resume_names_every_field_that_differs(tmp_path):
    finished(tmp_path, Cfg())
    changed = Cfg(lr=0.001, steps=20, device="cuda", out="elsewhere")  # device and out may differ
    with pytest.raises(ConfigError, match=r"--lr 0\.005 -> 0\.001, --steps 10 -> 20$"):
        training.open_run(tmp_path, changed, resume=True, overwrite=False)
    training.open_run(tmp_path, Cfg(device="cuda", out="elsewhere"), resume=True, overwrite=False)


def test_resume_needs_a_state(tmp_path):
    training.open_run(tmp_path, Cfg(), resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="state.safetensors: nothing to resume from"):
        training.open_run(tmp_path, Cfg(), resume=True, overwrite=False)


def test_a_state_saved_by_another_config_is_never_resumed(tmp_path):
    """An old run's state beside a new run's config.json (what a kill before the new run's first
    save left when config.json was written after the state, or the state never removed)."""
    finished(tmp_path, Cfg(lr=0.1))
    training.atomic_write_json(tmp_path / "config.json", dataclasses.asdict(Cfg()))
    with pytest.raises(ConfigError, match=r"saved by another run.*--lr 0\.1 -> 0\.005"):
        training.open_run(tmp_path, Cfg(), resume=True, overwrite=False)


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        training.open_run(tmp_path, Cfg(), resume=True, overwrite=True)


def test_state_round_trip_and_non_finite_is_never_saved(tmp_path):
    params, optimizer = params_and_optimizer()
    training.save_state(tmp_path / "s.safetensors", params, optimizer, 7, {"k": 1})
    fresh = {n: torch.nn.Parameter(torch.zeros_like(p)) for n, p in params.items()}
    fresh_opt = torch.optim.Adam(list(fresh.values()), lr=0.1)
    assert training.load_state(tmp_path / "s.safetensors", fresh, fresh_opt) == (7, {"k": 1})
    assert all(torch.equal(fresh[n], params[n]) for n in params)
    with torch.no_grad():
        params["b"][0, 0] = math.inf
    with pytest.raises(FloatingPointError, match="b is not finite"):
        training.save_state(tmp_path / "s.safetensors", params, optimizer, 8)
    assert training.load_state(tmp_path / "s.safetensors", fresh, fresh_opt)[0] == 7


@pytest.mark.parametrize("cut", [4, 60, -8])  # inside the length, the header, the data
def test_a_truncated_state_is_one_error_naming_the_file(tmp_path, cut):
    params, optimizer = params_and_optimizer()
    path = tmp_path / "state.safetensors"
    training.save_state(path, params, optimizer, 1)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ConfigError, match=rf"{path}: unreadable training state"):
        training.load_state(path, params, optimizer)


def test_check_finite_sees_loss_and_parameters():
    z = {"a": torch.ones(2)}
    training.check_finite(torch.tensor(1.0), 0, z)
    with pytest.raises(FloatingPointError, match="step 3: loss is nan"):
        training.check_finite(torch.tensor(math.nan), 2, z)
    z["a"][1] = math.inf
    with pytest.raises(FloatingPointError, match="step 1: a is not finite"):
        training.check_finite(torch.tensor(1.0), 0, z)


def test_restart_metrics_keeps_rows_up_to_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)))
    assert [r["step"] for r in training.restart_metrics(path, 2)] == [0, 1, 2]
    assert path.read_text().count("\n") == 3
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(DataError, match=rf"{path}:3: malformed metrics row"):
        training.restart_metrics(path, 2)


def test_step_generator_is_a_function_of_seed_and_step():
    def draw(seed, step):
        return torch.rand(4, generator=training.step_generator(seed, step, "cpu"))

    torch.manual_seed(1)
    first = draw(0, 5)
    torch.manual_seed(2)
    assert torch.equal(first, draw(0, 5))
    assert not torch.equal(first, draw(0, 6)) and not torch.equal(first, draw(1, 5))


def test_answer_loss_is_the_full_logits_loss(tiny_ckpt):
    """The head runs on the answer positions alone; the loss is what the whole (B, T, V) logits
    give with the prompt and padding ignored (right padding, two rows of other lengths)."""
    model, _ = model_lib.load(tiny_ckpt, dtype=torch.float64)
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    labels = tokens.clone()
    labels[0, :4] = labels[1, :6] = IGNORE_INDEX  # prompts
    labels[1, 8:] = IGNORE_INDEX  # padding
    mask = (torch.arange(9) < torch.tensor([[9], [8]])).long()
    full = model(tokens, attention_mask=mask)[:, :-1].flatten(0, 1)  # (B (T-1), V)
    target = labels[:, 1:].flatten()
    want = torch.nn.functional.cross_entropy(full, target, ignore_index=IGNORE_INDEX)
    assert training.answer_loss(model, tokens, labels, mask).item() == pytest.approx(want.item())
    summed = training.answer_loss(model, tokens, labels, mask, total=3)
    assert summed.item() == pytest.approx(want.item() * 7 / 3)  # 7 answer tokens predicted


def test_shared_columns_by_hand():
    tokens = torch.tensor([[5, 6, 7, 1], [5, 6, 8, 2]])
    ones = torch.ones(2, 4, dtype=torch.long)
    answers_from = lambda c: (torch.arange(4) >= c).expand(2, 4)  # noqa: E731
    assert training.shared_columns(tokens, ones, answers_from(3)) == 2  # rows differ at column 2
    assert training.shared_columns(tokens, ones, answers_from(1)) == 1  # column 1 predicts
    padded = ones.clone()
    padded[1, 0] = 0
    assert training.shared_columns(tokens, padded, answers_from(3)) == 0  # a pad is not shared
    assert training.shared_columns(tokens[:1], ones[:1], answers_from(3)[:1]) == 0  # one row
    same = tokens[:1].expand(2, 4)
    assert training.shared_columns(same, ones, torch.zeros(2, 4, dtype=torch.bool)) == 3


def test_length_groups_by_hand():
    groups = training.length_groups(torch.tensor([14, 13, 8, 7]))  # areas 49, 44, 53, 56
    assert [g.tolist() for g in groups] == [[3, 2], [1, 0]]
    assert [g.tolist() for g in training.length_groups(torch.tensor([5, 5, 5]))] == [[0, 1, 2]]
    assert [g.tolist() for g in training.length_groups(torch.tensor([10, 3]))] == [[1], [0]]


def test_packed_answer_loss_is_the_same_loss_and_gradients(tiny_ckpt):
    """Four right-padded rows (14, 13, 8 and 7 tokens) opening with the same 5 tokens: packed, the
    prefix runs once in one row and the rows in two groups cut to 8 and 14 columns; the loss and
    every parameter's gradient are the full batch's (float64 weights; RMSNorm normalises in
    float32, as HF's, hence the gradients' tolerance)."""
    model, _ = model_lib.load(tiny_ckpt, dtype=torch.float64)
    tokens = torch.randint(0, model.args.vocab_size, (4, 14))
    tokens[:, :5] = tokens[0, :5]
    labels = tokens.clone()
    labels[:, :6] = IGNORE_INDEX  # prompts: the shared 5 tokens, then 1 of each row's own
    mask = (torch.arange(14) < torch.tensor([[14], [13], [8], [7]])).long()
    labels[mask == 0] = IGNORE_INDEX
    results = []
    for pack in (False, True):
        model.zero_grad()
        sizes = []
        hook = model.register_forward_pre_hook(
            lambda m, args, seen=sizes: seen.append(args[0].shape)
        )
        loss = training.answer_loss(model, tokens, labels, mask, pack=pack)
        hook.remove()
        loss.backward()
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}, sizes))
    (full, full_grads, full_sizes), (shared, shared_grads, shared_sizes) = results
    assert full_sizes == [(4, 14)] and shared_sizes == [(1, 5), (2, 3), (2, 9)]
    torch.testing.assert_close(shared, full, rtol=1e-12, atol=0)
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_answer_loss_counts_answer_tokens_only():
    V = 7

    def model(tokens, attention_mask=None, keep=None):
        logits = torch.nn.functional.one_hot(tokens.roll(-1, 1), V).float() * 50  # the next token
        return logits[keep]

    tokens = torch.tensor([[1, 2, 3, 4]])
    right = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    assert training.answer_loss(model, tokens, right, None).item() < 1e-6
    wrong_on_prompt = torch.tensor([[IGNORE_INDEX, 5, 3, 4]])  # token 2 is not what the model says
    assert training.answer_loss(model, tokens, wrong_on_prompt, None).item() > 1


def test_answer_all_shares_the_questions_out_and_keeps_their_order(monkeypatch):
    """ddp: this rank (1 of 2) answers every other question, rank 0's answers come back through
    gather, all in the questions' order; fsdp: every rank answers everything."""
    asked = []

    def answer(model, tokenizer, questions, *args, **kwargs):
        asked.append(questions)
        return [q.upper() for q in questions]

    monkeypatch.setattr(training.tasks, "answer", answer)
    monkeypatch.setattr(training, "world", lambda: 2)
    monkeypatch.setattr(training, "rank", lambda: 1)
    monkeypatch.setattr(training, "gather", lambda mine: [(0, "A"), (2, "C"), (4, "E"), *mine])
    questions = list("abcde")
    assert training.answer_all(None, None, questions, 4, 8, "ddp") == list("ABCDE")
    assert asked == [["b", "d"]]
    asked.clear()
    assert training.answer_all(None, None, questions, 4, 8, "fsdp") == list("ABCDE")
    assert asked == [questions]
