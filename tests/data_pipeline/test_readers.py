"""Readers: every supported format yields the same documents with stable file:line / file:row ids."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.data_pipeline.corpus import write_jsonl

from data_pipeline.config import ConfigError, InputConfig
from data_pipeline.readers import Reader, expand_paths

RECS = [{"text": f"Document number {i} has some text.", "url": f"u{i}", "id": f"x{i}"} for i in range(5)]


def read_all(paths, **kw):
    cfg = InputConfig(paths=[str(p) for p in paths], **kw)
    stats = Counter()
    reader = Reader(cfg, stats)
    docs = [d for kind, path, rel in expand_paths(cfg) for d in reader.read(kind, path, rel)]
    return docs, stats


@pytest.mark.parametrize("name,comp", [("a.jsonl", ""), ("a.jsonl.gz", "gz"), ("a.jsonl.zst", "zst")])
def test_jsonl_variants(tmp_path, name, comp):
    write_jsonl(str(tmp_path / name), RECS, comp)
    docs, _ = read_all([tmp_path], metadata_keys=["url"], id_key="id")
    assert [d["id"] for d in docs] == [f"{name}:{i + 1}" for i in range(5)]
    assert [d["text"] for d in docs] == [r["text"] for r in RECS]
    assert docs[2]["meta"] == {"url": "u2", "source_id": "x2"}


def test_multi_frame_zstd(tmp_path):
    import zstandard
    c = zstandard.ZstdCompressor()
    data = b"".join(c.compress(b'{"text": "frame %d"}\n' % i) for i in range(3))
    (tmp_path / "m.jsonl.zst").write_bytes(data)
    assert [d["text"] for d in read_all([tmp_path])[0]] == ["frame 0", "frame 1", "frame 2"]


def test_parquet_and_hf_loaders(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECS), tmp_path / "p.parquet")
    docs, _ = read_all([tmp_path / "p.parquet"], metadata_keys=["url"])
    assert [d["id"] for d in docs] == [f"p.parquet:{i}" for i in range(5)] and docs[4]["meta"] == {"url": "u4"}
    # datasets.load_dataset("parquet"/"json", data_files=...) on local files: the Hub code path, offline
    assert [d["text"] for d in read_all([tmp_path / "p.parquet"], format="hf_parquet")[0]] == [r["text"] for r in RECS]
    write_jsonl(str(tmp_path / "j.jsonl"), RECS)
    hf = read_all([tmp_path / "j.jsonl"], format="hf_json")[0]
    assert [d["id"] for d in hf] == [f"j.jsonl:{i}" for i in range(5)]


def test_hf_load_from_disk(tmp_path):
    import datasets
    datasets.Dataset.from_list(RECS).save_to_disk(str(tmp_path / "saved"))
    docs, _ = read_all([tmp_path / "saved"])
    assert [d["id"] for d in docs] == [f"saved:{i}" for i in range(5)]
    assert docs[0]["text"] == RECS[0]["text"]


def test_text_folder_and_html(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("Plain text file.")
    (tmp_path / "docs" / "sub" / "b.md").write_text("# Title\n\nMarkdown body.")
    (tmp_path / "docs" / "c.rst").write_text("Restructured text.")
    (tmp_path / "docs" / "ignored.bin").write_bytes(b"\x00\x01")
    para = "The museum opened a new wing for modern painting, and visitors came from many distant cities. " * 3
    html = (f"<html><head><title>T</title><script>var x = 1;</script></head><body><nav>Home | About</nav>"
            f"<article><h1>Museum news</h1><p>{para}</p><p>{para}</p></article><footer>Copyright</footer></body></html>")
    (tmp_path / "docs" / "page.html").write_text(html)
    docs, _ = read_all([tmp_path / "docs"])
    by_id = {d["id"]: d["text"] for d in docs}
    assert sorted(by_id) == ["a.txt", "c.rst", "page.html", "sub/b.md"]
    assert by_id["sub/b.md"] == "# Title\n\nMarkdown body."
    assert "museum opened a new wing" in by_id["page.html"]
    assert "var x" not in by_id["page.html"] and "Home | About" not in by_id["page.html"]


def test_globs_ids_relative_to_common_folder(tmp_path):
    for d in ("x", "y"):
        write_jsonl(str(tmp_path / d / "f.jsonl"), RECS[:1])
    docs, _ = read_all([str(tmp_path / "*" / "*.jsonl")])
    assert [d["id"] for d in docs] == ["x/f.jsonl:1", "y/f.jsonl:1"]


def test_missing_path_and_empty_glob_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_all([tmp_path / "nope.jsonl"])
    with pytest.raises(ConfigError, match="matches nothing"):
        read_all([str(tmp_path / "*.jsonl")])
