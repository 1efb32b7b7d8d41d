"""The decontaminate step (data_pipeline/filters/decontaminate.py): datatrove's normalisation, planted 13-gram
overlaps removed (or redacted) and counted per evaluation file, the same bytes for 1 and 2 workers and after a
kill -9 and rerun, a changed evaluation file starts over, one-line errors, funnel.png."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import xxhash

from tests.data_pipeline.conftest import BASE, ROOT, cli, kept_ids, run_inproc, tree_hashes
from tests.data_pipeline.corpus import document, write_jsonl

from data_pipeline.config import STEP_NAMES, ConfigError, DecontaminateConfig, load
from data_pipeline.filters.decontaminate import ngram_hashes, word_spans, words

STEPS = "steps=[clean,length,decontaminate]"
SKIP = ("work/timings", "config.yaml", "work/config.yaml")
CONTEXT = ("Question: which famous bridge did the careful painter describe in the letter he sent to the museum "
           "council last winter? Think about it.")
TARGET = "The golden bridge near the harbor, which the council later protected for every village."
CHOICE = "An ancient castle whose library the merchant visited quietly before the long journey across the ocean."
TXT = "Record of the strange morning when the patient doctor repaired the old engine of the distant station."
# 13 words of each, written differently (case, punctuation, spacing): the same normalised n-gram
PLANTS = {2: "WHICH famous bridge -- did the careful painter describe in the letter; he sent",  # context
          9: "the strange morning when the patient doctor repaired the old engine of the",  # eval.txt
          15: "whose library the merchant visited quietly before the long journey across the ocean"}  # a choice
NEAR = "which famous bridge did the careful painter describe in the letter he"  # 12 words only: kept


def test_normalisation_follows_datatrove():
    assert words("Hello, World! It's 3.14 -- café NAÏVE 1,000,000\tend.") == [
        "hello", "world", "it", "s", "0", "cafe", "naive", "0", "0", "end"]
    for text in ("Mixed  ＡＢＣ１２ «quotes» x\u0301y İstanbul 12.5.3 ok", CONTEXT, "a—b–c…d"):
        ws, spans = word_spans(text)
        assert ws == words(text) and len(spans) == len(ws)
    ws = words(TARGET)
    assert ngram_hashes(ws, 13).tolist()[0] == xxhash.xxh64_intdigest(" ".join(ws[:13]).encode())
    assert len(ngram_hashes(ws[:12], 13)) == 0
    assert STEP_NAMES.index("decontaminate") == STEP_NAMES.index("quality_classifier") - 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dc")
    evals = root / "evals"
    write_jsonl(str(evals / "eval.jsonl"), [
        {"context": CONTEXT, "target": TARGET, "choices": [TARGET, CHOICE], "label": 0},
        {"context": "Too short to count.", "target": "yes"},  # fewer than 13 words: ignored (as datatrove)
        {"text": document(777, 1)}])
    (evals / "eval.txt").write_text(TXT + "\n")
    recs = [{"id": f"d{i}", "text": document(4000 + i)} for i in range(20)]
    for i, plant in PLANTS.items():
        recs[i]["text"] += f"\n\nAs noted: {plant} and so on."
    recs[4]["text"] += f"\n\nAlmost: {NEAR}, nothing more."
    recs[6]["text"] += "\n\nToo short to count. yes"
    write_jsonl(str(root / "corpus" / "c.jsonl"), recs)
    return str(root / "corpus"), str(evals), recs


def _args(evals, *more):
    return (STEPS, "decontaminate.enabled=true", f"decontaminate.paths=[{evals}]", "dedup.minhash.enabled=false",
            *more)


def _prepared(out):
    from data_pipeline.atomic_io import read_jsonl
    folder = os.path.join(out, "work", "prepared")
    return {d["id"]: d["text"] for n in sorted(os.listdir(folder)) for d in read_jsonl(os.path.join(folder, n))}


def test_planted_overlaps_are_removed_and_counted_per_file(corpus, tmp_path):
    root, evals, _ = corpus
    out = str(tmp_path / "out")
    s = run_inproc(root, out, "workers=1", *_args(evals))["stats"]
    lines = sorted(int(i.split(":")[1]) - 1 for i in kept_ids(out))
    assert lines == [i for i in range(20) if i not in PLANTS]
    row = next(r for r in s["steps"] if r["name"] == "decontaminate")
    assert row["removed"] == {"decontaminate.contaminated": 3} and "counts" not in row
    dc = s["decontaminate"]
    jl, txt = os.path.join(evals, "eval.jsonl"), os.path.join(evals, "eval.txt")
    assert dc["contaminated_by"] == {jl: 2, txt: 1} and dc["contaminated_docs"] == 3
    assert [(f["path"], f["docs"], f["short_docs"]) for f in dc["files"]] == [(jl, 3, 1), (txt, 1, 0)]
    assert dc["index_bytes"] == 12 * dc["index_entries"] == 12 * sum(f["ngrams"] for f in dc["files"])
    assert dc["mode"] == "remove" and dc["ngram"] == 13
    assert open(os.path.join(out, "funnel.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(jl) and os.path.isfile(txt)


def test_redact_cuts_the_spans_and_keeps_the_rest(corpus, tmp_path):
    root, evals, recs = corpus
    out = str(tmp_path / "out")
    s = run_inproc(root, out, "workers=1", *_args(evals, "decontaminate.mode=redact"))["stats"]
    texts = _prepared(out)
    assert len(texts) == 20
    for i, plant in PLANTS.items():
        first, last = plant.split()[0], plant.split()[-1].rstrip("!")
        want = recs[i]["text"].replace(plant[plant.index(first):plant.rindex(last) + len(last)], "")
        assert texts[f"c.jsonl:{i + 1}"] == want and want.endswith(":  and so on.")
    assert texts["c.jsonl:5"] == recs[4]["text"]
    row = next(r for r in s["steps"] if r["name"] == "decontaminate")
    assert row["removed"] == {} and row["counts"] == {"redacted_docs": 3, "redacted_spans": 3, "redacted_words": 39}
    assert sum(s["decontaminate"]["contaminated_by"].values()) == 3


def _start(root, evals, out):
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "data_pipeline", "run", os.path.join(ROOT, "configs/data/sample.yaml"),
            f"input.paths=[{root}]", f"output_dir={out}", "workers=2", "tasks=2", *BASE, *_args(evals)]
    return subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_workers_and_kill_9_give_the_same_bytes(corpus, tmp_path):
    from tests.data_pipeline.test_resume import _kill_when
    root, evals, _ = corpus
    sample = os.path.join(ROOT, "configs/data/sample.yaml")
    outs = {}
    for w in (1, 2):
        outs[w] = str(tmp_path / f"w{w}")
        run_inproc(root, outs[w], f"workers={w}", "tasks=2", *_args(evals))
    h1 = tree_hashes(outs[1], SKIP)
    assert h1 == tree_hashes(outs[2], SKIP) and "funnel.png" in h1 and "work/decontaminate/index-hashes.npy" in h1
    killed = str(tmp_path / "killed")
    proc = _start(root, evals, killed)
    _kill_when(proc, os.path.join(killed, "work", "markers", "decontaminate", "*.json"))
    assert not os.path.exists(os.path.join(killed, "stats.json")), "the kill came after the run finished"
    from data_pipeline import config, pipeline
    cfg = config.load(sample, [f"input.paths=[{root}]", f"output_dir={killed}", "workers=2", "tasks=2", *BASE,
                               *_args(evals)])
    pipeline.run(cfg)
    ref = str(tmp_path / "ref")
    pipeline.run(config.load(sample, [f"input.paths=[{root}]", f"output_dir={ref}", "workers=1", "tasks=2", *BASE,
                                      *_args(evals)]))
    assert tree_hashes(killed, SKIP) == tree_hashes(ref, SKIP)
    assert os.path.isfile(os.path.join(evals, "eval.jsonl"))


def test_a_changed_evaluation_file_starts_over(corpus, tmp_path, capsys):
    root, evals, recs = corpus
    mine = tmp_path / "evals"
    mine.mkdir()
    (mine / "e.txt").write_text(TXT)
    out = str(tmp_path / "out")
    first = run_inproc(root, out, "workers=1", *_args(str(mine)))["stats"]
    assert sum(first["decontaminate"]["contaminated_by"].values()) == 1
    (mine / "e.txt").write_text(TXT + "\n" + CONTEXT)
    again = run_inproc(root, out, "workers=1", *_args(str(mine)))["stats"]
    assert "starting over" in capsys.readouterr().out
    assert again["decontaminate"]["contaminated_by"] == {str(mine / "e.txt"): 2}
    assert (mine / "e.txt").read_text() == TXT + "\n" + CONTEXT  # never removed by the start-over


@pytest.mark.parametrize("case", ["missing", "empty_folder", "broken_json", "no_text_key", "ngram0"])
def test_bad_decontamination_input_is_one_line_and_no_output(corpus, tmp_path, case):
    root, _, _ = corpus
    bad, extra = tmp_path / "eval.jsonl", []
    if case == "empty_folder":
        bad = tmp_path / "evals"
        bad.mkdir()
        (bad / "notes.csv").write_text("a,b\n")
    elif case == "broken_json":
        bad.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    elif case == "no_text_key":
        bad.write_text('{"body": "no known field"}\n')
    elif case == "ngram0":
        bad.write_text('{"text": "fine"}\n')
        extra = ["decontaminate.ngram=0"]
    out = tmp_path / "out"
    p = cli("run", "configs/data/sample.yaml", f"input.paths=[{root}]", f"output_dir={out}", *BASE,
            *_args(str(bad)), *extra, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert ("decontaminate.ngram" if case == "ngram0" else str(bad)) in lines[0]
    want = {"missing": "no such file", "empty_folder": "without evaluation files", "broken_json": ":2: broken JSON",
            "no_text_key": "none of the fields", "ngram0": ">= 1"}[case]
    assert want in lines[0], lines[0]
    assert not out.exists()


def test_off_by_default_and_needs_its_step():
    cfg = load(None, ["input.paths=[x]"])
    assert cfg.decontaminate == DecontaminateConfig() and not cfg.decontaminate.enabled
    assert cfg.decontaminate.ngram == 13 and cfg.decontaminate.mode == "remove"
    assert {"context", "target", "choices", "text"} <= set(cfg.decontaminate.text_keys)
    with pytest.raises(ConfigError, match="decontaminate.enabled"):
        load(None, ["input.paths=[x]", "decontaminate.enabled=true", "decontaminate.paths=[e]", "steps=[clean]"])
    with pytest.raises(ConfigError, match="decontaminate.mode"):
        load(None, ["input.paths=[x]", "decontaminate.mode=mask"])
    with pytest.raises(ConfigError, match="decontaminate.paths"):
        load(None, ["input.paths=[x]", "decontaminate.enabled=true"])


def test_the_bundled_task_files_index_with_the_default_keys():
    from data_pipeline.filters.decontaminate import build_index
    folder = os.path.join(ROOT, "llmforge", "inference", "eval_tasks", "data")
    hashes, files, info = build_index(DecontaminateConfig(enabled=True, paths=[folder]))
    assert [os.path.basename(f["path"]) for f in info] == ["sample_next_line.jsonl", "sample_next_line_mc.jsonl",
                                                          "sample_valid.jsonl"]
    assert all(f["docs"] > 0 and f["ngrams"] > 0 for f in info)
    assert len(hashes) == len(files) == sum(f["ngrams"] for f in info)
    assert (hashes[1:] >= hashes[:-1]).all()
    mc = json.loads(open(os.path.join(folder, "sample_next_line_mc.jsonl")).readline())
    assert set(mc) & set(DecontaminateConfig().text_keys) == {"context", "target", "choices"}
