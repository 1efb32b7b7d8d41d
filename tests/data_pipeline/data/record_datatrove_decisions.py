"""Record datatrove 0.10.1's keep/drop decision per filter per document of the bundled sample corpus into
datatrove_decisions.json (beside this file), for tests/data_pipeline/test_filter_fidelity.py.

datatrove needs spaCy and xxhash<4, which conflict with this project's environment, so it lives in a separate
virtual environment (torch not needed):

    python -m venv /tmp/dtvenv
    /tmp/dtvenv/bin/pip install datatrove==0.10.1 spacy "xxhash<4" regex
    python tests/data_pipeline/data/record_datatrove_decisions.py --datatrove-python /tmp/dtvenv/bin/python

In the project environment the script reads the corpus exactly as configs/data/sample.yaml's ``input`` does and
applies the clean step (the text every filter sees in the pipeline); it then runs itself under the datatrove
interpreter (``--worker``), which applies GopherQualityFilter, GopherRepetitionFilter, FineWebQualityFilter and
C4QualityFilter at their defaults to each document independently, and writes the decisions with an xxh64 of
each text (so the test notices a changed corpus).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
OUT = os.path.join(HERE, "datatrove_decisions.json")
FILTERS = ("gopher_quality", "gopher_repetition", "fineweb", "c4")


def corpus_docs() -> list[dict]:
    """The bundled corpus as the pipeline's filters see it: sample.yaml's readers, then the clean step."""
    from collections import Counter

    from data_pipeline import config
    from data_pipeline.filters.clean import clean_step
    from data_pipeline.readers import Reader, expand_paths
    cwd = os.getcwd()
    os.chdir(ROOT)  # sample.yaml's input paths are relative to the repository root
    try:
        cfg = config.load(os.path.join(ROOT, "configs", "data", "sample.yaml"), [])
        reader, docs = Reader(cfg.input, Counter()), []
        for kind, path, rel in expand_paths(cfg.input):
            for doc in reader.read(kind, path, rel):
                clean_step(doc, cfg.clean)
                docs.append({"id": doc["id"], "text": doc["text"]})
    finally:
        os.chdir(cwd)
    return docs


def text_hash(text: str) -> str:
    import xxhash
    return xxhash.xxh64_hexdigest(text.encode("utf-8"))


def worker(docs_path: str, out_path: str) -> None:
    """Runs under the datatrove interpreter."""
    import datatrove
    import spacy
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    filters = {"gopher_quality": GopherQualityFilter(), "gopher_repetition": GopherRepetitionFilter(),
               "fineweb": FineWebQualityFilter(), "c4": C4QualityFilter()}
    rows = []
    with open(docs_path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            row = [d["id"], text_hash(d["text"])]
            for name in FILTERS:
                verdict = filters[name].filter(Document(text=d["text"], id=d["id"]))
                row.append("keep" if verdict is True else verdict[1])
            rows.append(row)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"datatrove": datatrove.__version__ if hasattr(datatrove, "__version__") else "0.10.1",
                   "spacy": spacy.__version__, "columns": ["id", "xxh64", *FILTERS], "docs": rows}, f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    ap.add_argument("--worker", nargs=2, metavar=("DOCS_JSONL", "OUT_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(*a.worker)
        return
    sys.path.insert(0, ROOT)
    docs = corpus_docs()
    with tempfile.TemporaryDirectory() as tmp:
        docs_path, raw = os.path.join(tmp, "docs.jsonl"), os.path.join(tmp, "decisions.json")
        with open(docs_path, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        subprocess.run([a.datatrove_python, os.path.abspath(__file__), "--worker", docs_path, raw], check=True)
        with open(raw, encoding="utf-8") as f:
            rec = json.load(f)
    rec["source"] = ("configs/data/sample.yaml input, clean step applied; each filter at datatrove's defaults, "
                     "applied to each document independently")
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(json.dumps({k: v for k, v in rec.items() if k != "docs"}, ensure_ascii=False)[:-1] + ', "docs": [\n')
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rec["docs"]) + "\n]}\n")
    print(f"{len(rec['docs'])} documents -> {OUT}")


if __name__ == "__main__":
    main()
