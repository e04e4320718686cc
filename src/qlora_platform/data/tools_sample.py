"""The offline tool-use set: three tools over the sample domain, and turns that need none.

Tools: `lookup_docs` (the documentation of a Python standard library object, from the
sample set of data/sample.py), `calculate` (one arithmetic operation on two numbers) and
`convert_units` (length, mass, temperature). Each call record is the user's
question, the assistant's call, the tool's result (computed here, so it is right) and
the assistant's answer from it; a share of the records stop at the call. Chit-chat, word
games and writing requests are answered without a call. A record declares the tool it
needs and some of the others, in a shuffled order, so the model reads the list it is given.

    records = build_sample_tool_records(seed=42)   # [{"tools", "messages", "category"}, ...]

Numbers, units, phrasings and objects are drawn from a generator seeded with `seed`, so the
set is the same on every run of one Python version. `qlora prepare --sample-tools` writes
it as train.jsonl + eval.jsonl with the usual seeded holdout.
"""

from __future__ import annotations

import random
import re

from .sample import build_sample_records, split_signature

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_docs",
            "description": "The documentation of a Python standard library object.",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "dotted name, e.g. json.dumps"}},
                "required": ["name"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "a <operation> b",
            "parameters": {
                "type": "object",
                "properties": {
                    "operation": {"type": "string", "enum": ["add", "subtract", "multiply", "divide"]},
                    "a": {"type": "number"},
                    "b": {"type": "number"},
                },
                "required": ["operation", "a", "b"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_units",
            "description": "Convert a value between units.",
            "parameters": {
                "type": "object",
                "properties": {
                    "value": {"type": "number"},
                    "from_unit": {"type": "string", "enum": ["km", "mi", "kg", "lb", "C", "F"]},
                    "to_unit": {"type": "string", "enum": ["km", "mi", "kg", "lb", "C", "F"]},
                },
                "required": ["value", "from_unit", "to_unit"],
            },
        },
    },
]

# unit -> (the words a question uses for it, its symbol in answers)
UNIT_WORDS = {
    "km": ["kilometers", "km"],
    "mi": ["miles"],
    "kg": ["kilograms", "kg"],
    "lb": ["pounds", "lb"],
    "C": ["degrees Celsius", "°C", "Celsius"],
    "F": ["degrees Fahrenheit", "°F", "Fahrenheit"],
}
# (from, to, factor) pairs; temperature is affine and handled apart.
LINEAR = {("km", "mi"): 0.621371, ("kg", "lb"): 2.20462}

