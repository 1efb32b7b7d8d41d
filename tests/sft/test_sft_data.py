"""SFT data pipeline: chat template ids, loss masks, malformed rows (file:line), dedup, outputs."""
from __future__ import annotations

import json
import os

import pytest
import sentencepiece as spm

from data_pipeline.sft import ChatTemplate, render
from data_pipeline.shards import IndexedShard
from tests.sft.conftest import run_pipeline, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def _docs(data: str, split: str):
    tok, mask = IndexedShard(f"{data}/shards/{split}-00000"), IndexedShard(f"{data}/loss_mask/{split}-00000")
    return [(tok.doc(i).tolist(), mask.doc(i).tolist()) for i in range(len(tok))]


def test_shards_hold_template_ids_and_response_masks(sft_env):
    data, rows = sft_env["data"], sft_env["rows"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(data, "tokenizer.model"))
    template = ChatTemplate(os.path.join(data, "tokenizer.model"))
    ids_of = open(os.path.join(data, "doc_ids", "train-00000.txt")).read().split()
    docs = _docs(data, "train") + _docs(data, "valid")
    assert len(docs) == len(rows) and len(_docs(data, "valid")) >= 1
    for (ids, mask), doc_id in zip(_docs(data, "train"), ids_of):
        row = rows[int(doc_id.rsplit(":", 1)[1]) - 1]
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        assert (ids, mask) == tuple(map(list, template.encode(msgs)))
        assert ids[0] == ids[-1] == sp.eos_id() and mask[0] == 0 and mask[-1] == 1
        scored = [i for i, m in zip(ids, mask) if m]
        assert sp.decode(scored[:-1]) == row["response"]  # the response, then its EOS; nothing of the prompt
        assert sp.decode(ids[1:-1]) == render(msgs)[len("</s>"):-len("</s>")]
    meta = json.load(open(os.path.join(data, "chat_template.json")))
    assert meta["eos_id"] == sp.eos_id() and "{{ eos_token }}" in meta["jinja"]
    stats = json.load(open(os.path.join(data, "stats.json")))
    assert stats["output"]["train"]["docs"] + stats["output"]["valid"]["docs"] == len(rows)
    assert stats["sft"]["loss_tokens"]["train"] == sum(sum(m) for _, m in _docs(data, "train"))


def test_multi_turn_masks_every_assistant_turn(sft_env):
    t = ChatTemplate(sft_env["tok"])
    msgs = [{"role": "system", "content": "amber"}, {"role": "user", "content": "basil cedar"},
            {"role": "assistant", "content": "dune"}, {"role": "user", "content": "ember"},
            {"role": "assistant", "content": "fjord gale"}]
    ids, mask = t.encode(msgs)
    scored = [i for i, m in zip(ids, mask) if m]
    eos = t.eos_id
    assert scored.count(eos) == 2 and ids.count(eos) == 3  # leading EOS unscored; one per assistant turn
    parts = " ".join(t.sp.decode([i for i in scored if i != eos]).split())
    assert parts == "dunefjord gale"
    prompt = t.encode_prompt(msgs[:2])
    assert ids[:len(prompt)] == prompt  # the generation prompt is a prefix of the trained conversation


