"""Tests for reproduce.py's plumbing, with inject.main and evaluate.main replaced by recorders (each
is tested on its own): --methods imsm,smf gives one inject.py run per method and seed and
evaluate.py gets their folders; a finished run (summary.json) with the same settings is reused; an
unknown method is refused before anything runs. Tiny setup (conftest.py); CPU, seconds.
"""

import dataclasses
import json
from pathlib import Path

import pytest

import cli
import reproduce


def recorders(monkeypatch) -> list:
    """inject.main writes what a finished run leaves for reproduce.py (config.json, summary.json);
    evaluate.main returns its config."""
    calls = []

    def inject_main(cfg):
        calls.append((cfg.method, cfg.seed))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (Path(cfg.out) / "summary.json").write_text("{}")

    monkeypatch.setattr(reproduce.inject, "main", inject_main)
    monkeypatch.setattr(reproduce.evaluate, "main", lambda cfg: cfg)
    return calls


def test_methods_imsm_and_smf(setup, tmp_path, monkeypatch):
    calls = recorders(monkeypatch)
    paths = f"--ckpt {setup.ckpt} --svf {setup.svf} --facts {setup.facts} --out {tmp_path}"
    cfg = cli.parse_config(
        reproduce.Config, [*paths.split(), "--methods", "imsm,smf", "--seeds", "0,1"]
    )
    evaluated = reproduce.main(cfg)
    assert calls == [("imsm", 0), ("smf", 0), ("imsm", 1), ("smf", 1)]
    runs = [str(tmp_path / f"{m}-s{s}") for s in (0, 1) for m in ("imsm", "smf")]
    assert evaluated.adapter == runs and evaluated.svf == str(setup.svf)
    reproduce.main(cfg)  # finished with the same settings: reused, nothing trains again
    assert len(calls) == 4


def test_unknown_method_is_refused_before_anything_runs(setup, tmp_path, monkeypatch):
    calls = recorders(monkeypatch)
    cfg = reproduce.Config(
        ckpt=str(setup.ckpt), svf=str(setup.svf), methods="imsm,dora", out=str(tmp_path / "out")
    )
    with pytest.raises(cli.ConfigError, match="unknown method 'dora'"):
        reproduce.main(cfg)
    assert not calls and not (tmp_path / "out").exists()
