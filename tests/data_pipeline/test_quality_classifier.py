"""The trained quality classifier (data_pipeline/filters/quality_classifier.py): train-classifier on two separable
sets, the step with a threshold or a per-task keep_fraction, reproducible outputs, one-line errors."""
from __future__ import annotations

import json
import os
import random

import pytest

from tests.data_pipeline.conftest import cli, kept_ids, run_inproc, tree_hashes
from tests.data_pipeline.corpus import document, write_jsonl

pytest.importorskip("fasttext")

SPAM = ("buy now cheap best price click here free offer limited deal discount winner casino pills bonus "
        "subscribe today act fast").split()
STEPS = "steps=[clean,length,quality_classifier]"  # the other filters are tested elsewhere (and slower)
SMALL = ["--dim", "16", "--bucket", "20000", "--epoch", "20"]


def spam(seed: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(SPAM).upper() if rng.random() < 0.3 else rng.choice(SPAM) for _ in range(12))
             + f" {rng.randint(0, 999)}!!!" for _ in range(8)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc")
    pos = write_jsonl(str(root / "pos.jsonl"), [{"text": document(900000 + i, 2)} for i in range(60)])
    neg = write_jsonl(str(root / "neg.jsonl"), [{"text": spam(900000 + i)} for i in range(60)])
    out = str(root / "quality.bin")
    p = cli("train-classifier", "--positive", pos, "--negative", neg, "--out", out, *SMALL)
    assert p.returncode == 0, p.stderr
    assert "precision" in p.stdout and "recall" in p.stdout
    return out, p.stdout


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Two files, each half hq (ids h*) and half lq (ids l*), interleaved."""
    root = tmp_path_factory.mktemp("qcorpus")
    for f in range(2):
        recs = []
        for i in range(20):
            recs.append({"id": f"h{f}-{i}", "text": document(f * 1000 + i)})
            recs.append({"id": f"l{f}-{i}", "text": spam(f * 1000 + i)})
        write_jsonl(str(root / f"part-{f}.jsonl"), recs)
    return str(root)


def test_contract_sets_train_and_card(tmp_path):
    pos = write_jsonl(str(tmp_path / "pos.jsonl"), [
        {"text": f"The function returns the parsed value {i} and raises an error when the input is empty."}
        for i in range(60)])
    neg = write_jsonl(str(tmp_path / "neg.jsonl"), [
        {"text": f"BUY NOW cheap {i} best price click here click here free free free"} for i in range(60)])
    out = str(tmp_path / "quality.bin")
    p = cli("train-classifier", "--positive", pos, "--negative", neg, "--out", out)
    assert p.returncode == 0, p.stderr
    assert os.path.isfile(out)
    card = json.load(open(out + ".json"))
    assert card["inputs"]["positive"] == [{"path": pos, "docs": 60}]
    assert card["inputs"]["negative"] == [{"path": neg, "docs": 60}]
    assert card["sizes"] == {"train": {"hq": 48, "lq": 48}, "valid": {"hq": 12, "lq": 12}}
    assert card["scores"]["precision"] >= 0.9 and card["scores"]["recall"] >= 0.9


def test_held_out_documents_scored_right(model):
    from data_pipeline.config import QualityClassifierConfig
    from data_pipeline.filters.quality_classifier import score
    path, stdout = model
    card = json.load(open(path + ".json"))
    assert card["scores"]["precision"] >= 0.9 and card["scores"]["recall"] >= 0.9, card["scores"]
    cfg = QualityClassifierConfig(enabled=True, model_path=path)
    # documents the training never saw
    hq = [score(document(5_000_000 + i), cfg) >= 0.5 for i in range(30)]
    lq = [score(spam(5_000_000 + i), cfg) >= 0.5 for i in range(30)]
    tp, fp, fn = sum(hq), sum(lq), 30 - sum(hq)
    assert tp / (tp + fp) >= 0.9 and tp / (tp + fn) >= 0.9


def test_training_is_reproducible(model, tmp_path):
    path, _ = model
    root = os.path.dirname(path)
    out = str(tmp_path / "again.bin")
    p = cli("train-classifier", "--positive", os.path.join(root, "pos.jsonl"), "--negative",
            os.path.join(root, "neg.jsonl"), "--out", out, *SMALL)
    assert p.returncode == 0, p.stderr
    assert open(out, "rb").read() == open(path, "rb").read()


def _prepared_docs(out):
    from data_pipeline.atomic_io import read_jsonl
    folder = os.path.join(out, "work", "prepared")
    return [d for n in sorted(os.listdir(folder)) for d in read_jsonl(os.path.join(folder, n))]


def test_threshold_removes_low_quality(model, mixed_corpus, tmp_path):
    out = str(tmp_path / "out")
    result = run_inproc(mixed_corpus, out, STEPS, "workers=1", "quality_classifier.enabled=true",
                        f"quality_classifier.model_path={model[0]}")
    ids = kept_ids(out)
    assert ids and all(i.split(":")[0] in ("part-0.jsonl", "part-1.jsonl") for i in ids)
    prepared = _prepared_docs(out)
    assert {d["id"] for d in prepared} and all(d["meta"]["quality_score"] >= 0.5 for d in prepared)
    kept_lines = sorted(int(d["id"].split(":")[1]) for d in prepared if d["id"].startswith("part-0"))
    assert kept_lines == list(range(1, 41, 2))  # the odd lines are the hq documents
    step = next(s for s in result["stats"]["steps"] if s["name"] == "quality_classifier")
    assert step["docs_in"] == 80 and step["docs_out"] == 40
    assert step["removed"] == {"quality_classifier.below_threshold": 40}
    q = result["stats"]["quality_classifier"]
    assert sum(q["kept"]) == 40 and sum(q["removed"]) == 40
    assert open(os.path.join(out, "quality.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_keep_fraction_per_task_and_workers_identical(model, mixed_corpus, tmp_path):
    from data_pipeline.executor import stage_results
    from data_pipeline.work_dirs import work_dir
    args = (STEPS, "tasks=3", "quality_classifier.enabled=true", f"quality_classifier.model_path={model[0]}",
            "quality_classifier.keep_fraction=0.5")
    outs = {}
    for w in (1, 2):
        outs[w] = str(tmp_path / f"w{w}")
        run_inproc(mixed_corpus, outs[w], f"workers={w}", *args)
    per_task = stage_results(work_dir(outs[1]), "prepare", 3)
    for t in per_task:
        st = t["steps"]["quality_classifier"]
        assert abs(st["docs_out"] - 0.5 * st["docs_in"]) <= 1, st
        assert t["kept_docs"] == st["docs_out"]
    assert sum(t["steps"]["quality_classifier"]["docs_in"] for t in per_task) == 80
    h1, h2 = (tree_hashes(outs[w], skip=("work/timings", "config.yaml", "work/config.yaml")) for w in (1, 2))
    assert h1 == h2
    assert "quality.png" in h1 and any(k.startswith("shards/") for k in h1)


def test_default_is_off_and_writes_no_png(mixed_corpus, tmp_path):
    out = str(tmp_path / "out")
    result = run_inproc(mixed_corpus, out, STEPS, "workers=1")
    assert "quality_classifier" not in result["stats"]
    assert not os.path.exists(os.path.join(out, "quality.png"))
    assert all(s["name"] != "quality_classifier" for s in result["stats"]["steps"])


@pytest.mark.parametrize("kind", ["missing", "text"])
def test_bad_model_path_one_line(mixed_corpus, tmp_path, kind):
    path = str(tmp_path / "model.bin")
    if kind == "text":
        open(path, "w").write("this is not a model\n")
    out = str(tmp_path / "out")
    p = cli("run", _config(tmp_path, mixed_corpus, out), "quality_classifier.enabled=true",
            f"quality_classifier.model_path={path}")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "quality_classifier.model_path" in lines[0] and path in lines[0]
    assert ("no such file" if kind == "missing" else "not a fastText model") in lines[0]
    assert not os.path.exists(out)


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_keep_fraction_range(mixed_corpus, tmp_path, model, value):
    out = str(tmp_path / "out")
    p = cli("run", _config(tmp_path, mixed_corpus, out), "quality_classifier.enabled=true",
            f"quality_classifier.model_path={model[0]}", f"quality_classifier.keep_fraction={value}")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "quality_classifier.keep_fraction" in lines[0], p.stderr
    assert not os.path.exists(out)


def test_select_top_ties_and_rounding():
    from data_pipeline.filters.quality_classifier import select_top
    assert select_top([0.5, 0.9, 0.5, 0.1], 0.5) == [True, True, False, False]
    assert sum(select_top([0.3] * 7, 0.5)) == 4  # round half up: 3.5 -> 4
    assert select_top([], 0.5) == []
    assert select_top([0.2, 0.1], 1.0) == [True, True]


def _config(tmp_path, corpus, out):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input:\n  paths: [{corpus}]\noutput_dir: {out}\nprogress: false\ntokenizer:\n  vocab_size: 320\n")
    return str(cfg)


def test_train_missing_input_one_line(tmp_path):
    neg = write_jsonl(str(tmp_path / "neg.jsonl"), [{"text": spam(i)} for i in range(5)])
    p = cli("train-classifier", "--positive", str(tmp_path / "nope.jsonl"), "--negative", neg,
            "--out", str(tmp_path / "m.bin"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "--positive" in lines[0] and "nope.jsonl" in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "m.bin")