CALC_PHRASES = {
    "add": ["What is {a} plus {b}?", "Add {a} and {b}.", "What's the sum of {a} and {b}?", "Compute {a} + {b}."],
    "subtract": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.", "What's {a} take away {b}?"],
    "multiply": [
        "What is {a} times {b}?",
        "Multiply {a} by {b}.",
        "Compute {a} * {b}.",
        "What's the product of {a} and {b}?",
    ],
    "divide": ["What is {a} divided by {b}?", "Divide {a} by {b}.", "Compute {a} / {b}.", "How much is {a} over {b}?"],
}
SYMBOL = {"add": "+", "subtract": "-", "multiply": "×", "divide": "÷"}
CONVERT_PHRASES = [
    "How many {to} is {v} {frm}?",
    "Convert {v} {frm} to {to}.",
    "What is {v} {frm} in {to}?",
    "{v} {frm} is how many {to}?",
    "Please convert {v} {frm} into {to}.",
]
DOCS_PHRASES = [
    "Look up the docs for {name}.",
    "What does the documentation say about {name}?",
    "Find the documentation of {name}.",
    "Can you check the docs of {name} for me?",
    "Show me what the docs say about {name}.",
]
NO_TOOL = [
    (
        "Hi! Who are you?",
        "Hello! I am an assistant for the Python standard library. I can look up documentation, "
        "do arithmetic and convert units.",
    ),
    ("Thanks, that was helpful.", "You're welcome! Ask me anything else about Python."),
    ("Good morning!", "Good morning! How can I help you today?"),
    (
        "What can you do?",
        "I can look up the documentation of Python standard library objects, calculate, and convert units.",
    ),
    ("Write a haiku about {topic}.", "{haiku}"),
    ("Tell me a fun fact about {topic}.", "Here is one: {fact}"),
    ("Say hello in {language}.", "{hello}"),
    (
        "Should I name my variable {var} or {var2}?",
        "Both work; pick the one that says what the value means, and use "
        "snake_case as PEP 8 recommends: {var} reads well.",
    ),
]
TOPICS = {
    "autumn": (
        "Leaves drift to the ground,\ncrisp air hums a quiet tune,\nthe old oak lets go.",
        "trees in autumn stop making chlorophyll, so the yellow and orange pigments show.",
    ),
    "the sea": (
        "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.",
        "the oceans hold about 97 percent of the water on Earth.",
    ),
    "coffee": (
        "Dark cup in the dawn,\nsteam curls over the keyboard,\nthe first commit lands.",
        "coffee beans are the seeds of a cherry-like fruit.",
    ),
    "the moon": (
        "Pale coin in the night,\nit borrows the sun's bright face,\nand gives it back soft.",
        "the Moon moves about 3.8 centimeters away from Earth every year.",
    ),
    "snakes": (
        "Scales slide over stone,\nthe python warms in the sun,\nno legs, and no rush.",
        "snakes smell with their tongues.",
    ),
    "rain": (
        "Rain taps the window,\ngutters sing a running song,\nthe garden drinks deep.",
        "a typical raindrop falls at about 9 meters per second.",
    ),
}
HELLOS = {
    "French": "Bonjour !",
    "Spanish": "¡Hola!",
    "German": "Hallo!",
    "Italian": "Ciao!",
    "Japanese": "こんにちは!",
    "Portuguese": "Olá!",
}
_WORDS = (
    "python module garden window river planet library coffee rocket violin mountain lantern pencil harbor "
    "thunder kitchen journey island compass meadow blanket crystal dolphin feather glacier hammer jungle "
    "kettle lemon marble needle orchard pepper quartz ribbon saddle tunnel umbrella velvet walnut yogurt "
    "zipper anchor bridge candle dragon engine forest guitar helmet igloo jacket kayak ladder magnet"
)
WORDS = _WORDS.split()
WORD_TASKS = [
    ("Spell '{word}' backwards.", lambda w: f"'{w}' backwards is '{w[::-1]}'."),
    ("Write '{word}' in capital letters.", lambda w: f"{w.upper()}"),
    ("How many letters are in the word '{word}'?", lambda w: f"'{w}' has {len(w)} letters."),
    ("What is the first letter of '{word}'?", lambda w: f"The first letter of '{w}' is '{w[0]}'."),
    ("Use the word '{word}' in a sentence.", lambda w: f"Here is one: the {w} was exactly where I had left it."),
]
VARIABLES = [
    ("total_count", "tc"),
    ("user_name", "un"),
    ("max_retries", "mr"),
    ("file_path", "fp"),
    ("start_time", "st"),
]
# Documentation results longer than this (in words) are left out: they cost tokens and teach no call.
MAX_DOC_WORDS = 25
# The share of call records that stop at the call (no tool result, no final answer).
CALL_ONLY = 0.6
# The chance that a record declares each tool it does not need.
OTHER_TOOL = 0.4
# Record kinds and their shares of the set.
SHARES = {"lookup_docs": 0.25, "calculate": 0.225, "convert_units": 0.225, "no_tool": 0.3}


def _num(rng: random.Random) -> int | float:
    kind = rng.random()
    if kind < 0.75:
        return rng.randint(2, 999)
    if kind < 0.9:
        return rng.randint(1000, 9999)
    return round(rng.uniform(0.5, 100), 1)


def _fmt(x: float) -> str:
    """A result as a person writes it: no trailing zeros, no exponent, at most 4 decimals."""
    return f"{round(x, 4):f}".rstrip("0").rstrip(".")


def _convert(value: float, frm: str, to: str) -> float:
    if (frm, to) == ("C", "F"):
        return value * 9 / 5 + 32
    if (frm, to) == ("F", "C"):
        return (value - 32) * 5 / 9
    if (frm, to) in LINEAR:
        return value * LINEAR[(frm, to)]
    return value / LINEAR[(to, frm)]


def _declared(rng: random.Random, needed: str | None) -> list[dict]:
    """The tools a record declares: the one it needs, and each other with probability OTHER_TOOL, in a
    shuffled order; a record that needs none declares at least one."""
    tools = [t for t in TOOLS if t["function"]["name"] == needed or rng.random() < OTHER_TOOL]
    if not tools:
        tools = [rng.choice(TOOLS)]
    rng.shuffle(tools)
    return tools


