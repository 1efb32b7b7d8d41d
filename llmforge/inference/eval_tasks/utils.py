"""Functions the shipped task files name with ``!function utils.NAME`` (lm-eval imports this file by path).

The data lives beside this file (``data/*.jsonl``), so the tasks work from any working directory and offline.
"""
from __future__ import annotations

import json
import os

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_ROUGE = None


def load(data_file: str, **_metadata):
    """custom_dataset: lm-eval calls it with the task's metadata and dataset_kwargs; -> DatasetDict(test=...)."""
    import datasets
    with open(os.path.join(DATA, data_file), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results_gen(doc, results):
    """Corpus BLEU (lm-eval's ``bleu`` aggregation over (reference, prediction) pairs, sacrebleu) and ROUGE-1/2/L
    F-measures (rouge_score, as lm-eval's own generation tasks compute them), in percent like BLEU."""
    global _ROUGE
    from rouge_score import rouge_scorer
    if _ROUGE is None:
        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pred, ref = results[0].strip(), doc["target"]
    scores = _ROUGE.score(ref, pred)
    return {"bleu": (ref, pred), **{k: 100.0 * v.fmeasure for k, v in scores.items()}}
