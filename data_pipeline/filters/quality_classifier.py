"""A trained quality classifier, the DCLM way (Li et al. 2024): a fastText model (word n-grams) over normalised
text with the labels ``__label__hq`` / ``__label__lq``.

``train(...)`` (the CLI's ``train-classifier``) writes the model and a JSON card beside it; ``quality_classifier_step``
scores every document (the probability of ``__label__<label>``), writes the score into ``meta.quality_score`` and
removes documents below ``threshold``. With ``keep_fraction`` < 1 the step only scores: prepare.py keeps the top
share of each task's scored documents (``select_top``; ties broken by document order, so it is deterministic).
Training is deterministic too (one thread, a fixed seed): the same inputs give the same model bytes.
The model is loaded once per process (the parent loads it before the workers fork, like lang.py)."""
from __future__ import annotations

import math
import os
import random
import re
import unicodedata

from ..config import ConfigError

LABELS = ("hq", "lq")
HIST_BINS = 20  # score histogram of stats.json / quality.png: bins of 0.05 over [0, 1]
_MODELS: dict = {}
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def normalize(text: str, max_chars: int = 0) -> str:
    """DCLM-style: NFKC, lowercase, punctuation split off into its own tokens, one line of single spaces."""
    if max_chars:
        text = text[:max_chars]
    return " ".join(_TOKEN.findall(unicodedata.normalize("NFKC", text).lower()))


def _fasttext():
    try:
        import fasttext
    except ImportError:
        raise ConfigError("quality_classifier needs fastText: pip install fasttext-numpy2 "
                          "(or the extra: pip install -e '.[quality]')") from None
    if hasattr(fasttext, "FastText") and hasattr(fasttext.FastText, "eprint"):
        fasttext.FastText.eprint = lambda *a, **k: None  # its load_model warning about a deprecated API
    return fasttext


def load_model(path: str, label: str = "hq"):
    """The fastText model at ``path`` (cached per process); one-line ConfigErrors naming the key and the file."""
    key = os.path.abspath(path) if path else ""
    if key in _MODELS:
        return _MODELS[key]
    if not path:
        raise ConfigError("quality_classifier.model_path: empty (train one with `python -m data_pipeline "
                          "train-classifier --positive ... --negative ... --out model.bin`)")
    if not os.path.isfile(path):
        raise ConfigError(f"quality_classifier.model_path={path}: no such file")
    fasttext = _fasttext()
    try:
        model = fasttext.load_model(path)
    except (ValueError, RuntimeError, MemoryError) as e:
        raise ConfigError(f"quality_classifier.model_path={path}: not a fastText model ({str(e).splitlines()[0]})"
                          ) from None
    labels = [x.removeprefix("__label__") for x in model.get_labels()]
    if label not in labels:
        raise ConfigError(f"quality_classifier.label={label!r}: not a label of {path} (its labels: "
                          f"{', '.join(labels) or 'none'})")
    _MODELS[key] = model
    return model


def check(cfg) -> None:
    """Before any stage runs: an enabled step needs a loadable model with the configured label."""
    if cfg.enabled:
        load_model(cfg.model_path, cfg.label)


def score(text: str, cfg) -> float:
    model = load_model(cfg.model_path, cfg.label)
    labels, probs = model.predict(normalize(text, cfg.max_chars), k=-1)
    want = "__label__" + cfg.label
    for lab, p in zip(labels, probs):
        if lab == want:
            return round(min(max(float(p), 0.0), 1.0), 4)
    return 0.0


def quality_classifier_step(doc: dict, cfg) -> str | None:
    s = score(doc["text"], cfg)
    doc["meta"]["quality_score"] = s
    if cfg.keep_fraction < 1:
        return None  # the task's top share is chosen after all its documents are scored (prepare.py)
    return "quality_classifier.below_threshold" if s < cfg.threshold else None


def select_top(scores: list[float], fraction: float) -> list[bool]:
    """Keep flags for the top ``fraction`` of ``scores``: round(fraction * n) documents (half up), the higher
    scores first, ties to the earlier document."""
    n = len(scores)
    k = min(n, int(math.floor(fraction * n + 0.5)))
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    keep = [False] * n
    for i in order[:k]:
        keep[i] = True
    return keep


def hist_bin(s: float) -> int:
    return min(int(s * HIST_BINS), HIST_BINS - 1)


