"""Tests for reproduce.py on the tiny setup: every method runs and gets a row; finished runs are
reused exactly (not retrained); a finished run made with other settings is refused, named."""

import json

import pytest

import cli
import reproduce

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


def test_a_finished_run_with_other_settings_is_refused(setup, tmp_path):
    reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))
    config = json.loads((tmp_path / "lora-s0" / "config.json").read_text())
    (tmp_path / "lora-s0" / "config.json").write_text(json.dumps({**config, "seed": 7}))
    with pytest.raises(cli.ConfigError, match=r"lora-s0: a finished run with other settings"):
        reproduce.main(reproduce_config(setup, tmp_path, methods="lora"))


def test_unknown_method_is_refused_before_any_work(setup, tmp_path):
    with pytest.raises(cli.ConfigError, match="unknown method 'nope'"):
        reproduce.main(reproduce_config(setup, tmp_path, methods="palora,nope"))
    assert not (tmp_path / "facts.jsonl").exists()


def test_every_sweep_variant_is_a_valid_inject_config():
    """The sweep names inject.Config fields by string: a renamed field must fail here, not an hour
    into a sweep. Each variant changes what it says it changes, within the flags' bounds."""
    import inject

    for name, overrides in reproduce.sweep_variants().items():
        cfg = inject.Config(**overrides)
        cli.check_numbers(cfg)
        assert all(getattr(cfg, k) != getattr(inject.Config(), k) for k in overrides), name
