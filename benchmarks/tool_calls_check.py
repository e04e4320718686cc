"""The `openai` SDK, unchanged, against a served tool-use adapter: for three questions, the call
(whole and streamed, checked against the tools' schemas), then a follow-up with the tool's result.

    qlora serve --adapter runs/demo-tools/final_adapter --port 8765 &
    python benchmarks/tool_calls_check.py http://127.0.0.1:8765
"""

import json
import sys

from openai import OpenAI

from qlora_platform.data.tools import call_error, tools_by_name
from qlora_platform.data.tools_sample import TOOLS

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
declared = tools_by_name(TOOLS)
for q in ["What is 17 times 23?", "How many miles is 42 km?", "Look up the docs for json.dumps."]:
    msgs = [{"role": "user", "content": q}]
    r = client.chat.completions.create(model="default", messages=msgs, tools=TOOLS, temperature=0, max_tokens=96)
    ch = r.choices[0]
    print("Q:", q, "| finish:", ch.finish_reason)
    calls = ch.message.tool_calls or []
    for c in calls:
        args = json.loads(c.function.arguments)
        print("  call:", c.function.name, args, "| fits schema:", call_error(c.function.name, args, declared) is None)
    # streamed
    stream = client.chat.completions.create(
        model="default", messages=msgs, tools=TOOLS, temperature=0, max_tokens=96, stream=True
    )
    acc, finish, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            e = acc.setdefault(tc.index, {"name": "", "arguments": ""})
            e["name"] += (tc.function.name or "") if tc.function else ""
            e["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    print("  streamed:", finish, [(e["name"], json.loads(e["arguments"])) for e in acc.values()], repr(content))
    if calls:
        c = calls[0]
        result = {
            "calculate": "391",
            "convert_units": "26.1 mi",
            "lookup_docs": "Serialize obj to a JSON formatted str.",
        }[c.function.name]
        follow = msgs + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": c.id, "content": result},
        ]
        r2 = client.chat.completions.create(model="default", messages=follow, tools=TOOLS, temperature=0, max_tokens=64)
        print("  follow-up:", r2.choices[0].finish_reason, repr(r2.choices[0].message.content))
