"""Issue 21 item 5 (data pipeline) and item 6 (merge): the pipeline never touches the user's files, and merge never
mixes tokenizers or overwrites.

- an output_dir inside an input folder (or one that contains an input) is refused before anything is written:
  before, the second run read its own outputs and a start-over deleted them;
- a start-over, a failed run and the end-of-run cleanup remove only the files the manifest lists: before, they
  removed shards/ and work/ whole, with the user's files in them;
- ``merge OUT A B`` refuses an existing OUT (unless --force) and shards from different tokenizers.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

from data_pipeline.__main__ import main
from data_pipeline.manifest import remove_listed
from data_pipeline.output_dir import check_apart_from_inputs
from llmforge.common import shards as shards_mod
from llmforge.core.config import ConfigError
from tests.data_pipeline.conftest import tree_hashes
from tests.data_pipeline.corpus import make_corpus

FAST = ["progress=false", "workers=1", "tokenizer.vocab_size=300", "shards.valid_fraction=0.1", "steps=[clean,length]",
        "dedup.exact.enabled=false", "dedup.minhash.enabled=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    make_corpus(root, n_files=2, docs_per_file=25)
    return root


def run(inputs, out, *overrides, capsys=None):
    fd, cfg = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write("workers: 1\n")
    rc = main(["run", cfg, f"input.paths=[{inputs}]", f"output_dir={out}", *FAST, *overrides])
    return rc, (capsys.readouterr() if capsys else None)


def errors(cap) -> list[str]:
    return [ln for ln in cap.err.splitlines() if ln.strip()]


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


# ------------------------------------------------------------------------------------- inputs vs output_dir
def test_an_output_dir_inside_the_input_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    make_corpus(str(corpus), n_files=2, docs_per_file=5)
    before = tree_hashes(str(corpus))
    for inputs, out in ((corpus, corpus / "out"), (f"{corpus}/**/*.jsonl", corpus / "sub" / "out")):
        rc, cap = run(inputs, out, capsys=capsys)
        assert rc == 2 and len(errors(cap)) == 1, cap.err
        assert str(out) in errors(cap)[0] and str(corpus) in errors(cap)[0] and "Traceback" not in cap.err
        assert not out.exists() and tree_hashes(str(corpus)) == before


def test_an_input_inside_a_previous_output_is_refused_and_nothing_changes(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(corpus, out, capsys=capsys)[0] == 0
    mine = out / "work" / "mine"
    mine.mkdir()
    shutil.copy(os.path.join(corpus, "part-0.jsonl"), mine / "part-0.jsonl")
    before = tree_hashes(str(out))
    rc, cap = run(mine, out, capsys=capsys)  # another input: this used to start over and delete work/ with it
    assert rc == 2 and len(errors(cap)) == 1, cap.err
    assert str(mine) in errors(cap)[0] and str(out) in errors(cap)[0]
    assert tree_hashes(str(out)) == before


def test_a_link_in_an_input_folder_to_a_file_in_the_output_is_refused(corpus, tmp_path, capsys):
    out, inputs = tmp_path / "out", tmp_path / "in"
    assert run(corpus, out, capsys=capsys)[0] == 0
    inputs.mkdir()
    prepared = sorted((out / "work" / "prepared").iterdir())[0]
    os.symlink(prepared, inputs / ("linked" + "".join(prepared.suffixes)))
    before = tree_hashes(str(out))
    rc, cap = run(inputs, out, capsys=capsys)  # this used to start over and overwrite the file it read
    assert rc == 2 and len(errors(cap)) == 1 and str(prepared) in cap.err, cap.err
    assert tree_hashes(str(out)) == before


def test_a_glob_over_the_input_folder_reruns_beside_its_own_output(tmp_path, capsys):
    corpus = tmp_path / "c"
    make_corpus(str(corpus), n_files=2, docs_per_file=5)
    out = corpus / "out"  # c/* matches out/ once it exists, but a glob's folders are not read
    assert run(f"{corpus}/*", out, capsys=capsys)[0] == 0
    before = tree_hashes(str(out / "shards"))
    rc, cap = run(f"{corpus}/*", out, capsys=capsys)  # this used to be refused: "c/out lies inside output_dir"
    assert rc == 0 and not errors(cap), cap.err
    assert tree_hashes(str(out / "shards")) == before


@pytest.mark.parametrize("entry, out, refused", [
    ("{r}/c", "{r}/c/out", True),  # output inside an input folder
    ("{r}/c", "{r}/c", True),  # the input folder itself
    ("{r}/c/part-0.jsonl", "{r}/c", True),  # an input file inside the output
    ("{r}/c/*/*.jsonl", "{r}/c/out", True),  # the glob reads one level below c: out's files too
    ("{r}/c/*.jsonl", "{r}/c", True),
    ("{r}/c/**/*.jsonl", "{r}/c/a/b/out", True),
    ("{r}/c/*.jsonl", "{r}/c/out", False),  # only c's own files: out is not read
    ("{r}/c", "{r}/c2", False),  # a sibling whose name starts like the input's
    ("{r}/c/*.jsonl", "{r}/elsewhere", False),
])
def test_which_output_dirs_overlap_an_input(tmp_path, entry, out, refused):
    make_corpus(str(tmp_path / "c"), n_files=1, docs_per_file=2)
    entry, out = entry.format(r=tmp_path), out.format(r=tmp_path)
    if refused:
        with pytest.raises(ConfigError, match="output_dir"):
            check_apart_from_inputs(out, [entry])
    else:
        check_apart_from_inputs(out, [entry])


# ------------------------------------------------------------------------------------- only what the manifest lists
USER_FILES = ("shards/notes.txt", "work/mine/keep.jsonl", "work/prepared/user.txt", "doc_ids/README",
              "work/mine/notes.tmpl", "draft.tmp")  # not temp names of ours (NAME.tmp<pid>)


def _plant(out) -> None:
    for rel in USER_FILES:
        os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
        with open(os.path.join(out, rel), "w") as f:
            f.write(f"the user's {rel}\n")


def _user_files_intact(out) -> bool:
    return all(open(os.path.join(out, rel)).read() == f"the user's {rel}\n" for rel in USER_FILES)


def test_a_start_over_removes_only_what_the_manifest_lists(corpus, tmp_path, capsys):
    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    assert run(corpus, out, capsys=capsys)[0] == 0
    _plant(out)
    # another config: start over (this used to remove shards/, doc_ids/ and work/ whole, the user's files with them)
    rc, cap = run(corpus, out, "shards.valid_fraction=0.2", "keep_work_files=false", capsys=capsys)
    assert rc == 0 and "starting over" in cap.out, cap.err
    assert _user_files_intact(out)
    assert run(corpus, fresh, "shards.valid_fraction=0.2", "keep_work_files=false", capsys=capsys)[0] == 0
    ours = [f for f in files_under(out) if f not in USER_FILES]
    assert ours == files_under(fresh)  # no stale file of the first run is left, and every new one is there
    skip = ("work/timings", "config.yaml", "work/config.yaml", *USER_FILES)
    assert tree_hashes(out, skip) == tree_hashes(fresh, skip)
    assert not [f for f in ours if f.startswith("work/prepared/")]  # keep_work_files=false: only ours went


def test_a_failed_start_over_keeps_the_users_files_in_subfolders(corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run(corpus, out, capsys=capsys)[0] == 0
    _plant(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    rc, cap = run(bad, out, capsys=capsys)  # starts over, then fails: the pipeline removes what it wrote
    assert rc == 1 and "UTF-8" in errors(cap)[0], cap.err
    assert files_under(out) == sorted([".llmforge-data", ".llmforge-data.lock", *USER_FILES])
    assert _user_files_intact(out)


def test_a_start_over_killed_after_the_fingerprint_went_starts_over_again(corpus, tmp_path, capsys):
    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    assert run(corpus, out, capsys=capsys)[0] == 0
    with open(os.path.join(out, "work", "manifest.json")) as f:
        gone = [p for p in sorted(json.load(f)) if p <= "work/fingerprint.json"]  # remove_listed's order, cut there
    for rel in gone:
        os.remove(os.path.join(out, rel))
    assert os.listdir(os.path.join(out, "work", "markers"))  # the old config's markers are left
    rc, cap = run(corpus, out, "shards.valid_fraction=0.2", capsys=capsys)  # this used to take them for its own
    assert rc == 0 and "starting over" in cap.out, cap.err
    assert run(corpus, fresh, "shards.valid_fraction=0.2", capsys=capsys)[0] == 0
    skip = ("work/timings", "config.yaml", "work/config.yaml")
    assert tree_hashes(out, skip) == tree_hashes(fresh, skip)


def test_a_folder_from_before_the_manifest_starts_over_without_stale_shards(corpus, tmp_path, capsys):
    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    assert run(corpus, out, capsys=capsys)[0] == 0
    os.remove(os.path.join(out, "work", "manifest.json"))  # as an older version left it
    for ext in (".bin", ".idx"):  # a shard of that version's run that the new one does not write
        shutil.copy(os.path.join(out, "shards", "train-00000" + ext), os.path.join(out, "shards", "train-00009" + ext))
    assert run(corpus, out, "shards.valid_fraction=0.2", capsys=capsys)[0] == 0
    assert run(corpus, fresh, "shards.valid_fraction=0.2", capsys=capsys)[0] == 0
    assert sorted(os.listdir(os.path.join(out, "shards"))) == sorted(os.listdir(os.path.join(fresh, "shards")))


def test_removal_never_touches_an_input_a_link_out_or_a_path_outside(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "work" / "sub").mkdir(parents=True)
    outside.mkdir()
    for p in (out / "work" / "in.jsonl", out / "work" / "sub" / "ours.txt", outside / "f.txt",
              tmp_path / "beside.txt", out / "work" / "torn"):
        p.write_text("x\n")
    os.symlink(outside, out / "work" / "link")
    listed = ["work/in.jsonl", "work/sub/ours.txt", "../beside.txt", "work/link/f.txt", str(outside / "f.txt")]
    (out / "work" / "manifest.json").write_text(json.dumps(listed))
    (out / "work" / "manifest").mkdir()
    (out / "work" / "manifest" / "h-1.jsonl").write_bytes(b'"work/torn')  # a line cut by a kill
    assert remove_listed(str(out), protect=[str(out / "work" / "in.jsonl")])
    assert not (out / "work" / "sub").exists()  # ours, and its folder once empty
    for p in (out / "work" / "in.jsonl", outside / "f.txt", tmp_path / "beside.txt", out / "work" / "torn"):
        assert p.read_text() == "x\n", p
    assert not (out / "work" / "manifest.json").exists() and not (out / "work" / "manifest").exists()


# ------------------------------------------------------------------------------------- merge
def _tokenizer(path: str, vocab: int) -> None:
    import sentencepiece as spm
    buf = io.BytesIO()
    lines = [f"line {i} of the quick brown fox and the lazy dog, number {i * 7}." for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Three pipeline-like folders (tokenizer.model + shards/train-00000): A and B share a tokenizer, C has
    another vocabulary size; D has no tokenizer.model but its stats.json records C's vocabulary size."""
    root = tmp_path_factory.mktemp("merge")
    prefixes = {}
    for name, vocab in (("A", 300), ("B", 300), ("C", 400), ("D", None)):
        os.makedirs(root / name / "shards")
        if vocab:
            _tokenizer(str(root / name / "tokenizer.model"), vocab)
        else:
            (root / name / "stats.json").write_text(json.dumps({"tokenizer": {"vocab_size": 400}}))
        prefixes[name] = str(root / name / "shards" / "train-00000")
        with shards_mod.ShardWriter(prefixes[name], np.uint16) as w:
            for i in range(3):
                w.add_document(np.arange(5 + i) + ord(name))
    return prefixes


