"""Retrieved passages in a chat prompt, within the context, and the sources shown with an answer.

    ids, used = fit_passages(lambda m: engine.encode_chat(m), messages, passages,
                             max_new_tokens=256, context=engine.max_context, budget=768,
                             count=lambda s: len(engine.encode_text(s)))
    print(format_sources(used))

The passages go into the last user message, numbered, before the question, with an
instruction to cite them by number; the conversation itself keeps the plain question, so
earlier turns do not carry old passages. Passages are taken in rank order, each one that
still fits `budget` (a long one is skipped, a shorter one after it may go in), then the
worst are dropped until prompt + answer fit the context; with none left the prompt is the
plain conversation.
"""

from __future__ import annotations

from collections.abc import Callable

from .retrieve import Passage

INSTRUCTION = (
    "Answer the question using the numbered passages from the documentation below. Cite the passages "
    "you use by their number, as [1]. If the passages do not answer the question, say so."
)


def passage_block(n: int, passage: Passage) -> str:
    return f"[{n}] {passage.label()}\n{passage.text}"


def grounded(messages: list[dict], passages: list[Passage]) -> list[dict]:
    """A copy of `messages` whose last user message carries the passages before its question."""
    if not passages:
        return list(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    blocks = "\n\n".join(passage_block(n, p) for n, p in enumerate(passages, 1))
    question = messages[last]["content"]
    out = list(messages)
    out[last] = {**messages[last], "content": f"{INSTRUCTION}\n\n{blocks}\n\nQuestion: {question}"}
    return out


def question_of(messages: list[dict]) -> str:
    """The text retrieval searches for: the last user message."""
    for m in reversed(messages):
        if m["role"] == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def fit_passages(
    encode: Callable[[list[dict]], list[int]],
    messages: list[dict],
    passages: list[Passage],
    max_new_tokens: int,
    context: int,
    budget: int,
    count: Callable[[str], int],
) -> tuple[list[int], list[Passage]]:
    """(prompt ids, passages used): as many of the best passages as fit `budget` tokens and the context."""
    used, spent = [], 0
    for p in passages:
        cost = count(passage_block(len(used) + 1, p))
        if spent + cost > budget:
            continue  # a shorter one further down may still fit; the order stays the rank's
        used.append(p)
        spent += cost
    while used:
        ids = encode(grounded(messages, used))
        if len(ids) + max_new_tokens <= context:
            return ids, used
        used.pop()
    return encode(messages), []


def format_sources(passages: list[Passage], found: bool = True) -> str:
    """'sources:' and a line per passage an answer was given (`[1] file § heading (0.033)`);
    `found`: whether retrieval found any (none found and none that fit are told apart)."""
    if not passages:
        return "sources: none (no passage fit the context)" if found else "sources: none (nothing in the index matched)"
    return "sources:\n" + "\n".join(f"  [{n}] {p.label()} ({p.score:.3f})" for n, p in enumerate(passages, 1))


class Grounding:
    """A retriever with the settings a prompt uses (k, mode, passage budget): what `chat --rag`,
    `serve --rag` and `eval --rag` hold."""

    def __init__(self, retriever, settings):
        self.retriever, self.settings = retriever, settings

    def passages(self, questions: list[str]) -> list[list[Passage]]:
        return self.retriever.search(questions, self.settings.k, self.settings.mode)

    def prompt(
        self,
        engine,
        messages: list[dict],
        max_new_tokens: int,
        context: int | None = None,
        passages: list[Passage] | None = None,
        **encode_kwargs,
    ) -> tuple[list[int], list[Passage]]:
        """(prompt ids, passages used) for the conversation, its last user message grounded in the
        passages retrieved for it (or the ones given)."""
        if passages is None:
            passages = self.passages([question_of(messages)])[0]
        return fit_passages(
            lambda m: engine.encode_chat(m, **encode_kwargs),
            messages,
            passages,
            max_new_tokens,
            context or engine.max_context,
            self.settings.prompt_tokens,
            lambda s: len(engine.encode_text(s)),
        )
