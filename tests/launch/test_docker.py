"""docker/: the Dockerfile parses (valid instructions, FROM pinned by tag, non-root USER, ENTRYPOINT set, COPY
sources exist) — no Docker engine here — and docker/entrypoint.sh works on the host."""
import json
import os
import re
import subprocess
import sys

from tests.conftest import ROOT, read_metrics

DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")
ENTRY = os.path.join(ROOT, "docker", "entrypoint.sh")
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse(path):
    """(instruction, arguments) pairs: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in open(path):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word, rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation at the end of the Dockerfile"
    return out


def test_dockerfile_parses_and_is_pinned():
    inst = parse(DOCKERFILE)
    assert all(w.upper() == w and w in INSTRUCTIONS for w, _ in inst), [w for w, _ in inst if w not in INSTRUCTIONS]
    assert inst[0][0] == "FROM" or all(w == "ARG" for w, _ in inst[:[w for w, _ in inst].index("FROM")])
    image = [a for w, a in inst if w == "FROM"][0].split()[0]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "@" not in tag and re.search(r"\d", tag), image
    assert re.match(r"^\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel$", tag)  # torch, CUDA, cuDNN in the tag
    users = [a for w, a in inst if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = json.loads([a for w, a in inst if w == "ENTRYPOINT"][-1])  # exec form
    assert entry[-1] == "/usr/local/bin/llmforge-entrypoint"
    for w, a in inst:
        if w == "COPY":
            *srcs, _dst = a.split()
            for src in srcs:
                if "*" not in src:
                    assert os.path.exists(os.path.join(ROOT, src)), f"COPY source missing: {src}"
    run = " ".join(a for w, a in inst if w == "RUN")
    assert "deepspeed==0.19.8" in run and "DS_BUILD_CPU_ADAM=1" in run and "DS_BUILD_FUSED_ADAM=1" in run
    text = open(DOCKERFILE).read()
    for fact in ("CUDA toolkit 12.8", "NCCL 2.27", "torch 2.8.0"):
        assert fact in text  # versions written down


def _entry(*args, timeout=300):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHON=sys.executable)
    env.pop("LLMFORGE_HOME", None)
    return subprocess.run(["bash", ENTRY, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd="/tmp")


def test_entrypoint_trains_tiny(synth_data, tmp_path):
    r = _entry("train", os.path.join(ROOT, "configs/train/tiny-cpu.yaml"), f"data.paths=[{synth_data}]",
               "model.vocab_size=64", f"run_dir={tmp_path}/run", "train.steps=2", "data.seq_len=64",
               "logging.plot=false", "train.eval_batches=1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2] and rows[2]["tokens"] == 2 * 8 * 64
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE")


def test_entrypoint_forwards_to_launchers():
    r = _entry("torchrun", "--dry-run", "--nproc-per-node", "2", os.path.join(ROOT, "configs/train/tiny-cpu.yaml"))
    assert r.returncode == 0, r.stderr
    assert "-m torch.distributed.run" in r.stdout and "--nproc-per-node=2" in r.stdout
    r = _entry("shell", "echo", "hello-from-shell")
    assert r.returncode == 0 and r.stdout.strip() == "hello-from-shell"
    r = _entry("--help")
    assert r.returncode == 0 and "usage: entrypoint.sh COMMAND" in r.stdout


def test_entrypoint_bogus_command_fails_with_usage():
    r = _entry("bogus")
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown command 'bogus'") and "usage: entrypoint.sh COMMAND" in r.stderr
    r = _entry()
    assert r.returncode == 2 and "error: missing command" in r.stderr
    r = _entry("deepspeed", "--num_gpus", "2")
    assert r.returncode == 2 and "deepspeed needs CONFIG.yaml" in r.stderr
