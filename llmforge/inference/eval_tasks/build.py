"""Rebuild the shipped benchmark data from the sample corpus's validation split (see PROVENANCE.md).

    python -m data_pipeline run configs/data/sample.yaml output_dir=/tmp/sample
    python llmforge/inference/eval_tasks/build.py /tmp/sample          # writes llmforge/inference/eval_tasks/data/*.jsonl

The validation documents are the ones the pipeline put in ``shards/valid-*`` (listed in work/tokens/valid-*.ids),
with the text the pipeline tokenized (work/prepared, after cleaning); each is checked against its tokens in the
shard. From them, deterministically (fixed seed, sorted ids):
- sample_valid.jsonl: every validation document (bits per byte, loglikelihood_rolling);
- sample_next_line.jsonl: a few lines before -> the next line (generation, BLEU/ROUGE);
- sample_next_line_mc.jsonl: the same contexts, the true next line among 3 lines of other documents (accuracy).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import sys
from llmforge.common.atomic import write_text

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 17
PER_DOC = 4           # generation/MC items per document at most
CONTEXT_CHARS = 600   # context = whole lines before the target, up to this many characters
HTML_SOURCE = ("python3.11-doc==3.11.2-6+deb12u8", "PSF-2.0")  # sample_corpus/html/: CPython docs pages


def read_jsonl(path: str):
    if path.endswith(".zst"):
        import io

        import zstandard
        with open(path, "rb") as f:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
            yield from (json.loads(line) for line in text if line.strip())
        return
    with open(path, encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def validation_docs(out_dir: str) -> list[dict]:
    """The pipeline's validation documents with their tokenized text, checked against shards/valid-*."""
    import numpy as np
    import sentencepiece as spm
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from llmforge.common.shards import IndexedShard
    work = os.path.join(out_dir, "work")
    ids = [line.strip() for p in sorted(glob.glob(os.path.join(work, "tokens", "valid-*.ids")))
           for line in open(p) if line.strip()]
    wanted, docs = set(ids), {}
    for p in sorted(glob.glob(os.path.join(work, "prepared", "*.jsonl*"))):
        for d in read_jsonl(p):
            if d["id"] in wanted:
                docs[d["id"]] = d
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    stream = np.concatenate([np.asarray(IndexedShard(p[:-4]).tokens, dtype=np.int64)
                             for p in sorted(glob.glob(os.path.join(out_dir, "shards", "valid-*.idx")))])
    pos = 0
    for i in ids:  # shards hold the documents in .ids order, each followed by EOS
        enc = sp.encode(docs[i]["text"]) + [sp.eos_id()]
        if stream[pos:pos + len(enc)].tolist() != enc:
            raise SystemExit(f"{i}: text does not match its tokens in shards/valid-*: rerun the pipeline")
        pos += len(enc)
    if pos != len(stream):
        raise SystemExit("shards/valid-* has tokens no listed document accounts for")
    rows = []
    for i in sorted(ids):
        meta = docs[i].get("meta", {})
        source, lic = meta.get("source", ""), meta.get("license", "")
        if i.startswith("html/") and not source:  # the HTML pages carry no record metadata (PROVENANCE.md)
            source, lic = HTML_SOURCE
        rows.append({"id": meta.get("source_id", i), "text": docs[i]["text"], "source": source, "license": lic})
    return rows


def is_prose(line: str) -> bool:
    words = line.split()
    letters = sum(c.isalpha() for c in line)
    return 6 <= len(words) <= 40 and letters >= 0.7 * len(line.replace(" ", "")) and not re.match(r"^[\W_]", line)


def next_line_items(docs: list[dict]) -> list[dict]:
    rng = random.Random(SEED)
    items = []
    for d in docs:
        lines = d["text"].split("\n")
        cands = [k for k in range(1, len(lines)) if is_prose(lines[k].strip()) and lines[k - 1].strip()]
        for k in sorted(rng.sample(cands, min(PER_DOC, len(cands)))):
            ctx, j = "", k
            while j > 0 and len(lines[j - 1]) + 1 + len(ctx) <= CONTEXT_CHARS:
                ctx, j = lines[j - 1] + "\n" + ctx, j - 1
            if ctx.strip():
                items.append({"doc": d["id"], "context": ctx, "target": lines[k].strip(), "source": d["source"],
                              "license": d["license"]})
    return items


def multiple_choice(items: list[dict]) -> list[dict]:
    """Three distractors per item: target lines of other documents, the closest in length (ties by seeded draw)."""
    rng = random.Random(SEED + 1)
    out = []
    for it in items:
        others = [o["target"] for o in items if o["doc"] != it["doc"] and o["target"] != it["target"]]
        rng.shuffle(others)
        others.sort(key=lambda t: abs(len(t) - len(it["target"])))
        choices = others[:3] + [it["target"]]
        rng.shuffle(choices)
        out.append({**it, "choices": choices, "label": choices.index(it["target"])})
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline_output", help="output_dir of `python -m data_pipeline run configs/data/sample.yaml`")
    ap.add_argument("--out", default=os.path.join(HERE, "data"))
    a = ap.parse_args()
    docs = validation_docs(a.pipeline_output)
    gen = next_line_items(docs)
    os.makedirs(a.out, exist_ok=True)
    write_jsonl(os.path.join(a.out, "sample_valid.jsonl"), docs)
    write_jsonl(os.path.join(a.out, "sample_next_line.jsonl"), gen)
    write_jsonl(os.path.join(a.out, "sample_next_line_mc.jsonl"), multiple_choice(gen))
    print(f"{len(docs)} validation documents ({sum(len(d['text'].encode()) for d in docs)} bytes), "
          f"{len(gen)} next-line items -> {a.out}")


if __name__ == "__main__":
    main()
