"""Language ID with langid.py (its model ships inside the PyPI package: works offline).

langid unpacks its model from a bz2+pickle string on every load (seconds); the unpacked arrays are cached once
under ~/.cache/llmforge (or $LLMFORGE_CACHE) and the model is loaded in the parent before worker processes
fork, so each worker shares it. The cache is a plain ``.npz`` read with ``allow_pickle=False`` (never a pickle:
a file planted in a shared cache folder must not run code); an unreadable or foreign cache file is reported in
one line naming it and rebuilt."""
from __future__ import annotations

import array
import os
import sys

import numpy as np
from llmforge.common.atomic import atomic_path

_IDENTIFIER = None
_CACHE_KEYS = ("nb_ptc", "nb_pc", "nb_numfeats", "nb_classes", "tk_nextmove", "tk_output_keys", "tk_output_lens",
               "tk_output_values")


def _cache_file() -> str:
    import langid
    root = os.environ.get("LLMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmforge")
    return os.path.join(root, f"langid-{getattr(langid, '__version__', 'x')}-model.npz")


def _save(ident, path: str) -> None:
    keys = sorted(ident.tk_output)
    lens = [len(ident.tk_output[k]) for k in keys]
    values = [v for k in keys for v in ident.tk_output[k]]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, nb_ptc=ident.nb_ptc, nb_pc=ident.nb_pc, nb_numfeats=np.int64(ident.nb_numfeats),
                 nb_classes=np.array(ident.nb_classes, dtype=str),
                 tk_nextmove=np.frombuffer(ident.tk_nextmove.tobytes(), dtype=np.uint16),
                 tk_output_keys=np.array(keys, dtype=np.int64), tk_output_lens=np.array(lens, dtype=np.int64),
                 tk_output_values=np.array(values, dtype=np.int64))


def _load(path: str):
    from langid.langid import LanguageIdentifier
    with np.load(path, allow_pickle=False) as z:
        if sorted(z.files) != sorted(_CACHE_KEYS):
            raise ValueError(f"unexpected arrays {sorted(z.files)}")
        nextmove = array.array("H")
        nextmove.frombytes(z["tk_nextmove"].astype(np.uint16).tobytes())
        bounds = np.concatenate([[0], np.cumsum(z["tk_output_lens"])])
        values = z["tk_output_values"].tolist()
        output = {int(k): tuple(values[bounds[i]:bounds[i + 1]]) for i, k in enumerate(z["tk_output_keys"].tolist())}
        return LanguageIdentifier(z["nb_ptc"], z["nb_pc"], int(z["nb_numfeats"]), [str(c) for c in z["nb_classes"]],
                                  nextmove, output, norm_probs=True)


def identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model
        path = _cache_file()
        if os.path.exists(path):
            try:
                _IDENTIFIER = _load(path)
            except Exception as e:  # noqa: BLE001 - pickled objects (refused), truncation, another layout
                print(f"warning: ignoring the langid cache {path} ({type(e).__name__}: {e}); rebuilding it",
                      file=sys.stderr, flush=True)
        if _IDENTIFIER is None:
            ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
            try:
                _save(ident, path)
            except OSError:
                pass  # a read-only home only costs the slow load next time
            _IDENTIFIER = ident
    return _IDENTIFIER


def detect(text: str, max_chars: int = 2000) -> tuple[str, float]:
    lang, prob = identifier().classify(text[:max_chars])
    return lang, float(prob)


def lang_step(doc: dict, cfg) -> str | None:
    lang, prob = detect(doc["text"], cfg.max_chars)
    doc["meta"]["lang"] = lang
    doc["meta"]["lang_score"] = round(prob, 4)
    if not cfg.languages:
        return None
    if lang not in cfg.languages:
        return "lang.other_language"
    if prob < cfg.min_score:
        return "lang.low_score"
    return None
