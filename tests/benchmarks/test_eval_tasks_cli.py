"""``python -m llmforge.eval RUN --tasks ...``: the contract's task folder, every shipped task offline, and the
one-line errors (exit 2) for a task file that does not parse, an unknown task, a run without a checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
from llmforge.inference.benchmarks import SHIPPED_TASKS_DIR, flat_metrics, run_tasks_on_model  # noqa: E402
from llmforge.inference.eval import main as eval_main  # noqa: E402
from llmforge.inference.run_loading import load_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = {"sample_valid_bpb": {"bits_per_byte", "byte_perplexity", "word_perplexity"},
           "sample_next_line": {"bleu", "rouge1", "rouge2", "rougeL"},
           "sample_next_line_mc": {"acc", "acc_norm"}}


def test_contract_task_folder_writes_eval_tasks_json(bench_run, text_tasks, capsys):
    assert eval_main([bench_run, "--tasks", "pub_text", "--include-path", text_tasks]) == 0
    res = json.load(open(os.path.join(bench_run, "eval_tasks.json")))
    bpb = res["results"]["pub_text"]["bits_per_byte,none"]
    assert res["metrics"] == {"pub_text/bits_per_byte": bpb} and 0 < bpb < 20
    assert res["n-samples"]["pub_text"]["effective"] == 4 and res["step"] == 6
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pub_text/bits_per_byte"] == bpb


def test_every_shipped_task_runs_offline(bench_run, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert eval_main([bench_run, "--tasks", ",".join(SHIPPED), "--limit", "3", "--batch-size", "4"]) == 0
    res = json.load(open(os.path.join(bench_run, "eval_tasks.json")))
    for task, metrics in SHIPPED.items():
        assert {k.split("/", 1)[1] for k in res["metrics"] if k.startswith(task + "/")} == metrics
        assert res["n-samples"][task]["effective"] == 3
    assert 0 <= res["metrics"]["sample_next_line_mc/acc"] <= 1
    assert res["metrics"]["sample_valid_bpb/bits_per_byte"] > 0


def test_shipped_data_has_provenance():
    with open(os.path.join(SHIPPED_TASKS_DIR, "PROVENANCE.md")) as f:
        text = f.read()
    rows = {}
    for name in ("sample_valid.jsonl", "sample_next_line.jsonl", "sample_next_line_mc.jsonl"):
        rows[name] = [json.loads(line) for line in open(os.path.join(SHIPPED_TASKS_DIR, "data", name))]
        assert rows[name] and all(r["license"] and r["source"] for r in rows[name]) and name in text
    assert [r["target"] for r in rows["sample_next_line.jsonl"]] == [
        r["choices"][r["label"]] for r in rows["sample_next_line_mc.jsonl"]]


def test_in_training_helpers_keep_rng_and_mode_and_match_the_cli(bench_run, text_tasks, tmp_path):
    """run_tasks_on_model (an unsharded model) and run_tasks_in_training (what the trainer calls on its possibly
    sharded parts: a copy gathered through DCP) give the CLI's numbers; the model's mode, every RNG and the run dir
    are left as they were."""
    import random
    from types import SimpleNamespace

    import torch

    from llmforge.inference.benchmarks import run_tasks_in_training
    assert eval_main([bench_run, "--tasks", "pub_text", "--include-path", text_tasks]) == 0
    ref = json.load(open(os.path.join(bench_run, "eval_tasks.json")))["metrics"]
    run = load_run(bench_run)
    run.model.train()
    torch.manual_seed(5)
    random.seed(5)
    want = (torch.rand(1).item(), random.random())
    torch.manual_seed(5)
    random.seed(5)
    got = run_tasks_on_model(run.model, run.tokenizer, ["pub_text"], text_tasks, batch_size=3)
    assert (torch.rand(1).item(), random.random()) == want and run.model.training
    assert got == pytest.approx(ref, rel=1e-6)
    cfg = SimpleNamespace(tasks=["pub_text"], include_paths=[text_tasks], limit=0, num_fewshot=-1, batch_size=2)
    assert run_tasks_in_training([run.model], run.model.args, run.tokenizer, cfg, str(tmp_path)) == pytest.approx(
        ref, rel=1e-6)
    assert os.listdir(tmp_path) == []


def test_flat_metrics_names():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 1.0,
                             "x_stderr,none": "N/A"}}}
    assert flat_metrics(res) == {"t/acc": 0.5, "t/exact_match_strict-match": 1.0}


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_errors_are_one_line_and_exit_2(bench_run, text_tasks, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\nmetric_list:\n  - metric: acc\n   bad_indent: [\n")
    # a real process: nothing but the one line on stderr (the task files are checked before lm-eval loads)
    res = subprocess.run([sys.executable, "-m", "llmforge.eval", bench_run, "--tasks", "broken", "--include-path",
                          str(bad)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stdout == "", res.stderr
    assert res.stderr.startswith(f"error: {bad / 'broken.yaml'}:4: task file does not parse"), res.stderr

    assert eval_main([bench_run, "--tasks", "pub_txt", "--include-path", text_tasks]) == 2
    line = _last_error(capsys)
    assert line.startswith("error: --tasks: unknown task 'pub_txt'") and "did you mean pub_text" in line, line

    empty = tmp_path / "run_without_checkpoint"
    empty.mkdir()
    with open(os.path.join(bench_run, "config.yaml")) as f:
        (empty / "config.yaml").write_text(f.read())
    assert eval_main([str(empty), "--tasks", "pub_text", "--include-path", text_tasks]) == 2
    assert "no complete checkpoint" in _last_error(capsys)
    assert not (empty / "eval_tasks.json").exists()

