"""Tests for reproduce.py on the tiny setup: every method runs and gets a row; finished runs are
reused exactly (not retrained); a finished run made with other settings is refused, named."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

import cli
import reproduce
import tasks

pytestmark = pytest.mark.usefixtures("one_thread")


def reproduce_config(setup, out, **overrides) -> reproduce.Config:
    settings = dict(
        ckpt=str(setup.ckpt),
        svf=str(setup.svf),
        facts=str(setup.facts),
        n_facts=4,
        methods="palora,random,lora",
        seeds="0",
        limit=2,
        reasoning=str(setup.skill),
        reasoning_ood=str(setup.skill),
        known=str(setup.known),
        max_new_tokens=4,
        device="cpu",
        out=str(out),
    )
    return reproduce.Config(**{**settings, **overrides})


def test_every_method_gets_a_row_and_finished_runs_are_reused(setup, tmp_path):
    result = reproduce.main(reproduce_config(setup, tmp_path))
    assert [r["group"] for r in result["rows"]] == ["base", "svf", "palora", "random", "lora"]
    for m in ("palora", "random", "lora"):
        assert (tmp_path / f"{m}-s0" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "facts.jsonl").read_text().splitlines()) == 4
    stamp = (tmp_path / "palora-s0" / "adapter_model.safetensors").stat().st_mtime_ns
    again = reproduce.main(reproduce_config(setup, tmp_path))
    assert (tmp_path / "palora-s0" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert [r["items"] for r in again["rows"]] == [r["items"] for r in result["rows"]]


def test_a_folder_of_the_users_is_never_written_into(setup, tmp_path, monkeypatch):
    """--out holding files but no reproduce.json is not reproduce.py's: refused before any run, so
    its facts.jsonl (reproduce.py writes one) and everything else stay the user's."""
    calls = recorders(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "facts.jsonl").write_text("my facts")
    with pytest.raises(cli.ConfigError, match="holds facts.jsonl, and no reproduce.json"):
        reproduce.main(reproduce_config(setup, mine, methods="lora"))
    assert sorted(p.name for p in mine.iterdir()) == ["facts.jsonl"] and not calls
    assert (mine / "facts.jsonl").read_text() == "my facts"
    reproduce.main(reproduce_config(setup, tmp_path / "new", methods="lora"))
    assert (tmp_path / "new" / "reproduce.json").is_file() and calls  # its own folder: taken


@pytest.mark.parametrize("change", [{"seed": 7}, {"lr": 0.02}, {"mix_ratio": 1.0}])
def test_a_finished_run_with_other_settings_is_refused(setup, tmp_path, change):
    """Any setting counts, not only the ones reproduce.py passes: a run made before a default
    changed is not taken for today's."""
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))
    config = json.loads((tmp_path / "lora-s0" / "config.json").read_text())
    (tmp_path / "lora-s0" / "config.json").write_text(json.dumps({**config, **change}))
    key = next(iter(change))
    with pytest.raises(cli.ConfigError, match=rf"lora-s0: a finished run .*{key} "):
        reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))


