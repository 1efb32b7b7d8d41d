"""URL filter, after datatrove's URLFilter (without its bundled lists): a document whose URL (the field
``input.url_key``, read into ``meta``) has a blocklisted domain, or a subdomain of one, is removed (rule
``url_filter.blocklist``); so is one whose URL holds a banned word (``url_filter.banned_words``, rule
``url_filter.banned_words``). Documents without a URL are kept.

Domains match whole labels: ``example.com`` blocks ``example.com`` and ``a.b.example.com``, not
``notexample.com``. A blocklist file holds one domain a line (lowercased; a leading ``*.`` or ``.`` and a trailing
``.`` are ignored); ``#`` starts a comment, blank lines are skipped. Banned words are matched case-insensitively
against the URL's words, the runs of letters and digits (a banned entry of several words, e.g. ``free-casino``,
matches those words in a row). A missing or unreadable blocklist file, or one that is not a text list of domains,
is a config error before any work starts (check_blocklists)."""
from __future__ import annotations

import functools
import re
from urllib.parse import urlsplit

from llmforge.common.typed_config import ConfigError

_DOMAIN = re.compile(r"[\w.-]+")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def _words(s: str) -> list[str]:
    return [w for w in _NON_ALNUM.split(s.lower()) if w]


def read_blocklist(path: str) -> set[str]:
    """The domains of one blocklist file; ConfigError (one line naming the file) if it cannot be used."""
    key = f"url_filter.blocklist: {path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: a folder, not a file of domains") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: not a text file (invalid UTF-8 at byte {e.start})") from None
    domains = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not _DOMAIN.fullmatch(line.removeprefix("*.")):
            raise ConfigError(f"{key}:{lineno}: {line[:40]!r} is not a domain (one domain a line, # comments)")
        line = line.removeprefix("*.").strip(".")
        if line:
            domains.add(line)
    return domains


@functools.lru_cache(maxsize=4)
def _blocked(paths: tuple[str, ...]) -> frozenset[str]:
    out = set()
    for p in paths:
        out |= read_blocklist(p)
    return frozenset(out)


def check_blocklists(cfg) -> None:
    """Before the first stage: every blocklist file of an enabled url_filter is readable text of domains."""
    if cfg.url_filter.enabled:
        _blocked(tuple(cfg.url_filter.blocklist))


def url_host(url: str) -> str:
    """Lowercased host name of a URL (with or without a scheme), '' if there is none."""
    url = url.strip()
    if "://" not in url[:12] and not url.startswith("//"):
        url = "//" + url
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:  # e.g. a bad IPv6 literal
        return ""
    return host.strip(".")


def blocked_domain(host: str, domains) -> bool:
    labels = host.split(".")
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


@functools.lru_cache(maxsize=16)
def _banned(words: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f" {' '.join(_words(w))} " for w in words if _words(w))


def url_filter_step(doc: dict, cfg, url_key: str = "url") -> str | None:
    url = doc.get("meta", {}).get(url_key)
    if not isinstance(url, str) or not url.strip():
        return None
    domains = _blocked(tuple(cfg.blocklist))
    if domains and blocked_domain(url_host(url), domains):
        return "url_filter.blocklist"
    banned = _banned(tuple(cfg.banned_words))
    if banned:
        joined = f" {' '.join(_words(url))} "
        if any(b in joined for b in banned):
            return "url_filter.banned_words"
    return None