def draw_histogram(quality: dict) -> bytes:
    """quality.png: the score histogram of kept and removed documents (stacked), as PNG bytes."""
    from ..plots import png_bytes, pyplot
    plt = pyplot()
    edges = [i / HIST_BINS for i in range(HIST_BINS + 1)]
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar(mids, quality["kept"], width=1 / HIST_BINS, color="tab:green", label=f"kept ({sum(quality['kept'])})",
           edgecolor="white")
    ax.bar(mids, quality["removed"], width=1 / HIST_BINS, bottom=quality["kept"], color="tab:red",
           label=f"removed ({sum(quality['removed'])})", edgecolor="white")
    if quality.get("threshold") is not None:
        ax.axvline(quality["threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"quality score (P(__label__{quality['label']}))")
    ax.set_ylabel("documents")
    ax.set_title(quality.get("title", "quality classifier"))
    ax.legend()
    return png_bytes(fig)


# ---- training ------------------------------------------------------------------------------------------------

def _read_texts(paths: list[str], text_key: str, flag: str) -> tuple[list[str], list[dict]]:
    from collections import Counter

    from ..config import InputConfig
    from ..readers import Reader, expand_paths
    texts, inputs = [], []
    for p in paths:
        icfg = InputConfig(paths=[p], text_key=text_key)
        n0 = len(texts)
        reader = Reader(icfg, Counter())
        try:
            units = expand_paths(icfg)
        except ConfigError as e:  # it names input.paths, a key of the pipeline's config, not this command
            raise ConfigError(f"{flag} {p}: {str(e).split(': ', 1)[-1]}") from None
        for kind, path, rel in units:
            for doc in reader.read(kind, path, rel):
                t = normalize(doc["text"])
                if t:
                    texts.append(t)
        inputs.append({"path": p, "docs": len(texts) - n0})
    return texts, inputs


def _split(texts: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    n_valid = int(round(len(texts) * valid_fraction)) if len(texts) > 1 else 0
    n_valid = min(n_valid, len(texts) - 1)
    valid = sorted(idx[:n_valid])
    train = sorted(idx[n_valid:])
    return [texts[i] for i in train], [texts[i] for i in valid]


def train(positive: list[str], negative: list[str], out: str, text_key: str = "text", valid_fraction: float = 0.2,
          epoch: int = 25, lr: float = 0.1, word_ngrams: int = 2, dim: int = 64, bucket: int = 100_000,
          min_count: int = 1, seed: int = 0, threshold: float = 0.5) -> dict:
    """Train on ``positive`` (hq) vs ``negative`` (lq) files; write ``out`` and ``out + '.json'`` (the card);
    return the card. Held-out documents (``valid_fraction`` of each class) give the precision/recall of hq."""
    import tempfile

    from ..atomic_io import atomic_path, write_json
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"--valid-fraction: {valid_fraction} is outside [0, 1)")
    fasttext = _fasttext()
    pos, pos_in = _read_texts(positive, text_key, "--positive")
    neg, neg_in = _read_texts(negative, text_key, "--negative")
    for flag, texts, files in (("--positive", pos, positive), ("--negative", neg, negative)):
        if not texts:
            raise ConfigError(f"{flag} {' '.join(files)}: no documents with text")
    pos_tr, pos_va = _split(pos, valid_fraction, seed)
    neg_tr, neg_va = _split(neg, valid_fraction, seed + 1)
    rows = [f"__label__hq {t}" for t in pos_tr] + [f"__label__lq {t}" for t in neg_tr]
    random.Random(seed).shuffle(rows)  # interleaved classes: SGD sees both from the start
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fd, train_file = tempfile.mkstemp(prefix=".train-classifier-", suffix=".txt", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(r + "\n" for r in rows))
        model = fasttext.train_supervised(train_file, epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim,
                                          bucket=bucket, minCount=min_count, thread=1, seed=seed, verbose=0,
                                          loss="softmax")
    finally:
        os.remove(train_file)
    tp = fp = fn = tn = 0
    for texts, truth in ((pos_va, True), (neg_va, False)):
        for t in texts:
            labels, probs = model.predict(t, k=-1)
            p_hq = float(dict(zip(labels, probs)).get("__label__hq", 0.0))
            pred = bool(p_hq >= threshold)
            tp += pred and truth
            fp += pred and not truth
            fn += (not pred) and truth
            tn += (not pred) and not truth
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    n_valid = tp + fp + fn + tn
    card = {
        "model": os.path.basename(out), "format": "fastText supervised", "labels": ["__label__hq", "__label__lq"],
        "normalization": "NFKC, lowercase, punctuation split off, single spaces (data_pipeline.filters."
                         "quality_classifier.normalize)",
        "inputs": {"positive": pos_in, "negative": neg_in, "text_key": text_key},
        "sizes": {"train": {"hq": len(pos_tr), "lq": len(neg_tr)}, "valid": {"hq": len(pos_va), "lq": len(neg_va)}},
        "params": {"epoch": epoch, "lr": lr, "wordNgrams": word_ngrams, "dim": dim, "bucket": bucket,
                   "minCount": min_count, "seed": seed, "thread": 1, "loss": "softmax",
                   "valid_fraction": valid_fraction},
        "scores": {"threshold": threshold, "precision": round(precision, 4), "recall": round(recall, 4),
                   "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0,
                   "accuracy": round((tp + tn) / n_valid, 4) if n_valid else None,
                   "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}},
    }
    with atomic_path(out) as tmp:
        model.save_model(tmp)
    write_json(out + ".json", card)
    return card