def test_merge_refuses_an_existing_output_unless_forced(outputs, tmp_path, capsys):
    out = str(tmp_path / "merged")
    for ext in (".bin", ".idx"):
        with open(out + ext, "w") as f:
            f.write("the user's file\n")
    assert main(["merge", out, outputs["A"], outputs["B"]]) == 2  # this used to replace both files
    cap = capsys.readouterr()
    assert len(errors(cap)) == 1 and out + ".bin" in cap.err and "--force" in cap.err
    assert all(open(out + ext).read() == "the user's file\n" for ext in (".bin", ".idx"))
    assert main(["merge", out, outputs["A"], outputs["B"], "--force"]) == 0
    merged = shards_mod.IndexedShard(out)
    assert len(merged) == 6 and np.array_equal(merged.doc(3), shards_mod.IndexedShard(outputs["B"]).doc(0))
    assert main(["merge", outputs["A"], outputs["A"], outputs["B"], "--force"]) == 2  # an input is never replaced
    assert "also an input" in capsys.readouterr().err


@pytest.mark.parametrize("pair", [("A", "C"), ("A", "D")])
def test_merge_refuses_shards_from_different_tokenizers(outputs, tmp_path, capsys, pair):
    out = str(tmp_path / "merged")
    a, b = (outputs[k] for k in pair)
    assert main(["merge", out, a, b]) == 2  # this used to join them, and the result trained
    cap = capsys.readouterr()
    assert len(errors(cap)) == 1 and a in cap.err and b in cap.err and "different tokenizers" in cap.err
    assert "vocab 300" in cap.err and "vocab 400" in cap.err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("merged")]


