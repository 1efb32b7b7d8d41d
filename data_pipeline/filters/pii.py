"""PII redaction, after datatrove's PIIFormatter: email addresses and public IP addresses are replaced by fixed
placeholders (``pii.email_replacement``, default ``email@example.com``; ``pii.ip_replacement``, default
``22.214.171.124``). The document is always kept; its stats row counts the redactions (``counts``: emails, ips).

Rules: the email pattern is datatrove's (RFC 5322-ish local part, dotted domain or bracketed IP literal). An IPv4
dotted quad (datatrove's pattern, not inside a longer dotted number or word) or an IPv6 address is replaced only if
``ipaddress`` parses it and it is global (IPv6: also global unicast, 2000::/3): private, reserved, loopback, link-local, multicast, unspecified and
documentation ranges stay, as with datatrove's ``only_remove_public_ips``.

Deliberate differences: one placeholder each instead of datatrove's rotation through a tuple (its rotation
state runs across documents, so the output would depend on the order documents reach a worker); IPv6 addresses
are redacted too; a dotted quad after ``version``/``ver``/``release``/``rev``/``build`` or ``v`` (``v1.2.3.4``,
``version 1.2.3.4``) or with more dotted parts (``1.2.3.4.5``) is a version number, not an address."""
from __future__ import annotations

import ipaddress
import re

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"|\[(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\w)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|" + rf"(?:{_OCTET}\.){{3}}{_OCTET})?"
                  r"(?![\w:]|\.\w)")
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver|release|rev|build|v)\.?\s*[:=]?\s*)$", re.IGNORECASE)


_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def is_public_ip(s: str) -> bool:
    """A global address; for IPv6 also in 2000::/3 (global unicast: ``a::b`` in code is not an address)."""
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    if (ip.is_private or ip.is_reserved or ip.is_loopback or ip.is_multicast or ip.is_link_local
            or ip.is_unspecified):  # is_global alone lets multicast through
        return False
    return ip.is_global and (ip.version == 4 or ip in _GLOBAL_UNICAST)


def redact(text: str, cfg) -> tuple[str, int, int]:
    """(text with PII replaced, emails replaced, IPs replaced)."""
    n_email = n_ip = 0
    if cfg.emails and "@" in text:
        text, n_email = EMAIL.subn(cfg.email_replacement, text)
    if cfg.ips:
        count = [0]

        def ip(m):
            s = m.group(0)
            if not is_public_ip(s) or _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):
                return s
            count[0] += 1
            return cfg.ip_replacement

        if "." in text:
            text = IPV4.sub(ip, text)
        if ":" in text:
            text = IPV6.sub(ip, text)
        n_ip = count[0]
    return text, n_email, n_ip


def pii_step(doc: dict, cfg, counts) -> None:
    doc["text"], n_email, n_ip = redact(doc["text"], cfg)
    counts["emails"] += n_email
    counts["ips"] += n_ip
    return None


pii_step.counts = ("emails", "ips")  # prepare.py passes a Counter with these keys; stats.json shows it per step
