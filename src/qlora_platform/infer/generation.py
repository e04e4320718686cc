"""What one generated sequence is made of, shared by the engine and the batcher.

`Generation` is a finished answer with its timings, `TextRow` turns one sequence's
tokens into text as they come (stop strings included), `left_padded` lays prompts
of different lengths out for one batched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def single_turn(prompt: str, system: str | None = None) -> list[dict]:
    """Chat messages for one question, with an optional system prompt first."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    prefill_s: float  # prompt forward + first token: the time to first token
    decode_s: float  # every later token

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.token_ids) > 1 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as (ids, 0/1 mask) on `device`, left-padded so every row's last prompt token sits
    in the last column."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


class TextRow:
    """Detokenisation and stop-string state of one sequence.

    Each token decodes only a short window (incremental detokenisation, as vLLM and TGI do):
    the text of ids[prefix:] minus the text of ids[prefix:read] is the new text, where
    ids[prefix:read] are the last tokens already turned into text, kept as context so that
    merges and leading spaces come out as a full decode would give them. Text ending in a
    partial UTF-8 character stays provisional (`tail`) until the character completes, or
    until the window reaches `MAX_PENDING` tokens. A stop string is searched for only where
    it could end in the new text. Every token costs the same however long the output.
    """

    MAX_PENDING = 8  # tokens decoded again while their text ends in a partial character
    MAX_CONTEXT = 16  # tokens kept as context while the last ones make no text

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.done, self.tail = "", ""  # final text; provisional text of ids[read:]
        self.prefix = self.read = 0
        self.prefix_text = ""  # text of ids[prefix:read]
        self.emitted = 0
        self.finish: str | None = None  # why the sequence ended, once it has
        self.hold = max((len(s) for s in stop), default=1) - 1

    @property
    def text(self) -> str:
        return self.done + self.tail

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int, eos_ids: set[int], ignore_eos: bool) -> None:
        if token in eos_ids and not ignore_eos:
            self.finish = "stop"
            return
        before = len(self.done)
        self.ids.append(token)
        window = self._decode(self.ids[self.prefix :])
        new = (
            window[len(self.prefix_text) :]
            if window.startswith(self.prefix_text)
            else window[min(len(self.prefix_text), len(window)) :]
        )
        if new.endswith("\ufffd") and len(self.ids) - self.read < self.MAX_PENDING:
            self.tail = new
        else:
            self.done += new
            self.tail = ""
            # The context moves up to the tokens just read, unless they make no text (special
            # tokens): a window must begin with text for a leading space to decode as in the full text.
            start, self.read = self.read, len(self.ids)
            context = self._decode(self.ids[start : self.read])
            if context or self.read - self.prefix > self.MAX_CONTEXT:
                self.prefix, self.prefix_text = start, context
            else:
                self.prefix_text = self._decode(self.ids[self.prefix : self.read])
        if self.stop:
            start = max(0, before - self.hold)
            region = self.done[start:] + self.tail
            cuts = [c for c in (region.find(s) for s in self.stop) if c >= 0]
            if cuts:
                self.done, self.tail, self.finish = self.text[: start + min(cuts)], "", "stop"

    def new_text(self) -> str:
        """Text safe to show now: not a partial UTF-8 character, not a possible stop-string start."""
        text = self.done + self.tail if self.tail or self.finish is not None else self.done
        end = len(text)
        if self.finish is None:
            end -= self.hold
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        piece = text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece
