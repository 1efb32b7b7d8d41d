"""eval.tasks during training: task/metric rows in metrics.jsonl at the eval cadence, equal to what
``python -m llmforge.eval RUN --tasks`` gives on the final checkpoint."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")
from llmforge.inference.eval import main as eval_main  # noqa: E402
from tests.trainer.conftest import train_run  # noqa: E402


def benchmark_rows(run_dir: str, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_eval_tasks_are_logged_at_the_eval_cadence_and_match_the_cli(bench_data, text_tasks, tmp_path):
    run = train_run(str(tmp_path / "run"), bench_data, "eval.tasks=[pub_text]", f"eval.include_paths=[{text_tasks}]",
                    "train.eval_interval=3", "logging.plot=true")
    logged = benchmark_rows(run, "pub_text/bits_per_byte")
    assert [step for step, _ in logged] == [3, 6]
    assert eval_main([run, "--tasks", "pub_text", "--include-path", text_tasks]) == 0
    final = json.load(open(os.path.join(run, "eval_tasks.json")))["metrics"]["pub_text/bits_per_byte"]
    assert logged[-1][1] == pytest.approx(final, rel=1e-6)  # the final checkpoint's weights
    assert logged[0][1] != logged[-1][1]
    assert os.path.isfile(os.path.join(run, "benchmarks.png"))
    assert not os.path.exists(os.path.join(run, ".benchmark_weights"))
