"""The data pipeline's process and input robustness (issue 21): a Ray cluster that never answers fails in one line
after ray.connect_timeout and SIGTERM stops the wait; no Ray installed, or a tokenizer.model_path that is not a
sentencepiece model, is one line before anything is written; SFT rows obey input.max_doc_chars and may not hold
two conversations; kill -9 of the main process takes its pool workers with it and leaves the folder free; a
symlink loop is named as one; a file below input.task_mb is split across the workers, to the same bytes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from tests.data_pipeline.conftest import BASE, ROOT, cli, run_inproc, tree_hashes
from tests.data_pipeline.corpus import document, make_corpus, write_jsonl

FINALS = ("shards", "doc_ids", "tokenizer.model")


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def _small_input(tmp_path, n_docs: int = 12) -> str:
    return write_jsonl(str(tmp_path / "in" / "docs.jsonl"), [{"text": document(i)} for i in range(n_docs)])


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


# ------------------------------------------------------------------------------------------------ Ray
def test_ray_address_without_a_cluster_fails_in_one_line_after_the_timeout(tmp_path):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_unused_port()}"
    t0 = time.monotonic()
    p = cli("run", "configs/data/sample.yaml", f"input.paths=[{_small_input(tmp_path)}]",
            f"output_dir={tmp_path / 'out'}", "executor=ray", f"ray.address={address}", "ray.connect_timeout=3",
            *BASE, timeout=120)
    assert p.returncode == 1 and time.monotonic() - t0 < 60, (p.returncode, p.stderr[-2000:])
    assert _errors(p.stderr) == [f"error: ray.address={address}: no Ray cluster answered within 3 s "
                                 "(ray.connect_timeout); is `ray start --head` running there?"], p.stderr[-2000:]


def test_a_timeout_as_long_as_rays_own_retry_is_still_one_line(tmp_path):
    """Ray's C++ client warns after 5 s ("Failed to connect to GCS ... within 5 seconds") from the abandoned
    connect thread: with ray.connect_timeout=5 that line came out after the run's own."""
    pytest.importorskip("ray")
    address = "127.0.0.1:1"  # the address (with a random free port Ray's warning did not come in time)
    p = cli("run", "configs/data/sample.yaml", f"input.paths=[{_small_input(tmp_path)}]",
            f"output_dir={tmp_path / 'out'}", "executor=ray", f"ray.address={address}", "ray.connect_timeout=5",
            *BASE, timeout=120)
    assert p.returncode == 1 and _errors(p.stderr) == [
        f"error: ray.address={address}: no Ray cluster answered within 5 s (ray.connect_timeout); is `ray start "
        "--head` running there?"], p.stderr[-2000:]


def test_sigterm_while_waiting_for_ray_exits_143_in_one_line(tmp_path):
    pytest.importorskip("ray")
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "data_pipeline", "run", "configs/data/sample.yaml",
            f"input.paths=[{_small_input(tmp_path)}]", f"output_dir={tmp_path / 'out'}", "executor=ray",
            f"ray.address=127.0.0.1:{_unused_port()}", *BASE]  # the default 60 s timeout: SIGTERM comes first
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(tmp_path / "out" / "work" / "fingerprint.json") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # inside ray.init, where Python signal handlers used to never run
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 143 and time.monotonic() - t0 < 10, err[-2000:]
    assert _errors(err) == ["error: terminated (SIGTERM); finished tasks are kept: rerun the same command to "
                            "resume"], err[-2000:]


