"""Issue 12, "clear messages instead of tracebacks" on the config and inference side: a duplicate YAML key is an
error in both halves; relative data paths are stored absolute in a run's config.yaml; a prompt longer than the
context is cut from the left with a warning instead of leaving no room to generate."""
from __future__ import annotations

import pytest
import yaml

from llmforge.core.config import ConfigError, RunConfig, dump_config, load_config


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_duplicate_yaml_key_is_an_error_in_the_trainer_config(tmp_path):
    path = _write(tmp_path / "train.yaml", "train:\n  steps: 10\n  lr: 0.001\n  steps: 20\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert path in msg and "line 4" in msg and "duplicate key 'steps'" in msg and "line 2" in msg


def test_duplicate_yaml_key_is_an_error_in_the_pipeline_config(tmp_path):
    from data_pipeline import config as data_config
    path = _write(tmp_path / "data.yaml", "output_dir: a\ninput:\n  paths: [x]\noutput_dir: b\n")
    with pytest.raises(ConfigError) as e:
        data_config.load(path)
    assert path in str(e.value) and "duplicate key 'output_dir'" in str(e.value)


def test_yaml_merge_keys_and_equal_keys_in_different_sections_still_load(tmp_path):
    path = _write(tmp_path / "train.yaml", "train:\n  steps: 3\nmodel:\n  preset: tiny\n"
                                           "checkpoint: &ck\n  keep: 3\n  interval: 5\n"
                                           "deepspeed:\n  <<: *ck\n  keep: 4\n")
    cfg = load_config(RunConfig, path)
    assert cfg.train.steps == 3 and cfg.checkpoint.keep == 3 and cfg.deepspeed == {"keep": 4, "interval": 5}


def test_relative_data_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RunConfig, None, ["data.paths=[outputs/sample,shards/train-*]", "run_dir=run"])
    assert cfg.data.paths == ["outputs/sample", "shards/train-*"]  # in memory: as given
    dump_config(cfg, str(tmp_path / "run" / "config.yaml"))
    stored = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["data"]["paths"]
    assert stored == [str(tmp_path / "outputs" / "sample"), str(tmp_path / "shards" / "train-*")]
    monkeypatch.chdir("/")  # loaded from any other folder, the run still points at the same data
    assert load_config(RunConfig, str(tmp_path / "run" / "config.yaml")).data.paths == stored


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_size=50,
                                 max_seq_len=32)).eval()


def test_long_prompt_is_cut_from_the_left_with_a_warning(tiny_model, capsys):
    from llmforge.inference.generate import generate
    prompt = [(7 * i) % 50 for i in range(80)]  # 80 tokens, context 32
    new = generate(tiny_model, prompt, 8, temperature=0.0)
    err = capsys.readouterr().err
    assert len(new) == 8, "no room was left for the continuation"
    assert "warning" in err and "80 tokens" in err and "last 24" in err
    assert new == generate(tiny_model, prompt[-24:], 8, temperature=0.0)  # exactly the prompt's last 24 tokens
    assert "warning" not in capsys.readouterr().err  # a prompt that fits: no warning
