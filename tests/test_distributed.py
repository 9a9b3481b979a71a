"""train_svf.py and inject.py under torchrun (CPU, gloo, 2 processes, a tiny random Llama): the
same z and the same adapter as one process with the same global batch and seed; resume from a
2-process state in 1 process; rank 0 alone writes; each SVD computed once; FSDP2 (fully_shard per
block) gives DDP's adapter. One torchrun launch costs ~10 s on 2 shared cores (imports), so the
tests share launches where they can.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import inject
import runs
import train_svf

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

REPO = Path(__file__).resolve().parent.parent
# train_svf.py's command line with instruments: palora.svd counted per rank (in COUNTS, outside the
# run folder), and an optional stop inside step CRASH (0-based), after the state of an earlier step
DRIVER = """
import os, sys
sys.path.insert(0, {repo!r})
import cli, palora, train_svf, training
real_svd, calls = palora.svd, []
palora.svd = lambda W: calls.append(1) or real_svd(W)
crash = int(os.environ.get("CRASH", -1))
def check(loss, step, params=None):
    if step == crash:
        raise SystemExit(3)
train_svf.check_finite = check
try:
    cli.run(train_svf.main, cli.parse_config(train_svf.Config))
finally:
    with open(os.path.join(os.environ["COUNTS"], f"rank{{training.rank()}}"), "w") as f:
        f.write(str(len(calls)))
"""


def argv(cfg) -> list[str]:
    """A config as command-line flags (lists repeated, booleans --flag / --no-flag)."""
    out = []
    for name, value in vars(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def torchrun(script, args, env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [*cmd, str(script), *args], env=env, capture_output=True, text=True, cwd=REPO
    )
    if check and done.returncode:
        raise AssertionError(done.stderr[-4000:])
    return done


def svf_config(setup, out, cache, **overrides) -> train_svf.Config:
    """A global batch of 4 from 8 examples: 2 per rank, 2 batches per epoch."""
    settings = dict(
        ckpt=str(setup.ckpt),
        data=str(setup.train),
        eval_data=str(setup.test),
        steps=8,
        lr=0.1,
        batch_size=4,
        out=str(out),
        device="cpu",
        eval_every=4,
        eval_limit=3,
        max_new_tokens=4,
        eval_batch_size=2,
        save_every=3,
        svd_cache=str(cache),
    )
    return train_svf.Config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def svf_setup(tiny_ckpt, tmp_path_factory):
    from conftest import sums

    import tiny

    root = tmp_path_factory.mktemp("dist")
    train, test = (tiny.write_jsonl(root / f"{n}.jsonl", sums(8)) for n in ("train", "test"))
    return type("S", (), dict(ckpt=tiny_ckpt, train=train, test=test, root=root))


@pytest.fixture(scope="module")
def one_process(svf_setup):
    """The reference: one process, the same global batch and seed."""
    out = svf_setup.root / "one"
    train_svf.main(svf_config(svf_setup, out, svf_setup.root / "cache-one"))
    return load_file(out / "svf.safetensors")


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= tol, diff
    return diff


def test_two_processes_give_one_process_z_and_rank_0_alone_writes(svf_setup, one_process):
    out, cache = svf_setup.root / "two", svf_setup.root / "cache-two"
    torchrun("train_svf.py", argv(svf_config(svf_setup, out, cache)))
    z = load_file(out / "svf.safetensors")
    close(z, one_process, 1e-6)
    assert not all(torch.equal(t, torch.ones_like(t)) for t in z.values())  # z moved
    # one row per step, never two (0: the base model's scores, sharded and gathered: all 3 items)
    assert [r["step"] for r in rows(out)] == list(range(9))
    assert [r["held_out"]["n"] for r in rows(out) if "held_out" in r] == [3, 3, 3]
    written = {"config.json", "metrics.jsonl", "state.safetensors", "svf.safetensors"}
    assert {p.name for p in out.iterdir()} == written | {"summary.json", ".lock"}
    assert len(list((cache).rglob("*.safetensors"))) == 6  # 2 layers x 3 MLP matrices


def test_resume_from_two_processes_in_one_and_svd_computed_once(svf_setup, one_process, tmp_path):
    out, cache = tmp_path / "cut", tmp_path / "cache"
    (tmp_path / "counts").mkdir()
    (tmp_path / "driver.py").write_text(DRIVER.format(repo=str(REPO)))
    env = {"CRASH": "4", "COUNTS": str(tmp_path / "counts")}  # killed in step 5, state of step 3
    done = torchrun(tmp_path / "driver.py", argv(svf_config(svf_setup, out, cache)), env, False)
    assert done.returncode != 0 and not (out / "svf.safetensors").exists()
    counts = {p.name: int(p.read_text()) for p in (tmp_path / "counts").iterdir()}
    assert counts == {"rank0": 6, "rank1": 0}  # rank 0 computed, rank 1 read the cache
    train_svf.main(svf_config(svf_setup, out, cache, resume=True))  # one process now
    close(load_file(out / "svf.safetensors"), one_process, 1e-6)
    assert [r["step"] for r in rows(out)] == list(range(9))


def test_inject_two_processes_give_one_process_adapter(setup, tmp_path):
    cfg = runs.config(setup, tmp_path / "one", method="palora", epochs=3, batch_size=4)
    inject.main(cfg)
    two = runs.config(setup, tmp_path / "two", method="palora", epochs=3, batch_size=4)
    torchrun("inject.py", argv(two))
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    close(a, b, 1e-6)
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)  # B moved from 0
    assert [r["step"] for r in rows(tmp_path / "two")] == list(range(1, 7))


FSDP_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
import torch, adapters, palora, training, model as model_lib
training.setup_distributed(torch.device("cpu"))
torch.set_num_threads(1)
trained = {{}}
for how in ("ddp", "fsdp"):
    model, _ = model_lib.load({ckpt!r})
    svds = palora.svds(model)
    S = {{n: torch.arange(0, len(s), 2) for n, (_, s, _) in svds.items()}}  # every other one
    model.requires_grad_(False)
    _, params = adapters.attach(model, "palora", 4, 8.0, 0, svds, S)
    for p in params.values():
        p.requires_grad_(True)
    net = training.wrap(model, how)
    params = palora.lora_params(model)  # fully_shard replaced them by sharded (DTensor) ones
    if how == "fsdp":  # the frozen bases are sharded too: rank 0's rows of U_S, of all
        U_S = model.get_submodule(next(iter(svds))).U_S
        rows = U_S.to_local().shape[0], U_S.full_tensor().shape[0]  # a collective: every rank
        if training.is_main():
            print("SHARD", *rows)
    opt = torch.optim.Adam(list(params.values()), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        tokens = torch.randint(3, 300, (4, 12), generator=g)
        labels = tokens.clone()
        labels[:, :6] = -100
        mine = training.shard(list(range(4)))
        t, l = tokens[mine], labels[mine]
        loss = training.answer_loss(net, t, l, None, training.shard_total(l))
        opt.zero_grad()
        loss.backward()
        opt.step()
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
    trained[how] = {{n: full(p).detach().clone() for n, p in params.items()}}
if training.is_main():
    diff = max((trained["ddp"][n] - trained["fsdp"][n]).abs().max().item() for n in trained["ddp"])
    moved = max(trained["ddp"][n].abs().max().item() for n in trained["ddp"] if n.endswith(".B"))
    print("RESULT", diff, moved)
training.teardown()
"""


