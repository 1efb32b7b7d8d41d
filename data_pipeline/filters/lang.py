"""Language ID with langid.py (its model ships inside the PyPI package: works offline)."""
from __future__ import annotations

_IDENTIFIER = None


def _identifier():
    global _IDENTIFIER  # loaded once per process (~1 s)
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model
        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _IDENTIFIER


def detect(text: str, max_chars: int = 2000) -> tuple[str, float]:
    lang, prob = _identifier().classify(text[:max_chars])
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
