"""One big input file is split into byte-range (jsonl) / row-group (parquet) tasks: every task count reads
exactly the documents of a whole-file read, with the same file:line ids, and the pipeline's outputs are byte
identical whatever the task and worker counts."""
from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.data_pipeline.conftest import run_inproc, tree_hashes
from tests.data_pipeline.corpus import document, near_duplicate

from data_pipeline.config import InputConfig
from data_pipeline.readers import Reader, expand_paths
from data_pipeline.task_plan import auto_tasks, plan_tasks


def _read(cfg: InputConfig, n_tasks: int):
    stats = Counter()
    reader = Reader(cfg, stats)
    plan = plan_tasks(expand_paths(cfg), n_tasks)
    per_task = [[d for piece in pieces for d in reader.read(*piece)] for pieces in plan]
    return per_task, stats, plan


def _awkward_jsonl(path) -> list[str]:
    """Lines of very different lengths, blank lines, a unicode line, no newline at the end."""
    lines = []
    for i in range(40):
        lines.append(json.dumps({"text": f"doc {i} " + "word " * (i * 7 % 23) + "é" * (i % 3)}))
        if i % 9 == 4:
            lines.append("")
    data = "\n".join(lines)  # the last line has no newline
    with open(path, "w", encoding="utf-8") as f:
        f.write(data)
    return lines


def test_jsonl_byte_ranges_read_every_line_once(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = _awkward_jsonl(path)
    cfg = InputConfig(paths=[str(path)])
    whole, _, _ = _read(cfg, 1)
    want = [(f"big.jsonl:{n}", json.loads(s)["text"]) for n, s in enumerate(lines, 1) if s]
    assert [(d["id"], d["text"]) for d in whole[0]] == want
    size = os.path.getsize(path)
    for n_tasks in (2, 3, 5, 7, 16, size // 3, size + 5):  # down to ranges shorter than a line, and empty ones
        per_task, _, plan = _read(cfg, n_tasks)
        assert [(d["id"], d["text"]) for t in per_task for d in t] == want, n_tasks
        assert sum(bool(t) for t in per_task) >= min(n_tasks, len(want)) // 3  # the work is really spread


def test_bad_line_in_a_later_piece_names_its_line(tmp_path):
    path = tmp_path / "b.jsonl"
    recs = [json.dumps({"text": f"document {i} " + "x" * 50}) for i in range(30)]
    recs[21] = "{broken"
    path.write_text("\n".join(recs) + "\n")
    cfg = InputConfig(paths=[str(path)], on_error="skip")
    per_task, stats, _ = _read(cfg, 4)
    assert stats["read_errors"] == 1 and sum(map(len, per_task)) == 29
    cfg = InputConfig(paths=[str(path)])
    reader = Reader(cfg, Counter())
    from data_pipeline.readers import InputError
    failed = []
    for t, pieces in enumerate(plan_tasks(expand_paths(cfg), 4)):
        try:
            [d for piece in pieces for d in reader.read(*piece)]
        except InputError as e:
            failed.append((t, str(e)))
    assert len(failed) == 1 and failed[0][0] == 2 and failed[0][1].endswith("b.jsonl:22: broken JSON (Expecting "
                                                                            "property name enclosed in double "
                                                                            "quotes at column 2)")


def test_parquet_row_groups_are_pieces(tmp_path):
    path = tmp_path / "big.parquet"
    texts = [f"parquet document {i} " + "w " * (i % 17) for i in range(100)]
    pq.write_table(pa.table({"text": texts}), str(path), row_group_size=9)  # 12 row groups
    cfg = InputConfig(paths=[str(path)])
    want = [(f"big.parquet:{i}", t) for i, t in enumerate(texts)]
    for n_tasks in (1, 2, 5, 12, 30):
        per_task, stats, plan = _read(cfg, n_tasks)
        assert [(d["id"], d["text"]) for t in per_task for d in t] == want
        assert sum(bool(t) for t in per_task) >= min(n_tasks, 12) * 3 // 4  # row groups spread over the tasks
    assert sum(bool(t) for t in _read(cfg, 5)[0]) == 5


def test_auto_task_count_follows_file_size(tmp_path):
    path = tmp_path / "big.jsonl"
    _awkward_jsonl(path)
    units = expand_paths(InputConfig(paths=[str(path)]))
    size = os.path.getsize(path)
    assert auto_tasks(units, size / 1e6) == 1
    assert auto_tasks(units, size / 4e6) == 4
    assert auto_tasks(units, 1e-9) == 64  # capped


def _big_corpus(root) -> str:
    """One jsonl with unique documents and planted exact / near duplicates far apart in the file."""
    recs = [{"text": document(5000 + i)} for i in range(160)]
    recs.insert(150, {"text": recs[3]["text"].upper()})  # exact after normalisation, 147 lines later
    recs.insert(120, {"text": near_duplicate(recs[10]["text"], 1)})
    recs.append({"text": near_duplicate(recs[10]["text"], 2)})
    path = os.path.join(root, "one.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return path


@pytest.mark.slow
def test_outputs_identical_whatever_tasks_and_workers(tmp_path):
    path = _big_corpus(str(tmp_path))
    outs = {}
    for name, extra in [("t1w1", ["tasks=1", "workers=1"]), ("auto", ["input.task_mb=0.03", "workers=2"])]:
        outs[name] = str(tmp_path / name)
        res = run_inproc(path, outs[name], *extra)
        stats = res["stats"]
        assert stats["dedup"]["exact"]["removed"] == 1 and stats["dedup"]["minhash"]["removed"] == 2
        assert stats["input"]["files"] == 1 and stats["input"]["docs"] == 163
    prep = [json.load(open(os.path.join(outs["auto"], "work", "markers", "prepare", n)))
            for n in sorted(os.listdir(os.path.join(outs["auto"], "work", "markers", "prepare")))]
    assert len(prep) >= 5 and all(p["read"]["docs"] > 0 for p in prep)  # the one file really was split
    finals = ("shards", "doc_ids", "tokenizer.model", "work/dedup/clusters.jsonl.zst")
    hashes = {k: {p: h for p, h in tree_hashes(v).items() if p.startswith(finals)} for k, v in outs.items()}
    assert len(hashes["t1w1"]) >= 6 and hashes["t1w1"] == hashes["auto"]
    # stats.json too, but for the task count it records
    st = {k: json.load(open(os.path.join(v, "stats.json"))) for k, v in outs.items()}
    for s in st.values():
        s["input"].pop("tasks")
    assert st["t1w1"] == st["auto"]