def test_without_ray_installed_one_line_says_how_to_install_it(tmp_path):
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(shim.parent)]))  # the shim before site-packages
    p = subprocess.run([sys.executable, "-m", "data_pipeline", "run", "configs/data/sample.yaml",
                        f"input.paths=[{_small_input(tmp_path)}]", f"output_dir={out}", "executor=ray", *BASE],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    lines = _errors(p.stderr)
    assert p.returncode == 2 and len(lines) == 1 and "pip install 'llmforge[ray]'" in lines[0], p.stderr[-2000:]
    assert lines[0].startswith("error: executor=ray needs Ray") and not out.exists()


# ------------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("content,why", [(b"not a model\n", "it does not parse as one"), (b"", "an empty file")])
def test_model_path_that_is_not_sentencepiece_is_refused_before_prepare(tmp_path, content, why):
    bad = tmp_path / "tok.model"
    bad.write_bytes(content)
    out = tmp_path / "out"
    p = cli("run", "configs/data/sample.yaml", f"input.paths=[{_small_input(tmp_path)}]", f"output_dir={out}",
            f"tokenizer.model_path={bad}", *BASE)
    assert p.returncode == 2 and _errors(p.stderr) == [
        f"error: tokenizer.model_path={bad}: not a sentencepiece model ({why})"], p.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ SFT rows
@pytest.fixture(scope="module")
def sft_tok(tmp_path_factory):
    from tests.sft.conftest import train_tokenizer
    return train_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


SFT_BAD = [
    ('{"prompt": "amber", "response": "%s"}' % ("basil " * 40), "conversation of 245 characters exceeds "
                                                              "input.max_doc_chars=200"),
    ('{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "x"}]}' % ("a" * 201),
     "conversation of 202 characters exceeds input.max_doc_chars=200"),
    ('{"prompt": "amber", "response": "basil", "messages": [{"role": "user", "content": "cedar"}, '
     '{"role": "assistant", "content": "dune"}]}', "the row has both 'messages' and 'prompt'/'response'"),
]


@pytest.mark.parametrize("line,message", SFT_BAD, ids=["long-response", "long-messages", "both"])
def test_sft_row_too_long_or_with_two_conversations_is_a_bad_record(tmp_path, sft_tok, capsys, line, message):
    from tests.sft.conftest import run_pipeline
    rows = str(tmp_path / "rows.jsonl")
    with open(rows, "w") as f:
        f.write('{"prompt": "amber", "response": "basil"}\n' + line + "\n")
    out = str(tmp_path / "out")
    assert run_pipeline(rows, out, sft_tok, "input.max_doc_chars=200") == 1
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {rows}:2: ") and message in err[0], err
    assert not os.path.exists(out)


def test_sft_bad_rows_are_counted_with_on_error_skip(tmp_path, sft_tok):
    from tests.sft.conftest import run_pipeline
    rows = str(tmp_path / "rows.jsonl")
    with open(rows, "w") as f:
        f.write('{"prompt": "amber", "response": "basil"}\n' + "".join(line + "\n" for line, _ in SFT_BAD))
    out = str(tmp_path / "out")
    assert run_pipeline(rows, out, sft_tok, "input.max_doc_chars=200", "input.on_error=skip",
                        "shards.valid_fraction=0") == 0
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["input"]["read_errors"] == len(SFT_BAD) and stats["output"]["train"]["docs"] == 1


# ------------------------------------------------------------------------------------------------ kill -9
def _children(pid: int) -> set[int]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out |= {int(c) for c in f.read().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds no file and runs nothing
    except FileNotFoundError:
        return False


def test_kill_9_of_the_main_process_takes_its_workers_and_frees_the_folder(tmp_path):
    # Two long tasks: a worker orphaned in the middle of one used to run on for seconds, holding the folder's lock.
    corpus = make_corpus(str(tmp_path / "corpus"), n_files=1, docs_per_file=600)
    out = str(tmp_path / "out")
    args = ["run", "configs/data/sample.yaml", f"input.paths=[{corpus}]", f"output_dir={out}", "workers=2",
            "tasks=2", *BASE]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline", *args], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers = _children(proc.pid)  # the prepare stage's pool
            time.sleep(0.02)
        assert len(workers) >= 2, "the run never started its worker pool"
        time.sleep(0.3)  # inside their tasks
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as a careless `kill -9 PID` does
        proc.wait()
        deadline = time.monotonic() + 1.5  # a task takes longer: only a worker killed with its parent stops by then
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), f"pool workers {sorted(workers)} outlived their parent"
    finally:
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    p = cli(*args)  # at once: the dead run's lock is free
    assert p.returncode == 0, p.stderr[-2000:]
    assert not [n for d, _, names in os.walk(out) for n in names if ".tmp" in n]


# ------------------------------------------------------------------------------------------------ inputs
def test_symlink_loop_is_named_as_one(tmp_path):
    folder = tmp_path / "in"
    _small_input(tmp_path)
    os.symlink("loop.jsonl", folder / "loop.jsonl")
    from data_pipeline import config
    from data_pipeline.readers import Reader, expand_paths
    for paths in ([str(folder)], [str(folder / "loop.jsonl")], [str(folder / "*.jsonl")]):
        cfg = config.load(None, [f"input.paths=[{','.join(paths)}]"])
        with pytest.raises(config.ConfigError, match=r"loop.jsonl is a symlink loop \(ELOOP"):
            expand_paths(cfg.input)
    # A loop that appears after the inputs were listed: the reader says so too, not "corrupt compressed file".
    from collections import Counter
    from data_pipeline.readers import InputError
    with pytest.raises(InputError, match=r"loop.jsonl: a symlink loop \(ELOOP"):
        list(Reader(cfg.input, Counter()).read("jsonl", str(folder / "loop.jsonl"), "loop.jsonl"))


def test_file_below_task_mb_is_split_across_workers_to_the_same_bytes(tmp_path):
    path = write_jsonl(str(tmp_path / "one.jsonl"), [{"text": document(7000 + i)} for i in range(40)])
    outs = {w: str(tmp_path / f"w{w}") for w in (1, 2)}
    results = {w: run_inproc(path, outs[w], f"workers={w}") for w in outs}
    stats = {w: r["stats"] for w, r in results.items()}
    assert stats[1]["input"]["tasks"] == 1 and stats[2]["input"]["tasks"] == 2
    prep = [json.load(open(os.path.join(outs[2], "work", "markers", "prepare", n)))
            for n in sorted(os.listdir(os.path.join(outs[2], "work", "markers", "prepare")))]
    assert len(prep) == 2 and all(p["read"]["docs"] > 0 for p in prep)  # both cores had work
    finals = {w: {k: v for k, v in tree_hashes(o).items() if k.startswith(FINALS)} for w, o in outs.items()}
    assert len(finals[1]) >= 4 and finals[1] == finals[2]
    for s in stats.values():
        s["input"].pop("tasks")  # stats.json records the layout, as with an explicit tasks=N
    assert stats[1] == stats[2]
    # Resumed with another worker count: the layout it began with is kept, nothing runs again.
    again = run_inproc(path, outs[2], "workers=1")
    assert again["stats"]["input"]["tasks"] == 2 and again["task_seconds"] == results[2]["task_seconds"]


def test_tilde_in_paths_is_the_home_folder(tmp_path, monkeypatch):
    """`output_dir: ~/x` in a YAML file (no shell to expand it) used to be a folder named ~ in the cwd, and an
    input under ~ was not found."""
    monkeypatch.setenv("HOME", str(tmp_path))
    from data_pipeline import config
    cfg = config.load(None, ["output_dir=~/out", "input.paths=[~/in/docs.jsonl]", "tokenizer.model_path=~/t.model"])
    assert (cfg.output_dir, cfg.input.paths, cfg.tokenizer.model_path) == (
        str(tmp_path / "out"), [str(tmp_path / "in" / "docs.jsonl")], str(tmp_path / "t.model"))
