"""Synthetic English-like documents for the data pipeline tests (deterministic, pass the default filters)."""
from __future__ import annotations

import gzip
import json
import os
import random

import zstandard

NOUNS = ("river city garden teacher window market mountain doctor village letter engine forest student "
         "kitchen bridge museum farmer island library painter harbor valley soldier bakery castle merchant "
         "planet ocean journey morning winter summer station record machine council history language "
         "country family friend problem system program question government number company water story").split()
VERBS = ("found visited painted described carried opened followed remembered repaired explained watched "
         "admired crossed measured protected discovered built studied").split()
ADJS = ("old quiet bright narrow ancient careful famous small golden distant simple modern gentle heavy "
        "strange early green busy patient curious").split()
ADVS = "slowly quickly carefully often rarely suddenly quietly always".split()


def sentence(rng: random.Random) -> str:
    a, b, c = rng.sample(NOUNS, 3)
    forms = [
        f"The {rng.choice(ADJS)} {a} {rng.choice(VERBS)} the {b} of the {c}.",
        f"A {a} {rng.choice(ADVS)} {rng.choice(VERBS)} that {rng.choice(ADJS)} {b} with a {c}.",
        f"Every {a} in the {b} {rng.choice(VERBS)} and {rng.choice(VERBS)} the {rng.choice(ADJS)} {c}.",
        f"People have {rng.choice(VERBS)} the {b} near the {a} to see the {c}.",
    ]
    return rng.choice(forms)


def document(seed: int, n_paragraphs: int = 4) -> str:
    rng = random.Random(seed)
    paras = [" ".join(sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(n_paragraphs)]
    return "\n\n".join(paras)


def near_duplicate(text: str, seed: int, n_changes: int = 3) -> str:
    """Replace a few words: Jaccard of 5-gram shingles stays high (~0.8+ for ~250-word documents)."""
    rng = random.Random(seed)
    words = text.split(" ")
    for _ in range(n_changes):
        i = rng.randrange(len(words))
        words[i] = rng.choice(NOUNS)
    return " ".join(words)


def write_jsonl(path: str, records: list[dict], compression: str = "") -> str:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if compression == "gz":
        data = gzip.compress(data, mtime=0)
    elif compression == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_corpus(root: str, n_files: int = 3, docs_per_file: int = 40, seed: int = 0) -> str:
    """Folder of jsonl(.zst) files with unique documents; returns the folder."""
    for f in range(n_files):
        recs = [{"id": f"d{f}-{i}", "text": document(seed * 100000 + f * 1000 + i), "source": "synthetic"}
                for i in range(docs_per_file)]
        write_jsonl(os.path.join(root, f"part-{f}.jsonl" + (".zst" if f % 2 else "")), recs, "zst" if f % 2 else "")
    return root