def test_a_failed_merge_leaves_no_output(outputs, tmp_path, capsys, monkeypatch):
    calls = []

    def full(self, ids):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", self._tmp + ".bin")
        return real(self, ids)
    real = shards_mod.ShardWriter.add_document
    monkeypatch.setattr(shards_mod.ShardWriter, "add_document", full)
    assert main(["merge", str(tmp_path / "merged"), outputs["A"], outputs["B"]]) == 1
    cap = capsys.readouterr()
    assert len(errors(cap)) == 1 and "No space left" in cap.err and "Traceback" not in cap.err
    assert os.listdir(tmp_path) == []


def test_merge_checks_loose_shards_and_the_outputs_folder_by_their_token_ids(outputs, tmp_path, capsys):
    loose = str(tmp_path / "loose")  # a copy without its tokenizer.model or stats.json: ids up to 350
    with shards_mod.ShardWriter(loose, np.uint16) as w:
        w.add_document(np.arange(340, 351))
    c_folder = os.path.dirname(os.path.dirname(outputs["C"]))
    cases = [(str(tmp_path / "m"), [outputs["A"], loose], "token id 350"),  # used to merge: A's vocab is 300
             (os.path.join(c_folder, "shards", "m"), [outputs["A"], outputs["B"]], "vocab 400")]  # beside C's
    for out, ins, said in cases:
        assert main(["merge", out, *ins]) == 2
        cap = capsys.readouterr()
        assert len(errors(cap)) == 1 and said in cap.err and "different tokenizer" in cap.err, cap.err
        assert not os.path.exists(out + ".idx")
    assert main(["merge", os.path.join(c_folder, "shards", "m"), outputs["C"], loose]) == 0  # 350 < 400: fits
    for ext in (".bin", ".idx", ".stats.json"):
        os.remove(os.path.join(c_folder, "shards", "m" + ext))


def test_merge_force_never_replaces_a_folder(outputs, tmp_path, capsys):
    (tmp_path / "merged.bin").mkdir()  # --force used to write OUT.stats.json and temp files, then fail on the rename
    assert main(["merge", str(tmp_path / "merged"), outputs["A"], outputs["B"], "--force"]) == 2
    cap = capsys.readouterr()
    assert len(errors(cap)) == 1 and "merged.bin is a folder" in cap.err, cap.err
    assert os.listdir(tmp_path) == ["merged.bin"]
