"""Bad input: each case fails with one line naming file and line (exit 1, nothing written), or is counted
and skipped under input.on_error=skip."""
from __future__ import annotations

import gzip
import json
import pytest
import zstandard
from tests.data_pipeline.conftest import BASE, cli
from tests.data_pipeline.corpus import document, write_jsonl

from data_pipeline.__main__ import main

GOOD = [json.dumps({"text": document(i)}) for i in range(40)]


def _write(path, lines: list[bytes], comp=""):
    data = b"".join(line + b"\n" for line in lines)
    if comp == "gz":
        data = gzip.compress(data, mtime=0)
    elif comp == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _cfg(tmp_path) -> str:
    (tmp_path / "cfg.yaml").write_text("workers: 1\n")
    return str(tmp_path / "cfg.yaml")


def _good(n=3):
    return [g.encode() for g in GOOD[:n]]


CASES = {
    "invalid_utf8": ("bad.jsonl", lambda: _good() + [b'{"text": "caf\xe9 ok"}'], "", "bad.jsonl:4: invalid UTF-8"),
    "broken_json": ("bad.jsonl", lambda: _good(2) + [b'{"text": "unterminated'] + _good(1), "",
                    "bad.jsonl:3: broken JSON"),
    "lone_surrogate": ("bad.jsonl.gz", lambda: _good(2) + [b'{"text": "half a pair \\ud83d here"}'], "gz",
                       "bad.jsonl.gz:3: text holds an unpaired surrogate (U+D83D) at character 12"),
    "missing_text": ("bad.jsonl", lambda: _good(1) + [b'{"body": "x"}'], "", "bad.jsonl:2: missing text field 'text'"),
    "not_a_string": ("bad.jsonl", lambda: [b'{"text": 5}'], "", "bad.jsonl:1: text field 'text' is int"),
    "huge_doc": ("bad.jsonl", lambda: _good(1) + [json.dumps({"text": "word " * 3000}).encode()], "",
                 "bad.jsonl:2: document of 15000 characters exceeds input.max_doc_chars=10000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_fails_naming_file_and_line(case, tmp_path, capsys):
    name, lines, comp, expected = CASES[case]
    corpus = tmp_path / "in"
    corpus.mkdir()
    _write(corpus / name, lines(), comp)
    out = tmp_path / "out"
    rc = main(["run", _cfg(tmp_path), f"input.paths=[{corpus}]", f"output_dir={out}", "input.max_doc_chars=10000", *BASE])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()  # no partial output


@pytest.mark.parametrize("comp", ["gz", "zst"])
def test_truncated_compressed_file(comp, tmp_path, capsys):
    corpus = tmp_path / "in"
    corpus.mkdir()
    full = _write(corpus / f"t.jsonl.{comp}", [g.encode() for g in GOOD], comp).read_bytes()
    (corpus / f"t.jsonl.{comp}").write_bytes(full[: len(full) // 2])
    rc = main(["run", _cfg(tmp_path), f"input.paths=[{corpus}]", f"output_dir={tmp_path / 'out'}", *BASE])
    err = capsys.readouterr().err
    assert rc == 1 and f"t.jsonl.{comp}:" in err and "truncated or corrupt compressed file" in err
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_text_file_names_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")
    rc = main(["run", _cfg(tmp_path), f"input.paths=[{tmp_path / 'in'}]", f"output_dir={tmp_path / 'out'}", *BASE])
    assert rc == 1 and "a.txt:3: invalid UTF-8" in capsys.readouterr().err


def test_skip_policy_counts_bad_records(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    lines = [g.encode() for g in GOOD] + [b'{"text": "caf\xe9"}', b"{broken", b'{"body": 1}', b'{"text": "   "}',
                                          b'{"text": ""}']
    _write(corpus / "mixed.jsonl", lines)
    full = _write(corpus / "t.jsonl.gz", [g.encode() for g in GOOD[:5]], "gz").read_bytes()
    (corpus / "t.jsonl.gz").write_bytes(full[:-12])  # cut inside the gzip trailer/last block
    out = tmp_path / "out"
    assert main(["run", _cfg(tmp_path), f"input.paths=[{corpus}]", f"output_dir={out}", "input.on_error=skip", *BASE]) == 0
    s = json.load(open(out / "stats.json"))["input"]
    assert s["read_errors"] == 4 and s["empty"] == 2
    assert s["docs_read"] >= 40


def test_cli_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(str(tmp_path / "in" / "x.jsonl"), [{"txt": "no text key"}])
    p = cli("run", "configs/data/sample.yaml", f"input.paths=[{tmp_path / 'in'}]", f"output_dir={tmp_path / 'o'}")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "x.jsonl:1: missing text field" in p.stderr
    assert not (tmp_path / "o").exists()
