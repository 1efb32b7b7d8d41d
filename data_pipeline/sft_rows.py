"""SFT rows -> cleaned messages: row parsing and validation, per-message cleaning, chat-template encoding with its
loss mask, and the reader the prepare stage uses when ``sft.enabled`` (the stages themselves: data_pipeline/sft.py).
"""
from __future__ import annotations

import re
import unicodedata

from .readers import Reader

from llmforge.common.chat import ROLES, ChatTemplate, render

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")


# ------------------------------------------------------------------------------------------------ rows
def clean_message(text: str, normalization: str) -> str:
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def parse_row(rec, scfg) -> list[dict]:
    """A row -> messages; raises ValueError with a one-line reason for a malformed row."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    both = [k for k in (scfg.prompt_key, scfg.response_key) if k in rec]
    if scfg.messages_key in rec and both:  # which one would be trained on is a guess: refuse it
        raise ValueError(f"the row has both {scfg.messages_key!r} and {'/'.join(map(repr, both))}: a row holds one "
                         "conversation, either {prompt, response} or messages")
    if scfg.messages_key in rec:
        msgs = rec[scfg.messages_key]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{scfg.messages_key!r} must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            where = f"{scfg.messages_key}[{i}]"
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: expected an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"{where}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise ValueError(f"{where}: content is {type(m['content']).__name__}, not a string")
            out.append({"role": m["role"], "content": m["content"]})
    elif scfg.prompt_key in rec or scfg.response_key in rec:
        for key in (scfg.prompt_key, scfg.response_key):
            if key not in rec:
                raise ValueError(f"missing field {key!r}")
            if not isinstance(rec[key], str):
                raise ValueError(f"field {key!r} is {type(rec[key]).__name__}, not a string")
        out = [{"role": "user", "content": rec[scfg.prompt_key]},
               {"role": "assistant", "content": rec[scfg.response_key]}]
        system = rec.get(scfg.system_key)
        if system is not None:
            if not isinstance(system, str):
                raise ValueError(f"field {scfg.system_key!r} is {type(system).__name__}, not a string")
            out.insert(0, {"role": "system", "content": system})
    else:
        raise ValueError(f"missing field {scfg.prompt_key!r}/{scfg.response_key!r} or {scfg.messages_key!r}; "
                         f"fields: {sorted(rec)[:10]}")
    return out


def check_messages(msgs: list[dict]) -> None:
    if msgs[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (nothing would be learnt from the rest)")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"]:
            raise ValueError(f"empty response (assistant message {i})")
        if m["role"] == "user" and not m["content"]:
            raise ValueError(f"empty prompt (user message {i})")


def encode_row(template: ChatTemplate, msgs: list[dict], scfg) -> tuple[list[int], list[int]]:
    """Ids and mask of a conversation, with sft.max_tokens / sft.truncation applied (ValueError if unusable)."""
    ids, mask = template.encode(msgs)
    if scfg.max_tokens and len(ids) > scfg.max_tokens:
        if scfg.truncation != "right":
            raise ValueError(f"{len(ids)} tokens exceed sft.max_tokens={scfg.max_tokens} (sft.truncation=none)")
        ids, mask = ids[:scfg.max_tokens], mask[:scfg.max_tokens]
        if not any(mask):
            raise ValueError(f"no response token within sft.max_tokens={scfg.max_tokens} (sft.truncation=right)")
    return ids, mask


class SFTReader(Reader):
    """The pretraining readers (jsonl/.gz/.zst, parquet, HF datasets) with chat rows instead of a text field.
    Documents carry the rendered conversation as ``text`` (for dedup and stats) and the cleaned messages in meta."""

    def __init__(self, cfg, stats):
        super().__init__(cfg.input, stats)
        self.full = cfg
        self.template = ChatTemplate(cfg.tokenizer.model_path)

    def _make(self, doc_id: str, rec, where: str):
        scfg = self.full.sft
        try:
            msgs = parse_row(rec, scfg)
            chars = sum(len(m["content"]) for m in msgs)
            if chars > self.cfg.max_doc_chars:  # as the pretraining reader: a bad record (input.on_error decides)
                raise ValueError(f"conversation of {chars} characters exceeds input.max_doc_chars={self.cfg.max_doc_chars}")
            if self.full.clean.enabled:
                msgs = [{"role": m["role"], "content": clean_message(m["content"], self.full.clean.normalization)}
                        for m in msgs]
            check_messages(msgs)
            encode_row(self.template, msgs, scfg)  # length check here, where file:line is known
        except ValueError as e:
            return self._bad(where, str(e))
        meta = {k: rec[k] for k in self.cfg.metadata_keys if k in rec}
        if self.cfg.id_key and self.cfg.id_key in rec:
            meta["source_id"] = rec[self.cfg.id_key]
        meta["messages"] = msgs
        return {"id": doc_id, "text": render(msgs, self.template.eos), "meta": meta}
