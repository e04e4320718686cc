"""The same engine interface over a GGUF file, run on the CPU by llama.cpp (`qlora chat/generate --gguf`).

    engine = GgufEngine("runs/demo/gguf/model-Q4_K_M.gguf", ensure_llama_cpp, stream_completion)
    for piece in engine.stream(engine.encode_chat(messages), SamplingParams(max_new_tokens=64)):
        print(piece, end="")
    engine.last.decode_tokens_per_s            # llama.cpp's own timer

The tokenizer and chat template are read from the GGUF itself (transformers'
GGUF loader), the prompt is rendered with the template's sandboxed renderer and
handed to `llama-completion` as raw text in a file, so the prompt format equals the
HF path's and its length is not bounded by the command line. Each call starts
llama-completion anew (the model is mmapped, so a reload is quick). Tokens are
counted as the HF path counts them (the EOS is not one), and the finish reason is
"length" when the limit, not EOS or a stop string, ended the answer. The llama.cpp
tools and the completion call come from the caller (export.llama_cpp and
export.gguf build and run them), so inference does not depend on export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from .generation import Generation
from .sampling import SamplingParams


class GgufEngine:
    model = None

    def __init__(self, gguf: str, ensure_tools: Callable, complete: Callable[..., Iterator[str]]):
        """`ensure_tools()` returns the llama.cpp binaries (called once the file is known to be a GGUF);
        `complete(tools, path, prompt, stats, ...)` streams a raw completion."""
        from transformers import AutoTokenizer

        path = Path(gguf)
        if not path.is_file() or path.suffix != ".gguf":
            raise UserError(f"'{gguf}' is not a .gguf file; 'qlora export gguf' writes them")
        self.path = path
        self.tools, self.complete = ensure_tools(), complete
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot read the tokenizer of '{path}': {str(err).splitlines()[0]}") from None
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        ctx = next((f for name, f in reader.fields.items() if name.endswith(".context_length")), None)
        self.max_context = int(ctx.parts[ctx.data[0]][0]) if ctx else 2048
        self.last: Generation | None = None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        params.validate(self.max_context, len(prompt))
        text = self.tokenizer.decode(prompt, skip_special_tokens=False)
        extra = [
            "--top-p",
            str(params.top_p),
            "--top-k",
            str(params.top_k),
            "--repeat-penalty",
            str(params.repetition_penalty),
            "-c",
            str(min(self.max_context, len(prompt) + params.max_new_tokens + 8)),
        ]
        if params.seed is not None:
            extra += ["-s", str(params.seed)]
        if params.ignore_eos:
            extra.append("--ignore-eos")
        stats: dict = {}
        out, emitted, finish = "", 0, None
        hold = max((len(s) for s in params.stop), default=1) - 1
        # llama-completion has no stop strings outside interactive mode: they are applied here.
        for piece in self.complete(
            self.tools,
            self.path,
            text,
            stats,
            n_predict=params.max_new_tokens,
            temperature=params.temperature,
            extra=extra,
        ):
            out += piece
            cut = min((out.index(s) for s in params.stop if s in out), default=None)
            if cut is not None:
                out, finish = out[:cut], "stop"
                break
            if len(out) - hold > emitted:
                yield out[emitted : len(out) - hold]
                emitted = len(out) - hold
        if len(out) > emitted:
            yield out[emitted:]
        n = stats.get("tokens")
        if n is None or finish:  # stopped here, before llama.cpp printed its counts
            n = len(self.tokenizer(out, add_special_tokens=False, verbose=False)["input_ids"])
        if finish is None:
            finish = "stop" if stats.get("eos") else "length"
        rate, prompt_rate = stats.get("tokens_per_s") or 0.0, stats.get("prompt_tokens_per_s") or 0.0
        self.last = Generation(
            text=out,
            token_ids=list(range(n)),
            prompt_tokens=len(prompt),
            finish_reason=finish,
            prefill_s=len(prompt) / prompt_rate if prompt_rate else 0.0,
            decode_s=(n - 1) / rate if rate and n > 1 else 0.0,
        )