BAD = [
    ('{"prompt": "amber"}', "missing field 'response'"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "unknown role 'robot'"),
    ('{"prompt": "amber", "response": "   "}', "empty response"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant"),
    ('{"prompt": "amber basil cedar dune ember fjord gale heron iris", "response": "kelp"}',
     "exceed sft.max_tokens=20"),
    ('{"text": "plain"}', "missing field 'prompt'/'response' or 'messages'"),
    ('{"prompt": 3, "response": "x"}', "field 'prompt' is int"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_malformed_row_names_file_and_line_and_leaves_nothing(tmp_path, sft_env, capsys, line, message):
    rows = write_jsonl(str(tmp_path / "rows.jsonl"), ['{"prompt": "amber", "response": "basil"}', line])
    out = str(tmp_path / "out")
    assert run_pipeline(rows, out, sft_env["tok"], "sft.max_tokens=20") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {rows}:2: ") and message in err and len(err.splitlines()) == 1
    assert not os.path.exists(out)


def test_skip_counts_bad_rows_and_exact_dedup_drops_copies(tmp_path, sft_env):
    good = [{"prompt": "amber", "response": "basil"}, {"prompt": "Amber ", "response": "basil"},  # a copy
            {"messages": [{"role": "user", "content": "cedar"}, {"role": "assistant", "content": "dune"}]}]
    rows = write_jsonl(str(tmp_path / "rows.jsonl"), good + [line for line, _ in BAD])
    out = str(tmp_path / "out")
    assert run_pipeline(rows, out, sft_env["tok"], "sft.max_tokens=20", "input.on_error=skip",
                        "shards.valid_fraction=0") == 0
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["input"]["read_errors"] == len(BAD)
    assert stats["removed_by_rule"]["dedup.exact"] == 1 and stats["output"]["train"]["docs"] == 2
    masks = sorted(f for f in os.listdir(os.path.join(out, "loss_mask")) if f.endswith((".bin", ".idx")))
    assert len(_docs(out, "train")) == 2 and masks == ["train-00000.bin", "train-00000.idx"]


def test_sft_needs_a_tokenizer(tmp_path, capsys):
    from data_pipeline.__main__ import main
    rows = write_jsonl(str(tmp_path / "rows.jsonl"), ['{"prompt": "a", "response": "b"}'])
    assert main(["run", "configs/data/sft.yaml", f"input.paths=[{rows}]", f"output_dir={tmp_path}/o"]) == 2
    assert "tokenizer.model_path" in capsys.readouterr().err


def test_shipped_instruction_set_passes_the_pipeline_whole(tmp_path, sft_env):
    src = os.path.join(ROOT, "data_pipeline", "sample_instructions", "instructions.jsonl")
    rows = [json.loads(line) for line in open(src)]
    assert len(rows) == 64 and all(r["license"] == "CC0-1.0" for r in rows)
    out = str(tmp_path / "out")
    assert run_pipeline(src, out, sft_env["tok"]) == 0
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["input"]["read_errors"] == 0 and not stats["removed_by_rule"]
    assert stats["output"]["train"]["docs"] + stats["output"]["valid"]["docs"] == len(rows)


def test_truncation_right_cuts_long_rows_and_rejects_rows_left_without_response(tmp_path, sft_env):
    from llmforge.common.chat import ChatTemplate as Template
    t = Template(sft_env["tok"])
    long_prompt = " ".join(["amber"] * 30)
    rows = [{"prompt": "basil", "response": " ".join(["cedar"] * 30)},  # cut inside the response: kept
            {"prompt": long_prompt, "response": "dune"}]                # cut before the response: a bad row
    src = write_jsonl(str(tmp_path / "rows.jsonl"), rows)
    out = str(tmp_path / "out")
    assert run_pipeline(src, out, sft_env["tok"], "sft.max_tokens=24", "sft.truncation=right", "input.on_error=skip",
                        "shards.valid_fraction=0") == 0
    (ids, mask), = _docs(out, "train")
    full_ids, full_mask = t.encode([{"role": "user", "content": rows[0]["prompt"]},
                                    {"role": "assistant", "content": rows[0]["response"]}])
    assert ids == full_ids[:24] and mask == full_mask[:24] and 0 < sum(mask) < sum(full_mask)
    assert json.load(open(os.path.join(out, "stats.json")))["input"]["read_errors"] == 1


def test_mixing_sft_and_pretraining_paths_is_refused(sft_env):
    from llmforge.core.config import ConfigError
    from llmforge.data.sft import is_sft_data
    assert is_sft_data([sft_env["data"]]) and not is_sft_data([sft_env["pre_data"]])
    with pytest.raises(ConfigError, match="mixes SFT data"):
        is_sft_data([sft_env["data"], sft_env["pre_data"]])
