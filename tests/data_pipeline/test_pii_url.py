"""The pii and url_filter steps: unit rules, a tiny end-to-end run (same bytes for 1 and 2 workers, counts in
stats.json, nothing planted left in the decoded shards) and the one-line error of a bad blocklist file."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import sentencepiece as spm
from tests.data_pipeline.conftest import cli, document, write_jsonl

from data_pipeline.config import ConfigError, PIIConfig, STEP_NAMES, URLFilterConfig, load
from data_pipeline.filters import get_step
from data_pipeline.filters.pii import redact
from data_pipeline.filters.url_filter import check_blocklists, read_blocklist

EMAILS = ["someone@example.org", "first.last+tag@mail.example.co.uk", "x_y@sub.domain.io"]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"]
KEPT = ["10.0.0.1", "192.168.1.1", "127.0.0.1", "0.0.0.0", "169.254.1.1", "224.0.0.1", "::1", "fe80::1",
        "2001:db8::1", "version 1.2.3.4", "v1.2.3.4", "release 4.3.2.1", "1.2.3.4.5", "12:30:45", "std::vector",
        "a::b", "300.1.1.1"]


def _pii(text: str, **kw):
    doc, counts = {"id": "d", "text": text, "meta": {}}, Counter(emails=0, ips=0)
    assert get_step("pii")(doc, PIIConfig(enabled=True, **kw), counts) is None  # always kept
    return doc["text"], counts


def test_pii_redacts_emails_and_public_ips_only():
    parts = [f"mail {e} now." for e in EMAILS] + [f"host {ip}, ok." for ip in PUBLIC] + [f"keep {k} here." for k in KEPT]
    text, counts = _pii("\n".join(parts) + "\nEnd at 93.184.216.34.")
    for planted in EMAILS + PUBLIC + ["93.184.216.34"]:
        assert planted not in text
    expected = ([f"mail email@example.com now." for _ in EMAILS] + [f"host 22.214.171.124, ok." for _ in PUBLIC]
                + [f"keep {k} here." for k in KEPT] + ["End at 22.214.171.124."])
    assert text.split("\n") == expected  # surrounding text unchanged, private / version numbers kept
    assert counts == {"emails": 3, "ips": 4}


def test_pii_switches_and_placeholders():
    t = "a someone@example.org b 93.184.216.34 c"
    assert _pii(t, emails=False)[0] == "a someone@example.org b 22.214.171.124 c"
    assert _pii(t, ips=False)[0] == "a email@example.com b 93.184.216.34 c"
    assert _pii(t, email_replacement="<EMAIL>", ip_replacement="<IP>")[0] == "a <EMAIL> b <IP> c"
    assert redact("no pii in here 1.2.3", PIIConfig()) == ("no pii in here 1.2.3", 0, 0)


def _blocklist(tmp_path, text="# bad sites\nexample.com\n\n*.casino.net  # inline\nSPAM.org.\n"):
    p = tmp_path / "block.txt"
    p.write_text(text)
    return str(p)


def _url(url, cfg):
    meta = {} if url is None else {"url": url}
    return get_step("url_filter")({"id": "d", "text": "t", "meta": meta}, cfg)


def test_url_filter_domains_and_words(tmp_path):
    cfg = URLFilterConfig(enabled=True, blocklist=[_blocklist(tmp_path)], banned_words=["Porn", "free-casino"])
    assert read_blocklist(cfg.blocklist[0]) == {"example.com", "casino.net", "spam.org"}
    for url in ("https://example.com/", "http://a.b.example.com:8080/x", "EXAMPLE.COM/page", "//user@spam.org/",
                "https://www.casino.net"):
        assert _url(url, cfg) == "url_filter.blocklist", url
    for url in ("https://notexample.com/", "https://example.com.evil.org/", "https://example.co/",
                "https://pornography-history.org/", "https://freecasino.io/"):
        assert _url(url, cfg) is None, url
    assert _url("https://site.org/PORN/videos", cfg) == "url_filter.banned_words"
    assert _url("https://site.org/free-casino?x=1", cfg) == "url_filter.banned_words"
    assert _url(None, cfg) is None and _url("", cfg) is None  # no URL: kept


@pytest.mark.parametrize("content,msg", [(None, "no such file"), (b"\xff\xfe\x00bad\x80", "not a text file"),
                                         (b"ok.com\n\x00\x01\x02\n", "is not a domain")])
def test_bad_blocklist_is_one_config_error(tmp_path, content, msg):
    p = tmp_path / "list.txt"
    if content is not None:
        p.write_bytes(content)
    cfg = load(None, [f"input.paths=[{tmp_path}]", "url_filter.enabled=true", f"url_filter.blocklist=[{p}]"])
    with pytest.raises(ConfigError, match=msg) as e:
        check_blocklists(cfg)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_steps_and_validation():
    assert STEP_NAMES.index("clean") < STEP_NAMES.index("pii") < STEP_NAMES.index("length")
    cfg = load(None, ["input.paths=[x]"])
    assert cfg.pii.enabled is False and cfg.url_filter.enabled is False and cfg.input.url_key == "url"
    assert "pii" in cfg.steps and "url_filter" in cfg.steps
    with pytest.raises(ConfigError, match="pii.enabled"):
        load(None, ["input.paths=[x]", "pii.enabled=true", "steps=[clean,length]"])
    sample = load("configs/data/sample.yaml", ["pii.enabled=true"])
    assert "pii" in sample.steps and "url_filter" in sample.steps


def _corpus(root):
    recs = []
    for i in range(24):
        text = document(1000 + i)
        if i % 3 == 0:
            text += f"\n\nWrite to someone{i}@example.org or reach the server at 93.184.216.{i} for a copy."
        if i % 4 == 0:
            text += "\n\nThe office network uses 10.0.0.1 and version 1.2.3.4 of the tool."
        url = {0: "https://a.b.example.com/p", 1: "https://notexample.com/p", 2: "https://x.org/Casino/page"}.get(
            i % 6, f"https://site{i}.org/page") if i % 5 else None
        recs.append({"text": text, **({"url": url} if url else {})})
    write_jsonl(os.path.join(root, "c.jsonl"), recs)
    return recs


def _decoded(out):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    from data_pipeline.shards import IndexedShard
    texts = []
    for split in ("train", "valid"):
        for n in sorted(os.listdir(os.path.join(out, "shards"))):
            if n.startswith(split) and n.endswith(".bin"):
                sh = IndexedShard(os.path.join(out, "shards", n[:-4]))
                texts += [sp.decode(sh.doc(i).tolist()) for i in range(len(sh))]
    return texts


def test_end_to_end_workers_identical(tmp_path):
    from tests.data_pipeline.conftest import run_inproc
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    recs = _corpus(str(corpus))
    block = _blocklist(tmp_path)
    common = ["pii.enabled=true", "url_filter.enabled=true", f"url_filter.blocklist=[{block}]",
              "url_filter.banned_words=[casino]", "lang.enabled=false", "dedup.minhash.enabled=false"]
    stats = {}
    for w in (1, 2):
        stats[w] = run_inproc(str(corpus), str(tmp_path / f"o{w}"), f"workers={w}", "tasks=2", *common)["stats"]
    shard_dir = lambda w: tmp_path / f"o{w}" / "shards"  # noqa: E731
    names = sorted(os.listdir(shard_dir(1)))
    assert names == sorted(os.listdir(shard_dir(2))) and names
    for n in names:
        assert (shard_dir(1) / n).read_bytes() == (shard_dir(2) / n).read_bytes(), n
    s = stats[1]
    rows = {r["name"]: r for r in s["steps"]}
    n_blocked = sum(1 for i in range(24) if i % 5 and i % 6 == 0)
    n_banned = sum(1 for i in range(24) if i % 5 and i % 6 == 2)
    assert rows["url_filter"]["removed"] == {"url_filter.banned_words": n_banned, "url_filter.blocklist": n_blocked}
    kept = [i for i in range(24) if not (i % 5 and i % 6 in (0, 2))]
    assert rows["pii"]["docs_in"] == rows["pii"]["docs_out"] == len(kept)
    assert rows["pii"]["counts"] == {"emails": sum(i % 3 == 0 for i in kept), "ips": sum(i % 3 == 0 for i in kept)}
    assert "counts" not in rows["url_filter"] and s == stats[2]
    texts = "\n".join(_decoded(str(tmp_path / "o1")))
    assert "example.org" not in texts.replace("email@example.com", "") and "93.184.216." not in texts
    assert "email@example.com" in texts and "10.0.0.1" in texts and "version 1.2.3.4" in texts


def test_cli_bad_blocklist_one_line_no_output(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(str(corpus / "c.jsonl"), [{"text": document(1), "url": "https://x.org"}])
    out = tmp_path / "out"
    missing = tmp_path / "nope.txt"
    p = cli("run", "configs/data/sample.yaml", f"input.paths=[{corpus}]", f"output_dir={out}", "url_filter.enabled=true",
            f"url_filter.blocklist=[{missing}]", timeout=60)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "no such file" in lines[0], p.stderr
    assert not out.exists()