def test_fsdp2_gives_ddp_adapter(tiny_ckpt, tmp_path):
    """FSDP2 works on CPU/gloo in torch 2.13: 4 steps of palora's A, B under fully_shard per block
    equal DDP's within 1e-6 (float32; the same math, sums in another order), and the protected
    bases U_S, V_S are sharded like W (frozen parameters, not buffers). Only the training
    step is wrapped here: the scripts wrap with DDP (FSDP2 there needs lockstep generation for
    evaluation and gathered exports, not done)."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_DRIVER.format(repo=str(REPO), ckpt=str(tiny_ckpt)))
    done = torchrun(script, [])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    diff, moved = map(float, line.split()[1:])
    assert moved > 0 and diff <= 1e-6, (diff, moved)
    line = next(x for x in done.stdout.splitlines() if x.startswith("SHARD"))
    local, full = map(int, line.split()[1:])
    assert local == (full + 1) // 2  # memory per rank falls with the rank count


# -----------------------------------------------------------------------------
# bfloat16: frozen tensors bf16, trainables and projections float32 (CPU stands in for CUDA here)


def test_bf16_frozen_factors_float32_trainables_and_leakage(tiny_ckpt):
    """A bf16 model (what resolve_dtype gives on CUDA): SVF keeps U, Vh in bf16, s and z float32;
    PALoRA keeps W in bf16, A, B, U_S, V_S float32, and after Adam steps under bf16 autocast the
    update's share on the protected directions is at float32 rounding (< 1e-5), where a bf16
    projection would leak ~1e-2 (LoRALinear.projected turns autocast off)."""
    import model as model_lib
    import palora

    model, _ = model_lib.load(tiny_ckpt, dtype=torch.bfloat16)
    svds = palora.svds(model)  # float32 factors, as the cache holds them
    palora.add_svf(model, svds)
    layer = model.get_submodule(next(iter(svds)))
    assert (layer.U.dtype, layer.Vh.dtype) == (torch.bfloat16,) * 2
    assert (layer.s.dtype, layer.z.dtype) == (torch.float32,) * 2
    palora.merge_svf(model)
    S = {n: torch.arange(0, len(s), 2) for n, (_, s, _) in svds.items()}
    params = palora.add_lora(model, "palora", 4, 8.0, svds, S, seed=0)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2)
    tokens = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name in svds:
        lora = model.get_submodule(name)
        assert lora.weight.dtype == torch.bfloat16
        dtypes = {t.dtype for t in (lora.A, lora.B, lora.A.grad, lora.U_S, lora.V_S)}
        assert dtypes == {torch.float32}
        dW = palora.delta_weight(lora)
        assert dW.dtype == torch.float32 and dW.norm() > 0
        out, inp = palora.leakage(dW, lora.U_S, lora.V_S)
        assert max(out, inp) < 1e-5, (name, out, inp)
        # the same projection in bf16 leaks at bf16 rounding: the check above can tell them apart
        A, B = lora.A.bfloat16(), lora.B.bfloat16()
        dW16 = palora.project_out(B, lora.U_S.bfloat16()) @ palora.project_in(
            A, lora.V_S.bfloat16()
        )
        assert max(palora.leakage(dW16.float(), lora.U_S, lora.V_S)) > 1e-4
