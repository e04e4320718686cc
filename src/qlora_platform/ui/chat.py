"""The Chat tab's model: one adapter loaded in the UI process, its base answered with the adapter off.

The model loads on the first message for an adapter and stays until another adapter is
picked or a job starts (a training or export run needs the memory). Answers stream
through the same engine as `qlora chat`; the base model's answer is the same weights with
the LoRA layers switched off (`Loaded.base_only`), so side by side costs no second copy.
One answer is generated at a time; a job starting stops it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

from ..infer.load import Loaded, load_for_inference
from ..infer.sampling import SamplingParams


class ChatModels:
    def __init__(self, device: str = "auto"):
        self.device = device
        self._loaded: Loaded | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    def release(self) -> None:
        """Drop the loaded model (before a job that needs the memory); an answer being written stops first."""
        self._cancel.set()
        with self._lock:
            self._drop()
            self._cancel.clear()

    def _drop(self) -> None:
        if self._loaded is None:
            return
        device = self._loaded.device
        self._loaded = None
        gc.collect()
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _model(self, adapter: str) -> Loaded:
        if self._loaded is None or self._loaded.adapter != adapter:
            self._drop()
            self._loaded = load_for_inference(adapter=adapter, device=self.device, log=lambda _msg: None)
        return self._loaded

    def stream(self, adapter: str, messages: list[dict], params: SamplingParams, base: bool = False) -> Iterator[str]:
        """The answer to `messages` as it grows (tuned, or the base model with `base`)."""
        with self._lock:
            loaded = self._model(adapter)
            prompt = loaded.engine.encode_chat(messages)
            params.validate(loaded.engine.max_context, len(prompt))
            text = ""
            with loaded.base_only() if base else contextlib.nullcontext():
                for piece in loaded.engine.stream(prompt, params, cancelled=self._cancel.is_set):
                    text += piece
                    yield text
