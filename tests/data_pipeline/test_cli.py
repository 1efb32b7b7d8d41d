"""The CLI contract: run's outputs, one-line config errors with exit 2 and no output, merge and inspect."""
from __future__ import annotations

import os

import numpy as np
from tests.data_pipeline.conftest import cli

from data_pipeline.shards import IndexedShard


def test_unknown_key_exits_2_naming_key_and_suggestion(tmp_path):
    p = cli("run", "configs/data/sample.yaml", f"output_dir={tmp_path / 'o'}", "tokenizer.vocab_sise=100")
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: unknown config key 'tokenizer.vocab_sise'; did you mean "
                                "tokenizer.vocab_size?")
    assert not (tmp_path / "o").exists()
    p = cli("run", "configs/data/sample.yaml", f"output_dir={tmp_path / 'o'}", "no_such_key=1")
    assert p.returncode == 2 and "no_such_key" in p.stderr and "Traceback" not in p.stderr


def test_bad_values_are_config_errors(tmp_path):
    p = cli("run", "configs/data/sample.yaml", f"output_dir={tmp_path / 'o'}", "workers=0")
    assert p.returncode == 2 and p.stderr.strip() == "error: workers=0 is out of range: must be >= 1"
    p = cli("run", "configs/data/sample.yaml", "steps=[clean,nope]")
    assert p.returncode == 2 and "unknown step 'nope'" in p.stderr


def test_merge_and_inspect(pipeline_run, tmp_path):
    out, _, _ = pipeline_run
    train, valid = (os.path.join(out, "shards", f"{s}-00000") for s in ("train", "valid"))
    merged = str(tmp_path / "merged")
    p = cli("merge", merged, train, valid)
    assert p.returncode == 0, p.stderr
    a, b, m = IndexedShard(train), IndexedShard(valid), IndexedShard(merged)
    assert len(m) == len(a) + len(b) and m.num_tokens == a.num_tokens + b.num_tokens
    assert np.array_equal(m.doc(len(a)), b.doc(0))
    p = cli("inspect", valid, "--n", "2")
    assert p.returncode == 0, p.stderr
    first_id = open(os.path.join(out, "doc_ids", "valid-00000.txt")).readline().strip()
    assert f"--- doc 0 id={first_id}" in p.stdout and "ends with eos: True" in p.stdout
    assert p.stdout.count("--- doc") == 2


def test_keys_lists_contract_keys():
    p = cli("keys")
    keys = {line.split()[0] for line in p.stdout.splitlines()}
    assert {"input.paths", "input.text_key", "output_dir", "workers", "tokenizer.vocab_size"} <= keys
    rows = {line.split()[0]: line for line in p.stdout.splitlines()}
    assert "[0, 1]" in rows["gopher_repetition.dup_line_frac"] and ">= 1" in rows["input.max_doc_chars"]  # ranges
