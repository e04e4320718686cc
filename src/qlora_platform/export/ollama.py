"""An Ollama `Modelfile` for an exported GGUF, with the chat template in Ollama's Go syntax.

    text = modelfile("model-Q4_K_M.gguf", tokenizer.chat_template, system=None)

The family is recognised from the Jinja chat template's markers (ChatML, Mistral
[INST], Llama 3 headers, Phi-3); for an unknown template no TEMPLATE is written and
Ollama falls back to the template embedded in the GGUF metadata (a comment says so).
"""
from __future__ import annotations

FAMILIES = {
    "chatml": ('<|im_start|>', '''{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
''', ["<|im_start|>", "<|im_end|>"]),
    "llama3": ('<|start_header_id|>', '''{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>''', ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "phi3": ('<|assistant|>', '''{{ if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{ if .Prompt }}<|user|>
{{ .Prompt }}<|end|>
{{ end }}<|assistant|>
{{ .Response }}<|end|>
''', ["<|end|>", "<|user|>", "<|assistant|>"]),
    "mistral": ('[INST]', '''[INST] {{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }} [/INST] {{ .Response }}''', ["[INST]", "[/INST]", "</s>"]),
}


def template_family(chat_template: str | None) -> str | None:
    for name, (marker, _, _) in FAMILIES.items():
        if chat_template and marker in chat_template:
            return name
    return None


def modelfile(gguf_name: str, chat_template: str | None, system: str | None = None,
              temperature: float = 0.7) -> str:
    family = template_family(chat_template)
    lines = [f"# Ollama: ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    if family:
        _, template, stops = FAMILIES[family]
        lines += [f"# chat template: {family} (from the tokenizer's template)", f'TEMPLATE """{template}"""', ""]
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    else:
        lines.append("# unknown chat template family: Ollama uses the template stored in the GGUF metadata")
    lines.append(f"PARAMETER temperature {temperature}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
