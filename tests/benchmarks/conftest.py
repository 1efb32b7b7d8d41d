"""Fixtures for the benchmark tests: a tiny trained run (tokenizer + EOS-separated shards) and task folders."""
from __future__ import annotations

import json
import os

import pytest

from tests.trainer.conftest import make_data, train_run

TEXTS = ("The model learns from data and every token counts.",
         "Tests check numbers against references so nothing drifts quietly over time.",
         "Install the package, then run the tests again with care.",
         "A small language model on text: \u00fcn\u00efc\u00f6d\u00e9 bytes count too.")


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory) -> str:
    return make_data(str(tmp_path_factory.mktemp("bench_data")))


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory, bench_data) -> str:
    """6 steps of the tiny Llama on 32-token windows (max_seq_len 512)."""
    return train_run(str(tmp_path_factory.mktemp("bench") / "run"), bench_data)


def write_text_task(folder: str, name: str = "pub_text", texts=TEXTS) -> str:
    """The contract's task shape: dataset_path json + data_files, loglikelihood_rolling, bits_per_byte."""
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(folder, f"{name}.jsonl")
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: bits_per_byte\nmetadata:\n  version: 1.0\n")
    return folder


@pytest.fixture(scope="session")
def text_tasks(tmp_path_factory) -> str:
    return write_text_task(str(tmp_path_factory.mktemp("tasks")))
