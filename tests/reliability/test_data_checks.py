"""Issue 12 items 9 and 10: training data checked before any collective. A blend of folders made with different
tokenizers is refused naming both folders; a shard holding ids >= the model's vocab_size is refused naming the
shard (not an IndexError deep in the embedding)."""
from __future__ import annotations

import io
import os
import shutil

import pytest

from llmforge.core.config import ConfigError, RunConfig, load_config
from llmforge.data.megatron import build_run_datasets
from tests.conftest import ROOT, run_cli, train_cmd, write_synthetic_shards

TINY = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")


def _tokenizer(path: str, words: list[str]) -> str:
    import sentencepiece as spm
    buf = io.BytesIO()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=40,
                                   model_type="bpe", minloglevel=2, num_threads=1)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def _cfg(*paths, vocab=64):
    return load_config(RunConfig, TINY, [f"data.paths=[{','.join(paths)}]", f"model.vocab_size={vocab}",
                                         "data.seq_len=64"])


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    a = write_synthetic_shards(str(root / "a"), n_train=20, n_valid=4, vocab=64, seed=1)
    b = write_synthetic_shards(str(root / "b"), n_train=20, n_valid=4, vocab=64, seed=2)
    return a, b


def test_blending_folders_with_different_tokenizers_is_refused(two_folders, tmp_path):
    a, b = (shutil.copytree(p, str(tmp_path / os.path.basename(p))) for p in two_folders)
    _tokenizer(os.path.join(a, "tokenizer.model"), "alpha beta gamma delta epsilon zeta eta theta".split())
    _tokenizer(os.path.join(b, "tokenizer.model"), "one two three four five six seven eight nine".split())
    with pytest.raises(ConfigError) as e:
        build_run_datasets(_cfg(a, b))
    msg = str(e.value)
    assert a in msg and b in msg and "different tokenizers" in msg and "\n" not in msg


def test_blending_folders_with_the_same_tokenizer_is_accepted(two_folders, tmp_path):
    a, b = (shutil.copytree(p, str(tmp_path / os.path.basename(p))) for p in two_folders)
    tok = _tokenizer(os.path.join(a, "tokenizer.model"), "alpha beta gamma delta epsilon zeta eta theta".split())
    shutil.copy(tok, os.path.join(b, "tokenizer.model"))
    train, valid = build_run_datasets(_cfg(a, b))
    assert train.batch(0, 2).shape == (2, 65) and valid


def test_token_ids_beyond_the_model_vocab_are_refused_naming_the_shard(two_folders):
    a, _ = two_folders
    from data_pipeline.shards import shard_max_id
    top = max(shard_max_id(os.path.join(a, "shards", f"{s}-00000")) for s in ("train", "valid"))
    assert top == 63  # the synthetic data uses ids up to vocab - 1
    build_run_datasets(_cfg(a, vocab=64), 64)  # fits exactly (the trainer passes the model's vocab)
    with pytest.raises(ConfigError) as e:
        build_run_datasets(_cfg(a, vocab=32), 32)
    msg = str(e.value)
    assert os.path.join(a, "shards") in msg and "token id" in msg and "vocab_size is 32" in msg


def test_max_id_without_a_sidecar_is_read_from_the_tokens(two_folders, tmp_path):
    """Shards written by other tools (no stats sidecar, or a stale one) are still checked."""
    a = shutil.copytree(two_folders[0], str(tmp_path / "a"))
    for f in os.listdir(os.path.join(a, "shards")):
        if f.endswith(".stats.json"):
            os.remove(os.path.join(a, "shards", f))
    with pytest.raises(ConfigError, match="vocab_size is 40"):
        build_run_datasets(_cfg(a, vocab=40), 40)


@pytest.mark.slow
def test_train_cli_reports_out_of_vocab_data_in_one_line(two_folders, tmp_path):
    run_dir = str(tmp_path / "run")
    p = run_cli(train_cmd() + [TINY, f"data.paths=[{two_folders[0]}]", f"run_dir={run_dir}", "model.vocab_size=32",
                               "train.steps=2", "data.seq_len=64"], timeout=300)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(errors) == 1 and "token id" in errors[0] and "vocab_size is 32" in errors[0]
