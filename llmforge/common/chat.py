"""The chat template shared by the SFT data stage, training, generation and the Hugging Face export.

A conversation renders as ``EOS <|role|>\ncontent\n ... <|assistant|>\ncontent EOS``; the loss mask covers the
assistant contents and the EOS that ends each of them. ``JINJA`` is the same template for transformers'
``apply_chat_template`` (tests check that both give the same ids).
"""
from __future__ import annotations

import json
import os


class ChatTemplateError(ValueError):
    """A tokenizer the template cannot use: one printable line naming the file."""


ROLES = ("system", "user", "assistant")
TEMPLATE_NAME = "llmforge-chat-v1"
TEMPLATE_FILE = "chat_template.json"
MASK_DIR = "loss_mask"
# A text that exposes tokenizer differences (spaces, tabs, newlines, unicode): exported tokenizers are checked on it.
CHECK_TEXT = "Hello world.  Two  spaces,\ttabs\nnew lines; ünïcödé, 日本語, digits 12345 and symbols {}[]<>!"
# Jinja form of ``render`` (Hugging Face chat_template); tests check that both give the same ids.
JINJA = ("{{ eos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
         "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def header(role: str) -> str:
    return f"<|{role}|>\n"


def render(messages: list[dict], eos: str = "</s>", add_generation_prompt: bool = False) -> str:
    """The conversation as text (what the Jinja template renders)."""
    out = [eos]
    for m in messages:
        out.append(header(m["role"]) + m["content"] + (eos if m["role"] == "assistant" else "\n"))
    if add_generation_prompt:
        out.append(header("assistant"))
    return "".join(out)


def _no_dummy_prefix(model_bytes: bytes):
    """A sentencepiece processor that does not prepend '▁' to the text (HF's behaviour after a special token)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class ChatTemplate:
    """Encodes conversations with the template: ``encode(messages) -> (ids, mask)``, ``encode_prompt``."""

    def __init__(self, tokenizer_path: str):
        with open(tokenizer_path, "rb") as f:
            self.sp = _no_dummy_prefix(f.read())
        self.eos_id, self.pad_id, self.bos_id = self.sp.eos_id(), self.sp.pad_id(), self.sp.bos_id()
        if self.eos_id < 0:
            raise ChatTemplateError(f"{tokenizer_path}: the tokenizer has no EOS token (the chat template needs one)")
        self.eos = self.sp.id_to_piece(self.eos_id)

    def _segment(self, text: str, response_start: int | None, ids: list, mask: list) -> None:
        """Encode one text segment (between EOS tokens); tokens from byte ``response_start`` on get mask 1."""
        if not text:
            return
        for p in self.sp.encode(text, return_type="proto").pieces:
            ids.append(p.id)
            mask.append(int(response_start is not None and (p.begin >= response_start or p.end > response_start)))

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        ids, mask, text = [self.eos_id], [0], ""
        for m in messages:
            if m["role"] == "assistant":
                text += header("assistant")
                start = len(text.encode("utf-8"))
                self._segment(text + m["content"], start, ids, mask)
                ids.append(self.eos_id)
                mask.append(1)
                text = ""
            else:
                text += header(m["role"]) + m["content"] + "\n"
        if add_generation_prompt:
            text += header("assistant")
        self._segment(text, None, ids, mask)
        return ids, mask

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Ids that ask the model for the next assistant turn (generation / HF add_generation_prompt=True)."""
        return self.encode(messages, add_generation_prompt=True)[0]

    def describe(self) -> dict:
        """What ``chat_template.json`` holds (everything a consumer needs besides the tokenizer)."""
        return {"name": TEMPLATE_NAME, "jinja": JINJA, "roles": list(ROLES), "eos_token": self.eos,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "dummy_prefix": False, "loss_mask": "assistant contents and the EOS that ends each of them"}


def load_template(folder: str) -> dict | None:
    path = os.path.join(folder, TEMPLATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def copy_chat_template(paths: list[str], run_dir: str) -> None:
    """The first data path's chat_template.json into the run dir (generate and export_hf read it there)."""
    from .atomic import copy_file
    for p in paths:
        src = os.path.join(p, TEMPLATE_FILE)
        if os.path.isfile(src):
            copy_file(src, os.path.join(run_dir, TEMPLATE_FILE))
            return


def chat_prompt_ids(run_dir: str, prompt: str, system: str | None = None) -> list[int] | None:
    """Ids asking a fine-tuned run (``chat_template.json`` in its dir) to answer ``prompt``; None otherwise."""
    if not os.path.isfile(os.path.join(run_dir, TEMPLATE_FILE)):
        return None
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return ChatTemplate(os.path.join(run_dir, "tokenizer.model")).encode_prompt(msgs)
