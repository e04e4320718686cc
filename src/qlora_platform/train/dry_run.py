"""`qlora train --dry-run`: validate the config and print the memory estimate, loading no weights.

Reads only the model's config.json (from the hub, a folder or the bundled
model), so it answers in seconds whether a run will fit before any download.
"""

from __future__ import annotations

from ..config import Config, ResolvedConfig, dump_config, resolve
from ..errors import UserError
from ..models.loader import hub_error, pick_device, resolve_model_source
from ..models.memory import GIB, estimate_training_memory, format_estimate


def dry_run(cfg: Config, processes: int = 1) -> str:
    """The validated config, what its "auto" keys mean here, and the memory estimate."""
    return "\n".join(["config OK:", dump_config(cfg), preflight(cfg, processes)])


def preflight(cfg: Config, processes: int = 1) -> str:
    """What the run's "auto" keys mean on this machine and its memory estimate, with a fits / does NOT fit verdict."""
    import torch
    from transformers import AutoConfig

    source = resolve_model_source(cfg.model.name)
    try:
        mc = AutoConfig.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001
        raise hub_error(cfg.model.name, err) from None
    if not hasattr(mc, "intermediate_size"):
        raise UserError(
            f"'{cfg.model.name}' ({mc.model_type}) is not a decoder the estimate knows (no intermediate_size)"
        )
    resolved = resolve(cfg, pick_device(cfg.training.device))
    device = resolved.device
    est = estimate_training_memory(mc, resolved, processes)
    where = "GPU memory" if device == "cuda" else "resident memory of the process (training on the CPU)"
    lines = [describe_resolved(resolved), f"{format_estimate(est)}\n  ({where})"]
    if processes > 1:
        lines.append(f"(per device, {processes} processes, training.strategy {cfg.training.strategy})")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        verdict = "fits" if est["total"] <= 0.95 * free else "does NOT fit"
        lines.append(f"{torch.cuda.get_device_name()}: {free / GIB:.1f} of {total / GIB:.1f} GiB free: {verdict}")
    else:
        on_gpu = estimate_training_memory(mc, resolve(cfg, "cuda"), processes)["total"]
        lines.append(
            f"no CUDA GPU here; on a GPU this run needs about {on_gpu / GIB:.2f} GiB: on an 8 GB card "
            f"(about 7.6 GiB usable) it " + ("fits" if on_gpu <= 7.6 * GIB else "does NOT fit")
        )
    return "\n".join(lines)


def describe_resolved(resolved: ResolvedConfig) -> str:
    """One line with what the "auto" / null keys mean on this device."""
    on = {True: "on", False: "off"}
    return (
        f"on {resolved.device}: optimizer {resolved.optimizer}, fast_kernels {on[resolved.fast_kernels]}, "
        f"fp8 {on[resolved.fp8]}, fp32_norms {on[resolved.fp32_norms]}, "
        f"offload_checkpoints {on[resolved.offload_checkpoints]}"
    )