def _record(
    rng: random.Random, question: str, call: dict | None, result: str | None, answer: str, category: str
) -> dict:
    messages: list[dict] = [{"role": "user", "content": question}]
    if call is None:
        messages.append({"role": "assistant", "content": answer})
    else:
        messages.append(
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": call}]}
        )
        if rng.random() >= CALL_ONLY:
            messages += [
                {"role": "tool", "tool_call_id": "call_0", "name": call["name"], "content": result},
                {"role": "assistant", "content": answer},
            ]
    return {"tools": _declared(rng, call and call["name"]), "messages": messages, "category": category}


def _calc(rng: random.Random) -> dict:
    op = rng.choice(list(CALC_PHRASES))
    a, b = _num(rng), _num(rng)
    if op == "divide" and b == 0:
        b = 7
    value = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b}[op]
    result = _fmt(round(value, 4))
    return _record(
        rng,
        rng.choice(CALC_PHRASES[op]).format(a=a, b=b),
        {"name": "calculate", "arguments": {"operation": op, "a": a, "b": b}},
        result,
        f"{a} {SYMBOL[op]} {b} = {result}.",
        "calculate",
    )


def _conversion(rng: random.Random) -> dict:
    pairs = [*LINEAR, *((t, f) for f, t in LINEAR), ("C", "F"), ("F", "C")]
    frm, to = rng.choice(pairs)
    value = rng.randint(1, 300) if rng.random() < 0.85 else round(rng.uniform(0.5, 100), 1)
    result = _fmt(round(_convert(value, frm, to), 2))
    question = rng.choice(CONVERT_PHRASES).format(v=value, frm=rng.choice(UNIT_WORDS[frm]), to=UNIT_WORDS[to][0])
    return _record(
        rng,
        question,
        {"name": "convert_units", "arguments": {"value": value, "from_unit": frm, "to_unit": to}},
        f"{result} {to}",
        f"{value} {frm} is about {result} {to}.",
        "convert_units",
    )


def _doc_entries() -> list[tuple[str, str]]:
    """(dotted name, first sentence of its documentation) for the sample set's functions and classes."""
    out = []
    for rec in build_sample_records():
        if rec["category"] not in ("function", "class"):
            continue
        answer = rec["messages"][2]["content"]
        body, signature = split_signature(answer)
        name = re.match(r"([\w.]+)", signature)
        if name:
            first = re.split(r"(?<=[.!?])\s+", body.strip().replace("\n", " "), maxsplit=1)[0]
            if len(first.split()) <= MAX_DOC_WORDS:
                out.append((name.group(1), first))
    return out


def _docs(rng: random.Random, entries: list[tuple[str, str]]) -> dict:
    name, first = rng.choice(entries)
    return _record(
        rng,
        rng.choice(DOCS_PHRASES).format(name=name),
        {"name": "lookup_docs", "arguments": {"name": name}},
        first,
        f"The documentation of `{name}` says: {first}",
        "lookup_docs",
    )


def _no_tool(rng: random.Random) -> dict:
    if rng.random() < 0.6:
        word = rng.choice(WORDS)
        question, answer_of = rng.choice(WORD_TASKS)
        return _record(rng, question.format(word=word), None, None, answer_of(word), "no_tool")
    question, answer = rng.choice(NO_TOOL)
    topic = rng.choice(list(TOPICS))
    language = rng.choice(list(HELLOS))
    var, var2 = rng.choice(VARIABLES)
    fill = {
        "topic": topic,
        "haiku": TOPICS[topic][0],
        "fact": TOPICS[topic][1],
        "language": language,
        "hello": HELLOS[language],
        "var": var,
        "var2": var2,
    }
    return _record(rng, question.format(**fill), None, None, answer.format(**fill), "no_tool")


def build_sample_tool_records(seed: int = 42, count: int = 600) -> list[dict]:
    """`count` records, drawn by the shares of SHARES: docs lookups, calculations, conversions, no-tool turns."""
    rng = random.Random(seed)
    entries = _doc_entries()
    makers = {
        "lookup_docs": lambda: _docs(rng, entries),
        "calculate": lambda: _calc(rng),
        "convert_units": lambda: _conversion(rng),
        "no_tool": lambda: _no_tool(rng),
    }
    kinds = rng.choices(list(SHARES), weights=list(SHARES.values()), k=count)
    return [makers[kind]() for kind in kinds]
