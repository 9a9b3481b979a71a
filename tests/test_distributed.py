"""train_svf.py and inject.py under torchrun (CPU, gloo, 2 processes, a tiny random Llama), with
--parallel ddp and fsdp: the same z and the same adapter as one process with the same global batch
and seed; resume from a 2-process state in 1 process, and from a 1-process state under fsdp; rank
0 alone writes; each SVD computed once; FSDP2 (fully_shard per block) gives DDP's adapter; under
FSDP2 generate stops on every rank together. One torchrun launch costs ~10 s on 2 shared cores
(imports), so the tests share launches where they can.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import inject
import runs
import tiny
import train_svf
import training

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

REPO = Path(__file__).resolve().parent.parent
PEFT = "adapter_model.safetensors"
# a script's (train_svf.py's, inject.py's) command line, as its __main__ runs it (cli.run, then
# training.teardown on success), with instruments: palora.svd calls and file
# writes counted per rank (in COUNTS, outside the run folder), and an optional stop inside step
# CRASH (0-based), after the state of an earlier step
DRIVER = """
import os, sys
sys.path.insert(0, {repo!r})
import cli, palora, tasks, training
import {script} as script
real_svd, calls = palora.svd, []
palora.svd = lambda W: calls.append(1) or real_svd(W)
real_write, real_append, writes = tasks.atomic_write_bytes, tasks.append_jsonl, []
tasks.atomic_write_bytes = lambda path, data: writes.append(path) or real_write(path, data)
tasks.append_jsonl = lambda path, row: writes.append(path) or real_append(path, row)
crash = int(os.environ.get("CRASH", -1))
def check(loss, step, params=None):
    if step == crash:
        raise SystemExit(3)
script.check_finite = check
try:
    cli.run(script.main, cli.parse_config(script.Config))
    training.teardown()  # as the scripts' __main__ does
finally:
    with open(os.path.join(os.environ["COUNTS"], f"rank{{os.environ['RANK']}}"), "w") as f:
        f.write(f"{{len(calls)}} {{len(writes)}}")
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


