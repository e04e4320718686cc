"""`export_report.json` and `export_report.md`: what each exported file costs in quality, size and speed."""

from __future__ import annotations

import json
from pathlib import Path


def render(report: dict) -> str:
    lines = [
        f"# Export report: {report.get('model')}",
        "",
        f"Adapter `{report.get('adapter')}`, architecture {report.get('architecture')}, llama.cpp from "
        f"`{report.get('llama_cpp')}`; {report.get('seconds')} s in all.",
        "",
    ]
    merge = report.get("merge")
    if merge:
        rounded = merge["max_logit_diff_after_" + merge["dtype"]]
        verdict = ""
        if "rounding_ok" in merge:
            verdict = (
                f"; {'ok' if merge['rounding_ok'] else 'FAILED'}: tolerance {merge['tolerance']:.2g} in fp32 "
                f"(the merge itself) and {merge['rounding_tolerance']:.3g} after rounding to {merge['dtype']} "
                f"(the rounding of every weight, added up over the layers)"
            )
        lines += [
            f"Merge: largest logit difference merged vs base+adapter {merge['max_logit_diff_fp32']:.2e} in fp32, "
            f"{rounded:.3g} after rounding to {merge['dtype']} (logits up to {merge['logit_scale']:.1f})"
            f"{verdict}.",
            "",
        ]
    hf = report.get("hf")
    if hf:
        lines += [
            f"Perplexity: llama-perplexity's method (chunks of {hf['n_ctx']} tokens, second half of each "
            f"scored; {hf['chunks']} chunks, {hf['tokens_scored']} tokens) on `holdout.txt`, the holdout "
            f"answers. Speed: batch 1 on this machine's CPU; GGUF by llama-bench (32-token prompt, 64 new "
            f"tokens, 3 runs), HF by the platform's engine ({hf['dtype']}).",
            "",
            "| model | size MiB | perplexity | vs HF | prefill tok/s | decode tok/s |",
            "|---|---|---|---|---|---|",
            f"| merged HF model | - | {hf['perplexity']:.4f} | - | {hf['prefill_tokens_per_s']:.1f} | "
            f"{hf['decode_tokens_per_s']:.1f} |",
        ]
    else:
        lines += ["| file | size MiB |", "|---|---|"]
    for f in report["files"]:
        if hf and "perplexity" in f:
            lines.append(
                f"| {f['name']} | {f['size_mib']} | {f['perplexity']:.4f} +/- {f['stderr']:.4f} | "
                f"{f['ppl_vs_hf_pct']:+.2f}% | {f.get('prefill_tokens_per_s', '-')} | "
                f"{f.get('decode_tokens_per_s', '-')} |"
            )
        else:
            lines.append(f"| {f['name']} | {f['size_mib']} |" + (" - | - | - | - |" if hf else ""))
    lines += ["", "## Sample answers (greedy, llama.cpp)", ""]
    for f in report["files"]:
        if f.get("sample"):
            lines += [f"**{f['name']}**:", "", *["    " + ln for ln in f["sample"].splitlines()], ""]
    return "\n".join(lines)


def write_export_report(out: Path, report: dict) -> None:
    (out / "export_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "export_report.md").write_text(render(report))
