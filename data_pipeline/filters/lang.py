"""Language ID with langid.py (its model ships inside the PyPI package: works offline).

langid unpacks its model from a bz2+pickle string on every load (seconds); the unpacked arrays are cached once
under ~/.cache/llmforge (or $LLMFORGE_CACHE) and the model is loaded in the parent before worker processes
fork, so each worker shares it."""
from __future__ import annotations

import os
import pickle

_IDENTIFIER = None


def _cache_file() -> str:
    import langid
    root = os.environ.get("LLMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmforge")
    return os.path.join(root, f"langid-{getattr(langid, '__version__', 'x')}-model.pkl")


def identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model
        path = _cache_file()
        try:
            with open(path, "rb") as f:
                _IDENTIFIER = LanguageIdentifier(*pickle.load(f), norm_probs=True)
        except (OSError, pickle.UnpicklingError, EOFError, TypeError):
            ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
            parts = (ident.nb_ptc, ident.nb_pc, ident.nb_numfeats, ident.nb_classes, ident.tk_nextmove,
                     ident.tk_output)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "wb") as f:
                    pickle.dump(parts, f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(tmp, path)
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
