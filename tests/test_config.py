"""Config loading, dotted overrides, validation errors, resolved dump, and their CLI behaviour."""
import dataclasses
import os

import pytest
import yaml

from llmforge.core.config import ConfigError, RunConfig, describe, dump_config, load_config
from tests.conftest import run_cli, train_cmd

TINY = "configs/train/tiny-cpu.yaml"


def test_yaml_and_overrides():
    cfg = load_config(RunConfig, TINY, ["train.steps=7", "parallel.tp=2", "data.paths=[a,b]", "seed=5",
                                        "train.lr=1e-3", "checkpoint.async_save=true"])
    assert cfg.train.steps == 7 and cfg.parallel.tp == 2 and cfg.data.paths == ["a", "b"]
    assert cfg.seed == 5 and cfg.train.lr == pytest.approx(1e-3) and cfg.checkpoint.async_save is True
    assert cfg.model.preset == "tiny" and cfg.data.seq_len == 128  # from the YAML


def test_single_path_becomes_list_and_int_to_float():
    cfg = load_config(RunConfig, None, ["data.paths=out", "train.lr=1"])
    assert cfg.data.paths == ["out"] and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override, words", [
    (["train.stepz=3"], ["train.stepz", "train.steps"]),
    (["paralel.tp=2"], ["paralel", "parallel"]),
    (["no_such_key=1"], ["no_such_key"]),
    (["train.steps=abc"], ["train.steps", "integer", "abc"]),
    (["train.steps.x=1"], ["train.steps", "not a section"]),
    (["parallel.zero_stage=5"], ["parallel.zero_stage"]),
    (["train.schedule=linear"], ["train.schedule", "linear"]),
    (["parallel.dp_shard=2"], ["zero_stage"]),
    (["data.weights=[1,2]"], ["data.weights"]),
    (["train.steps"], ["key=value"]),
])
def test_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, TINY, override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(RunConfig, str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, str(tmp_path / "missing.yaml"))
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="train.warmup.*train.warmup_steps"):
        load_config(RunConfig, str(nested))


def test_dump_roundtrip(tmp_path):
    cfg = load_config(RunConfig, TINY, ["train.steps=3"])
    path = tmp_path / "run" / "config.yaml"
    dump_config(cfg, str(path))
    resolved = [os.path.abspath(p) for p in cfg.data.paths]  # stored absolute: the run works from any folder
    assert load_config(RunConfig, str(path)) == dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=resolved))
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 3
    assert not [p for p in os.listdir(path.parent) if "tmp" in p]


def test_every_key_is_documented():
    rows = describe(RunConfig)
    assert len(rows) > 50
    missing = [k for k, _, _, doc in rows if not doc]
    assert not missing, missing


@pytest.mark.parametrize("args, needle", [
    (["does/not/exist.yaml"], "config file not found"),
    ([TINY, "train.stepz=3"], "train.steps"),
    ([TINY, "train.steps=-1"], "train.steps"),
    ([TINY, "parallel.tp=3", "data.paths=[{data}]"], "tp"),
    ([TINY, "parallel.dp_replicate=2", "data.paths=[{data}]"], "world size 1"),
    ([TINY, "data.paths=[/nonexistent/dir]"], "/nonexistent/dir"),
])
def test_cli_errors_are_one_line(args, needle, tmp_path, synth_data):
    run_dir = tmp_path / "run"
    args = [a.replace("{data}", synth_data) for a in args] + [f"run_dir={run_dir}", "model.vocab_size=64"]
    p = run_cli(train_cmd() + args, timeout=120)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and p.stderr.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not run_dir.exists()  # nothing partial left behind
