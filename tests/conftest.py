"""Shared fixtures: tiny shard datasets written with the real shard writer, and a CLI runner."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
# HF tokenizers used in this process (exports, lm-eval) must not leave a Rust thread pool for fork-based tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end or many-process tests (still run in CI)")


def write_synthetic_shards(out_dir, n_train=200, n_valid=10, vocab=64, seed=0):
    """Learnable documents (a repeated random 8-token motif, then EOS=2) as train/valid shards."""
    from data_pipeline.shards import ShardWriter
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        with ShardWriter(os.path.join(out_dir, "shards", f"{split}-00000")) as w:
            for _ in range(n):
                length = int(rng.integers(50, 400))
                motif = rng.integers(4, vocab, size=8)
                w.add_document(np.concatenate([np.tile(motif, length // 8 + 1)[:length], [2]]))
    return out_dir


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that initialises a process group in the pytest process (in-process CLIs, DCP loads) must not leave
    it to the next one: fork-based multi-process tests would inherit a group whose gloo threads did not survive
    the fork, and hang in their first collective."""
    yield
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("synth")))


def run_cli(args, timeout=600, env=None):
    """Run a command with the repo on PYTHONPATH; return CompletedProcess (text)."""
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), WANDB_MODE="disabled")
    e.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e)


def train_cmd(nproc=1):
    if nproc == 1:
        return [sys.executable, "-m", "llmforge.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llmforge.train"]


def read_metrics(run_dir):
    import json
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}
