"""The keyword benchmark: a prompt file users bring for their domain, and how answers are scored.

    bench = load_prompt_file(DEFAULT_PROMPTS)   # UserError on a bad file
    score = score_answer(answer_text, bench.prompts[0])          # hits, missed, passed

File schema (JSON): `{"name", "description"?, "system"?, "generation"?: {"max_new_tokens",
"repetition_penalty", "temperature"}, "prompts": [{"id"?, "prompt", "keywords": [...],
"min_hits"?}]}`, or just the list of prompts. A keyword is a string or a list of
alternative spellings (any one counts). Matching ignores case; a keyword that starts or
ends with a letter or digit must match whole words there ("str" does not match "string").
An answer passes when it hits at least `min_hits` keywords (default: half, rounded up).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError

# The sample domain's prompt file ships inside the package, so `qlora eval` works from any folder.
DEFAULT_PROMPTS = str(Path(__file__).with_name("benchmark_prompts.json"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationSettings(_Strict):
    max_new_tokens: int = Field(128, ge=1, le=4096)
    repetition_penalty: float = Field(1.2, gt=0, le=10)
    temperature: float = Field(0.0, ge=0, le=2)


class BenchmarkPrompt(_Strict):
    id: str | None = None
    prompt: str = Field(min_length=1)
    keywords: list[str | list[str]] = Field(min_length=1)
    min_hits: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is blank")
        return value

    @field_validator("keywords")
    @classmethod
    def _keywords_not_blank(cls, value):
        for kw in value:
            spellings = kw if isinstance(kw, list) else [kw]
            if not spellings or any(not s.strip() for s in spellings):
                raise ValueError("every keyword must be a non-empty string or a non-empty list of them")
        return value

    @model_validator(mode="after")
    def _reachable(self):
        if self.min_hits is not None and self.min_hits > len(self.keywords):
            raise ValueError(f"min_hits is {self.min_hits} but there are only {len(self.keywords)} keywords")
        return self

    @property
    def needed(self) -> int:
        return self.min_hits or math.ceil(len(self.keywords) / 2)


class PromptFile(_Strict):
    name: str = "benchmark"
    description: str = ""
    system: str | None = None
    generation: GenerationSettings = GenerationSettings()
    prompts: list[BenchmarkPrompt] = Field(min_length=1)

    @model_validator(mode="after")
    def _ids(self):
        seen = set()
        for i, p in enumerate(self.prompts):
            p.id = p.id or f"prompt-{i + 1}"
            if p.id in seen:
                raise ValueError(f"duplicate prompt id '{p.id}'")
            seen.add(p.id)
        return self


def _explain(err: ValidationError, path: str) -> str:
    first = err.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = (
            "unknown field (allowed: id, prompt, keywords, min_hits; top level: name, description, "
            "system, generation, prompts)"
        )
    where = f" {loc}:" if loc else ""
    return f"benchmark prompt file '{path}':{where} {msg}"


def load_prompt_file(path: str | Path) -> PromptFile:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"benchmark prompt file '{path}' does not exist; pass --prompts FILE (or leave "
            f"--prompts out for the sample domain's prompts)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(
            f"benchmark prompt file '{path}' is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"benchmark prompt file '{path}' is not UTF-8 text") from None
    if isinstance(raw, list):
        raw = {"prompts": raw}
    if not isinstance(raw, dict):
        raise UserError(
            f"benchmark prompt file '{path}' must hold an object with \"prompts\" or a list of "
            f"prompts, not {type(raw).__name__}"
        )
    try:
        return PromptFile.model_validate(raw)
    except ValidationError as err:
        raise UserError(_explain(err, str(path))) from None


def _pattern(spelling: str) -> re.Pattern:
    body = re.escape(spelling.strip())
    start = r"(?<![A-Za-z0-9_])" if spelling.strip()[0].isalnum() else ""
    end = r"(?![A-Za-z0-9_])" if spelling.strip()[-1].isalnum() else ""
    return re.compile(start + body + end, re.IGNORECASE)


def matched_spelling(text: str, keyword: str | list[str]) -> str | None:
    """The first spelling of the keyword found in the text, or None."""
    spellings = keyword if isinstance(keyword, list) else [keyword]
    return next((s for s in spellings if _pattern(s).search(text)), None)


def keyword_hit(text: str, keyword: str | list[str]) -> bool:
    return matched_spelling(text, keyword) is not None


def label(keyword: str | list[str]) -> str:
    return " | ".join(keyword) if isinstance(keyword, list) else keyword


def score_answer(text: str, prompt: BenchmarkPrompt) -> dict:
    found = [(k, matched_spelling(text, k)) for k in prompt.keywords]
    hits = [spelling for _, spelling in found if spelling is not None]
    missed = [label(k) for k, spelling in found if spelling is None]
    return {
        "hits": hits,
        "missed": missed,
        "hit_count": len(hits),
        "needed": prompt.needed,
        "passed": len(hits) >= prompt.needed,
    }
