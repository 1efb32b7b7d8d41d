"""Fixtures for the inference-side tests: a tiny sentencepiece tokenizer + shards, and trained run dirs."""
from __future__ import annotations

import os
import random

import pytest

WORDS = ("the a model learns from data and every token counts when training small language models on text "
         "with care while tests check numbers against references so nothing drifts quietly over time").split()


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))).capitalize() + "." for _ in range(n)]


def make_data(root: str) -> str:
    """A pipeline-shaped output dir: tokenizer.model + shards/train-00000 + shards/valid-00000 (EOS after docs)."""
    import sentencepiece as spm
    from data_pipeline.shards import ShardWriter
    os.makedirs(root, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_docs(300, 0)), model_prefix=os.path.join(root, "tokenizer"), vocab_size=300,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    os.remove(os.path.join(root, "tokenizer.vocab"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(root, "tokenizer.model"))
    for split, docs in (("train", _docs(400, 1)), ("valid", _docs(40, 2))):
        with ShardWriter(os.path.join(root, "shards", f"{split}-00000")) as w:
            for d in docs:
                w.add_document(sp.encode(d) + [sp.eos_id()])
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return make_data(str(tmp_path_factory.mktemp("data")))


def train_run(run_dir: str, data: str, *extra: str) -> str:
    from llmforge.train import main
    rc = main(["configs/train/tiny-cpu.yaml", f"data.paths=[{data}]", f"run_dir={run_dir}", "train.steps=6",
               "data.seq_len=32", "train.global_batch_size=4", "train.warmup_steps=2", "train.eval_interval=0",
               "checkpoint.interval=0", "logging.plot=false", *extra])
    assert rc == 0
    return run_dir


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, data_dir) -> str:
    return train_run(str(tmp_path_factory.mktemp("llama") / "run"), data_dir)


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory, data_dir) -> str:
    return train_run(str(tmp_path_factory.mktemp("gpt2") / "run"), data_dir, "model.preset=tiny-gpt2")
