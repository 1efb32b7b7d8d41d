"""SFT fixtures: a pipeline-style tokenizer, chat rows whose response is a fixed function of a random prompt,
the SFT pipeline output, and a short pretraining run to fine-tune from."""
from __future__ import annotations

import io
import json
import os
import random

import pytest

# Single-token words (after BPE training on them) make "random noise" prompts cheap to learn by heart.
WORDS = ("amber basil cedar dune ember fjord gale heron iris juniper kelp lotus maple nectar onyx pine quartz "
         "raven sage thistle umber violet willow yarrow").split()
SEQ_LEN = 48


def train_tokenizer(path: str) -> str:
    """A BPE model with the data pipeline's settings (identity normalisation, byte fallback, ids 0-3)."""
    import sentencepiece as spm
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    lines += ["<|user|>", "<|assistant|>", "<|system|>", "reverse these words please"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=448,
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, input_sentence_size=0, num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def noise_rows(n: int, seed: int) -> list[dict]:
    """Prompts: 2-5 random words (noise: nothing in one predicts the next). Response: the words reversed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        rows.append({"prompt": " ".join(words), "response": " ".join(reversed(words))})
    return rows


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def run_pipeline(rows_path: str, out: str, tok: str, *extra: str) -> int:
    from data_pipeline.__main__ import main
    return main(["run", "configs/data/sft.yaml", f"input.paths=[{rows_path}]", f"output_dir={out}",
                 f"tokenizer.model_path={tok}", "workers=1", "progress=false", *extra])


@pytest.fixture(scope="session")
def sft_env(tmp_path_factory):
    return make_env(str(tmp_path_factory.mktemp("sft")))


def make_env(root: str) -> dict:
    """{tok, rows, data, pre_data}: tokenizer, 24 noise rows, their SFT pipeline output (a few held out as
    valid), and pretraining shards of random word sentences with the same tokenizer."""
    import sentencepiece as spm
    from data_pipeline.shards import ShardWriter
    tok = train_tokenizer(os.path.join(root, "tokenizer.model"))
    rows = noise_rows(24, 1)
    rows_path = write_jsonl(os.path.join(root, "rows.jsonl"), rows)
    data = os.path.join(root, "sft-data")
    cwd = os.getcwd()
    os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert run_pipeline(rows_path, data, tok, "shards.valid_fraction=0.15") == 0
    finally:
        os.chdir(cwd)
    pre = os.path.join(root, "pre-data")
    sp = spm.SentencePieceProcessor(model_file=tok)
    rng = random.Random(2)
    for split, n in (("train", 300), ("valid", 20)):
        with ShardWriter(os.path.join(pre, "shards", f"{split}-00000")) as w:
            for _ in range(n):
                w.add_document(sp.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))))
                               + [sp.eos_id()])
    with open(tok, "rb") as src, open(os.path.join(pre, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    return {"root": root, "tok": tok, "rows": rows, "rows_path": rows_path, "data": data, "pre_data": pre}


def train(run_dir: str, config: str, *overrides: str, nproc: int = 1, patch=None, expect_ok: bool = True,
          timeout: float = 240) -> str:
    """The real trainer entry point on ``nproc`` forked ranks (tests/parallel/conftest.py)."""
    from tests.parallel.conftest import launch_argv, logs
    argv = [config, f"run_dir={run_dir}", "logging.plot=false", *overrides]
    codes, _ = launch_argv(nproc, argv, run_dir, timeout, patch)
    if expect_ok:
        assert codes == [0] * nproc, f"{run_dir}: exit codes {codes}\n{logs(run_dir)}"
    return run_dir


def _kill_at_step3(rank: int) -> None:  # a rank patch: picklable (ranks start from a forkserver)
    os.environ["LLMFORGE_FAULT"] = "kill@3"


def metrics_curve(run_dir: str) -> list[tuple]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss")) for r in rows]


def assert_killed_run_resumes_bitwise(tmp: str, config: str, args: list[str]) -> None:
    """A run SIGKILLed after step 3 (its step-2 checkpoint on disk) and rerun logs the uninterrupted run's
    metrics, bit for bit."""
    ref = train(os.path.join(tmp, "ref"), config, *args)
    run = os.path.join(tmp, "run")
    train(run, config, *args, patch=_kill_at_step3, expect_ok=False)
    assert max(r[0] for r in metrics_curve(run)) == 3  # died after step 3 (checkpoint of step 2 on disk)
    train(run, config, *args)
    assert metrics_curve(run) == metrics_curve(ref)


@pytest.fixture(scope="session")
def pre_run(sft_env, tmp_path_factory) -> str:
    """A short pretraining run (tiny-cpu) on the same tokenizer: what fine-tuning starts from."""
    run = str(tmp_path_factory.mktemp("pre") / "run")
    return train(run, "configs/train/tiny-cpu.yaml", f"data.paths=[{sft_env['pre_data']}]", "data.seq_len=32",
                 "train.steps=8", "train.warmup_steps=2", "train.eval_interval=0", "checkpoint.interval=0",
                 "seed=3")
