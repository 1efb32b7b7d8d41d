"""Exact dedup key: a 64-bit hash of the content with case and whitespace normalised, so copies that differ
only in spacing or capitalisation collide."""
from __future__ import annotations

import re

import xxhash

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def content_hash(text: str, seed: int = 0) -> int:
    return xxhash.xxh64_intdigest(normalise(text).encode("utf-8"), seed)