def test_an_option_added_since_counts_as_its_default(setup, tmp_path):
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))
    config = json.loads((tmp_path / "lora-s0" / "config.json").read_text())
    del config["gate_lr"]
    (tmp_path / "lora-s0" / "config.json").write_text(json.dumps(config))
    stamp = (tmp_path / "lora-s0" / "adapter_model.safetensors").stat().st_mtime_ns
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))
    assert (tmp_path / "lora-s0" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_epochs_and_recall_target_reach_every_run(setup, tmp_path):
    """--recall-target 0 --epochs 2: fixed-length runs (the 2026-11-23 comparison's setting)."""
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora", epochs=2, recall_target=0))
    config = json.loads((tmp_path / "lora-s0" / "config.json").read_text())
    assert (config["epochs"], config["recall_target"]) == (2, 0)
    summary = json.loads((tmp_path / "lora-s0" / "summary.json").read_text())
    per_epoch = max(1, summary["examples"] // config["batch_size"])
    assert summary["steps"] == 2 * per_epoch
    with pytest.raises(cli.ConfigError, match=r"lora-s0: a finished run .*epochs 2 -> 3"):
        reproduce.main(reproduce_config(setup, tmp_path, methods="lora", epochs=3, recall_target=0))


def test_the_same_expert_spelled_another_way_is_the_same_run(setup, tmp_path, monkeypatch):
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))
    stamp = (tmp_path / "lora-s0" / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.chdir(setup.svf.parent)
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora", svf=setup.svf.name))
    assert (tmp_path / "lora-s0" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_plot_without_matplotlib_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(cli.ConfigError, match="--plot needs matplotlib"):
        reproduce.main(reproduce_config(setup, tmp_path, plot=True, frontier=True))
    assert not (tmp_path / "facts.jsonl").exists()


def test_unknown_method_is_refused_before_any_work(setup, tmp_path):
    with pytest.raises(cli.ConfigError, match="unknown method 'nope'"):
        reproduce.main(reproduce_config(setup, tmp_path, methods="palora,nope"))
    assert not (tmp_path / "facts.jsonl").exists()


def test_every_sweep_variant_is_a_valid_inject_config():
    """The sweep names inject.Config fields by string: a renamed field must fail here, not an hour
    into a sweep. Each variant changes what it says it changes, within the flags' bounds."""
    import inject

    comparison = dict(
        **reproduce.COMPARISON,
        lr=reproduce.Config.lr,
        mix_known=reproduce.Config.mix_known,
        recall_target=reproduce.Config.recall_target,
    )
    base = inject.Config(**comparison)
    variants = reproduce.sweep_variants(reproduce.Config.lr)
    assert variants.pop("palora") == {"method": "palora"}  # the comparison's run: the reference
    for name, overrides in variants.items():
        cfg = inject.Config(**{**comparison, **overrides})
        cli.check_numbers(cfg)
        assert overrides.pop("method") == "palora"
        assert all(getattr(cfg, k) != getattr(base, k) for k in overrides), name


def test_sweep_runs_the_named_settings_beside_the_comparisons_palora(setup, tmp_path, monkeypatch):
    calls = recorders(monkeypatch)
    cfg = reproduce_config(setup, tmp_path, sweep="fraction-0.1,energy", seeds="0,1")
    reproduce.main(cfg)
    assert calls == [("palora", 0)] * 3 + [("palora", 1)] * 3
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == sorted(
        f"{n}-s{s}" for n in ("palora", "fraction-0.1", "energy") for s in (0, 1)
    )
    saved = json.loads((tmp_path / "fraction-0.1-s0" / "config.json").read_text())
    assert saved["probe_fraction"] == 0.1 and saved["method"] == "palora"
    with pytest.raises(cli.ConfigError, match="--sweep: unknown setting 'fraction-0.3'"):
        reproduce.main(reproduce_config(setup, tmp_path, sweep="fraction-0.3"))


@pytest.mark.parametrize("field", ["facts", "reasoning", "reasoning_ood", "known", "mix_known"])
def test_a_sweep_never_reads_a_locked_confirmation_file(setup, tmp_path, monkeypatch, field):
    """Every file in tasks.LOCKED is refused to a sweep (a selection run), whichever role it has,
    before anything runs; a run that is no sweep may read it."""
    calls = recorders(monkeypatch)
    for name in tasks.LOCKED:
        locked = tmp_path / "data" / name
        locked.parent.mkdir(exist_ok=True)
        locked.write_bytes(setup.facts.read_bytes())
        cfg = reproduce_config(setup, tmp_path / "out", sweep="energy", **{field: str(locked)})
        with pytest.raises(cli.ConfigError, match=f"--sweep: {locked} is a locked confirmation"):
            reproduce.main(cfg)
    assert calls == [] and not (tmp_path / "out").exists()


def recorders(monkeypatch) -> list:
    """inject.main writes what a finished run leaves for reproduce.py (config.json, summary.json);
    evaluate.main returns its config."""
    calls = []
    lrs.clear()

    def inject_main(cfg):
        calls.append((cfg.method, cfg.seed))
        lrs[cfg.method] = cfg.lr
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (Path(cfg.out) / "summary.json").write_text("{}")

    monkeypatch.setattr(reproduce.inject, "main", inject_main)
    monkeypatch.setattr(reproduce.evaluate, "main", lambda cfg: cfg)
    return calls


lrs = {}  # method -> the lr of its last recorded run


def test_methods_imsm_and_smf(setup, tmp_path, monkeypatch):
    calls = recorders(monkeypatch)
    paths = f"--ckpt {setup.ckpt} --svf {setup.svf} --facts {setup.facts} --out {tmp_path}"
    cfg = cli.parse_config(
        reproduce.Config,
        [*paths.split(), "--methods", "imsm,smf", "--seeds", "0,1", "--lr", "0.01"],
    )
    evaluated = reproduce.main(cfg)
    assert calls == [("imsm", 0), ("smf", 0), ("imsm", 1), ("smf", 1)]
    assert lrs == {"imsm": 0.01, "smf": reproduce.Config.smf_lr}  # smf at its own lr
    runs = [str(tmp_path / f"{m}-s{s}") for s in (0, 1) for m in ("imsm", "smf")]
    assert evaluated.adapter == runs and evaluated.svf == str(setup.svf)
    reproduce.main(cfg)  # finished with the same settings: reused, nothing trains again
    assert len(calls) == 4


def test_at_level_interpolates_at_the_first_crossing():
    xs, ys = [0.0, 0.4, 0.8, 0.6, 1.0], [1.0, 0.9, 0.5, 0.4, 0.2]
    assert reproduce.at_level(xs, ys, 0.6) == pytest.approx(0.7)  # between 0.4 and 0.8
    assert reproduce.at_level(xs, ys, 0.8) == pytest.approx(0.5)
    assert reproduce.at_level(xs, ys, 0.9) == pytest.approx(0.25)  # after the dip: 0.6 -> 1.0
    assert reproduce.at_level(xs, ys, 0.0) == 1.0
    assert math.isnan(reproduce.at_level(xs[:3], ys[:3], 0.9))


def test_frontier_scores_every_epoch(setup, tmp_path):
    """--frontier: each run keeps its epochs and each epoch is a row; every run's path starts at
    the expert; the table holds a cell per split and level; a finished run without epochs is
    refused by name."""
    settings = dict(methods="palora,lora", frontier=True)
    result = reproduce.main(reproduce_config(setup, tmp_path, **settings))
    epochs = sorted((tmp_path / "palora-s0" / "epochs").iterdir())
    assert len(epochs) == json.loads((tmp_path / "palora-s0" / "summary.json").read_text())["steps"]
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["base", "svf"] and names[2] == "palora-s0-e01"
    paths = result["frontier"]["paths"]
    assert list(paths) == ["palora-s0", "lora-s0"] and len(paths["lora-s0"]) == 1 + len(epochs)
    assert paths["palora-s0"][0]["name"] == "svf"
    assert len(result["frontier"]["table"]["palora"]) == 6
    assert (tmp_path / "frontier" / "frontier.md").read_text().startswith("| method | seeds |")
    thinned = reproduce.main(reproduce_config(setup, tmp_path, **settings, every=3))
    names = [r["name"] for r in thinned["rows"] if r["name"].startswith("lora")]
    want = [f"lora-s0-e{i:02d}" for i in range(3, len(epochs) + 1, 3)]
    assert names == want + [f"lora-s0-e{len(epochs):02d}"] * (len(epochs) % 3 != 0)
    reproduce.main(reproduce_config(setup, tmp_path / "plain", methods="lora"))
    with pytest.raises(cli.ConfigError, match=r"lora-s0: finished without --keep-epochs"):
        reproduce.main(reproduce_config(setup, tmp_path / "plain", methods="lora", frontier=True))


def test_stream_injects_each_round_on_the_last_and_reuses_round_one(setup, tmp_path):
    """--stream 2 --n-facts 4: round 1 is the comparison's run (reused, not retrained), round 2
    trains --after it on the next 4 facts; every round is scored on all 8."""
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))
    stamp = (tmp_path / "lora-s0" / "adapter_model.safetensors").stat().st_mtime_ns
    result = reproduce.main(reproduce_config(setup, tmp_path, methods="lora,palora", stream=2))
    assert (tmp_path / "lora-s0" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    names = [r["name"] for r in result["rows"]]
    assert names == ["base", "svf", "lora-s0", "lora-r2-s0", "palora-s0", "palora-r2-s0"]
    second = json.loads((tmp_path / "stream" / "palora-r2-s0" / "config.json").read_text())
    assert second["after"] == str(tmp_path / "palora-s0")
    lines = Path(setup.facts).read_text().splitlines(True)
    assert second["facts"] == str(tmp_path / "stream" / "facts-r2.jsonl")
    assert (tmp_path / "stream" / "facts-r2.jsonl").read_text() == "".join(lines[4:8])
    assert all(len(r["items"]["facts_ok"]) == 8 for r in result["rows"])
    table = result["stream"]["table"]
    assert sorted(table) == ["expert", "lora", "palora"] and sorted(table["lora"]) == [1, 2]
    assert (tmp_path / "stream" / "stream.md").read_text().startswith("| method | round |")
    with pytest.raises(cli.ConfigError, match=r"8 facts, fewer than --n-facts 4 x 3 rounds"):
        reproduce.main(reproduce_config(setup, tmp_path, methods="lora", stream=3))
    with pytest.raises(cli.ConfigError, match="--stream: rounds of --n-facts"):
        reproduce.main(reproduce_config(setup, tmp_path, methods="lora", stream=2, frontier=True))


def test_stream_table_by_hand(tmp_path):
    """Two rounds of two facts, one seed: recall of this round's, the earlier and the later
    facts, each from its slice of the per-fact record."""

    def row(name, group, ok):
        items = {"facts_ok": ok}
        return dict(
            name=name, group=group, items=items, retention=0.5, retention_ood=0.25, locality=1.0
        )

    rows = [
        row("base", "base", [0, 0, 0, 0]),
        row("svf", "svf", [0, 0, 0, 0]),
        row("lora-s0", "lora", [1, 1, 0, 1]),
        row("lora-r2-s0", "lora-r2", [0, 1, 1, 1]),
    ]
    table = reproduce.stream_table(rows, 2, 2, tmp_path, plot=False)["table"]
    first, second = table["lora"][1], table["lora"][2]
    assert first["this"][0] == 1.0 and first["later"][0] == 0.5 and math.isnan(first["earlier"][0])
    assert second["this"][0] == 1.0 and second["earlier"][0] == 0.5 and second["first"][0] == 0.5
    assert math.isnan(second["later"][0]) and second["recall"] == [0.5, 1.0]
    assert table["expert"][0]["first"][0] == 0.0 and math.isnan(table["expert"][0]["this"][0])