def torchrun(script, args, env=None, check=True, timeout=180):
    """2 processes; ranks out of step (a collective one rank never reaches) hang, so a run that
    outlasts `timeout` is killed whole, in its own session, workers included, and fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    pipe = subprocess.PIPE
    run = subprocess.Popen(
        cmd, env=env, stdout=pipe, stderr=pipe, text=True, cwd=REPO, start_new_session=True
    )
    try:
        out, err = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        problem = f"{script}: still running after {timeout} s (ranks out of step?)"
        raise AssertionError(problem) from None
    done = subprocess.CompletedProcess(cmd, run.returncode, out, err)
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


def driver(tmp_path, script: str = "train_svf") -> Path:
    (tmp_path / "counts").mkdir()
    (tmp_path / "driver.py").write_text(DRIVER.format(repo=str(REPO), script=script))
    return tmp_path / "driver.py"


def counts(tmp_path) -> dict:
    """rank -> (palora.svd calls, files written), as DRIVER left them."""
    return {p.name: tuple(map(int, p.read_text().split())) for p in (tmp_path / "counts").iterdir()}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_give_one_process_z_and_rank_0_alone_writes(
    svf_setup, one_process, tmp_path, parallel
):
    """One held-out item per batch: ddp shards them (rank 0 answers 2, rank 1 one); under fsdp,
    where every forward is a collective, that would put the ranks out of step: they answer all 3."""
    out, cache = tmp_path / "two", tmp_path / "cache"
    cfg = svf_config(svf_setup, out, cache, parallel=parallel, eval_batch_size=1)
    torchrun(driver(tmp_path), argv(cfg), {"COUNTS": str(tmp_path / "counts")})
    z = load_file(out / "svf.safetensors")
    close(z, one_process, 1e-6)
    assert not all(torch.equal(t, torch.ones_like(t)) for t in z.values())  # z moved
    # one row per step, never two (0: the base model's scores, sharded and gathered: all 3 items)
    assert [r["step"] for r in rows(out)] == list(range(9))
    assert [r["held_out"]["n"] for r in rows(out) if "held_out" in r] == [3, 3, 3]
    written = {"config.json", "metrics.jsonl", "state.safetensors", "svf.safetensors"}
    assert {p.name for p in out.iterdir()} == written | {"summary.json", ".lock"}
    assert len(list((cache).rglob("*.safetensors"))) == 6  # 2 layers x 3 MLP matrices
    assert counts(tmp_path)["rank1"] == (0, 0)  # no SVD, no file: rank 0 wrote everything
    assert counts(tmp_path)["rank0"][1] > 0  # (the writes are counted)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_from_two_processes_in_one_and_svd_computed_once(
    svf_setup, one_process, tmp_path, parallel
):
    """fsdp: the state was gathered from the shards; it resumes in one process, without FSDP."""
    out, cache = tmp_path / "cut", tmp_path / "cache"
    env = {"CRASH": "4", "COUNTS": str(tmp_path / "counts")}  # killed in step 5, state of step 3
    cfg = svf_config(svf_setup, out, cache, parallel=parallel)
    done = torchrun(driver(tmp_path), argv(cfg), env, False)
    assert done.returncode != 0 and not (out / "svf.safetensors").exists()
    svd_calls = {rank: calls for rank, (calls, _) in counts(tmp_path).items()}
    assert svd_calls == {"rank0": 6, "rank1": 0}  # rank 0 computed, rank 1 read the cache
    train_svf.main(svf_config(svf_setup, out, cache, resume=True))  # one process, ddp now
    close(load_file(out / "svf.safetensors"), one_process, 1e-6)
    assert [r["step"] for r in rows(out)] == list(range(9))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_inject_two_processes_give_one_process_adapter(setup, tmp_path, parallel):
    """One fact (and 3 known ones mixed in), its recall checked after every epoch: ddp splits the
    facts, so rank 1 checks none; under fsdp, where every forward is a collective, both ranks check
    it. The same adapter, steps and recall as one process either way."""
    fact = tiny.write_jsonl(tmp_path / "fact.jsonl", runs.FACTS[:1])
    known = dict(facts=str(fact), mix_known=str(setup.known), mix_ratio=3.0)
    settings = dict(method="palora", epochs=3, batch_size=4, recall_target=1.0, **known)
    inject.main(runs.config(setup, tmp_path / "one", **settings))
    two = runs.config(setup, tmp_path / "two", parallel=parallel, **settings)
    torchrun(driver(tmp_path, "inject"), argv(two), {"COUNTS": str(tmp_path / "counts")})
    a, b = (load_file(tmp_path / d / PEFT) for d in ("one", "two"))
    close(a, b, 1e-6)
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)  # B moved from 0
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]  # 1 batch an epoch
    assert [r["recall"] for r in two] == [r["recall"] for r in one]
    writes = {rank: n for rank, (_, n) in counts(tmp_path).items()}
    assert writes["rank0"] > 0 and writes["rank1"] == 0  # rank 0 alone wrote files


def test_inject_fsdp_resumes_a_one_process_state(setup, tmp_path, monkeypatch):
    """A one-process run (DDP's state is the same file) killed in epoch 3, resumed by 2 processes
    under fsdp: each rank loads its shard of A, B and the Adam moments; the last epoch is trained,
    checked and exported (every epoch's adapter kept) sharded, ending on the whole run's adapter."""
    settings = dict(method="palora", epochs=3, batch_size=4, recall_target=1.0, keep_epochs=True)
    inject.main(runs.config(setup, tmp_path / "whole", **settings))

    def crash(loss, step, params):  # killed in step 5, after the state of epoch 2 (step 4)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(inject, "check_finite", crash)
    with pytest.raises(KeyboardInterrupt):
        inject.main(runs.config(setup, tmp_path / "cut", **settings))
    monkeypatch.undo()
    training.LOCKS.pop((tmp_path / "cut").resolve()).close()  # the killed run lets go of its folder
    resumed = runs.config(setup, tmp_path / "cut", parallel="fsdp", resume=True, **settings)
    torchrun("inject.py", argv(resumed))
    for whole, cut in [("whole", "cut"), ("whole/epochs/whole-e03", "cut/epochs/cut-e03")]:
        close(load_file(tmp_path / whole / PEFT), load_file(tmp_path / cut / PEFT), 1e-6)
    assert [r["step"] for r in rows(tmp_path / "cut")] == list(range(1, 7))
    recalls = [[r["recall"] for r in rows(tmp_path / d) if "recall" in r] for d in ("whole", "cut")]
    assert recalls[0] == recalls[1]


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
    bases U_S, V_S are sharded like W (frozen parameters, not buffers). The bare training step;
    the scripts under --parallel fsdp are the tests above."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_DRIVER.format(repo=str(REPO), ckpt=str(tiny_ckpt)))
    done = torchrun(script, [])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    diff, moved = map(float, line.split()[1:])
    assert moved > 0 and diff <= 1e-6, (diff, moved)
    line = next(x for x in done.stdout.splitlines() if x.startswith("SHARD"))
    local, full = map(int, line.split()[1:])
    assert local == (full + 1) // 2  # memory per rank falls with the rank count


GENERATE_DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
import torch, training, model as model_lib
training.setup_distributed(torch.device("cpu"))
torch.set_num_threads(1)
model, _ = model_lib.load({ckpt!r})
prompts = [[1, 5, 6, 7], [1, 8, 9]]
free = model_lib.generate(model, prompts, 6, {{-1}})  # no eos: 6 tokens a row
# rank 0: both rows end at their first token; rank 1: row 0 at its third, row 1 runs on
eos = {{free[0][0], free[1][0]}} if training.rank() == 0 else {{free[0][2]}}
alone = model_lib.generate(model, prompts, 6, eos)
training.wrap(model, "fsdp")
sharded = model_lib.generate(model, prompts, 6, eos)
lengths = [len(row) for row in alone]
result = {{"rank": training.rank(), "same": sharded == alone, "lengths": lengths}}
with open({out!r} + f"/rank{{training.rank()}}.json", "w") as f:  # a file each: no shared pipe
    json.dump(result, f)
training.teardown()
"""


def test_fsdp_generate_stops_on_every_rank_together(tiny_ckpt, tmp_path):
    """Rank 0's rows all end at their first token, rank 1's run on: under FSDP2 every forward
    all-gathers the weights, so rank 0 steps on (its tokens after the eos cut) until rank 1 is
    done, instead of leaving it waiting; each rank's answers equal its unsharded model's."""
    script = tmp_path / "generate.py"
    script.write_text(
        GENERATE_DRIVER.format(repo=str(REPO), ckpt=str(tiny_ckpt), out=str(tmp_path))
    )
    torchrun(script, [])
    # each rank writes and closes its own file before teardown: a line printed to torchrun's pipe
    # is buffered (lost when a rank aborts at exit) and shares the pipe with the other rank's
    # (2 runs in 21 lost a rank's line)
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ranks[0]["same"] and ranks[1]["same"]
    assert ranks[0]["lengths"] == [0, 0] and max(ranks[1]["lengths"]) >= 2


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
