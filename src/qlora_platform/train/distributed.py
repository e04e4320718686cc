"""Training on several processes through accelerate: DDP, FSDP or DeepSpeed ZeRO-3.

    qlora train --config FILE --num-processes 2              # relaunches itself with torchrun
    qlora train --config FILE --num-processes 2 --write-accelerate-config acc.yaml
    accelerate launch --config_file acc.yaml -m qlora_platform.cli train --config FILE

`training.strategy` picks the engine: `ddp` (each process holds the 4-bit model, LoRA
gradients are averaged), `fsdp` (parameters sharded; the 4-bit weights are stored in the
compute dtype, `bnb_4bit_quant_storage`, so FSDP can shard them: the FSDP-QLoRA recipe), or
`deepspeed-zero3` (needs the `deepspeed` package). On the CPU the processes talk over gloo,
which is how the tests check that two processes learn what one does with the same global
batch: every process walks the same global batch plan and takes its share of the rows,
and scales its summed loss by the world size so that the engine's gradient average equals
the single-process gradient. The GPU fast path (flat adapter buffer, logits-free loss,
offloaded checkpoints, patched layers) is a single-process path for now and is switched off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import Config
from ..errors import UserError
from .strategy import SingleDevice, Strategy

STRATEGIES = ("ddp", "fsdp", "deepspeed-zero3")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_strategy(cfg: Config, device: str) -> Strategy:
    """The strategy for this process: `Distributed` when torchrun or accelerate launch started
    several (WORLD_SIZE > 1), else `SingleDevice`, which never touches accelerate."""
    return Distributed(cfg, device) if world_size() > 1 else SingleDevice(device)


def launch(argv: list[str], num_processes: int) -> int:
    """Run `qlora train argv` in num_processes processes on this machine (torchrun)."""
    from torch.distributed import run as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = ["--standalone", "--nproc-per-node", str(num_processes), "-m", "qlora_platform.cli", "train", *argv]
    try:
        torchrun.main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # noqa: BLE001 - torchrun's ChildFailedError names the failing rank
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(
            f"error: a training process failed ({lines[0] if lines else type(err).__name__}); its traceback is above",
            file=sys.stderr,
        )
        return 1
    return 0


def accelerate_config(cfg: Config, num_processes: int, device: str) -> str:
    """An accelerate config (YAML) for `accelerate launch` users, matching training.strategy."""
    strategy = cfg.training.strategy
    lines = [
        "compute_environment: LOCAL_MACHINE",
        f"num_processes: {num_processes}",
        "num_machines: 1",
        "machine_rank: 0",
        "main_training_function: main",
        "mixed_precision: 'no'",
        f"use_cpu: {'true' if device == 'cpu' else 'false'}",
    ]
    if strategy == "ddp":
        lines.append(f"distributed_type: {'MULTI_CPU' if device == 'cpu' else 'MULTI_GPU'}")
    elif strategy == "fsdp":
        lines += [
            "distributed_type: FSDP",
            "fsdp_config:",
            "  fsdp_version: 1",
            "  fsdp_sharding_strategy: FULL_SHARD",
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
            "  fsdp_use_orig_params: false",
            "  fsdp_cpu_ram_efficient_loading: true",
            "  fsdp_sync_module_states: true",
            "  fsdp_state_dict_type: FULL_STATE_DICT",
        ]
    else:
        lines += [
            "distributed_type: DEEPSPEED",
            "deepspeed_config:",
            "  zero_stage: 3",
            "  zero3_init_flag: false",
            "  offload_optimizer_device: none",
            "  offload_param_device: none",
        ]
    return "\n".join(lines) + "\n"


class Distributed(Strategy):
    """The engine side of a multi-process run: device, wrapping, reductions, who writes, and the
    per-process checkpoint files."""

    fast_path = False  # the fast path is single-process for now (module docstring)

    def __init__(self, cfg: Config, device: str):
        from accelerate import Accelerator

        self.engine = cfg.training.strategy
        kwargs = {"cpu": device == "cpu"}
        if self.engine == "deepspeed-zero3":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                raise UserError(
                    "training.strategy deepspeed-zero3 needs DeepSpeed: pip install deepspeed "
                    "(or use training.strategy fsdp, which needs nothing more)"
                ) from None
            from accelerate import DeepSpeedPlugin

            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1)
        self.accelerator = Accelerator(**kwargs)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device

    def wrap(self, model, params: list, make_optimizer) -> tuple:
        """(wrapped model, its optimizer, the wrapped model's trainable tensors); `params` (the
        unwrapped model's) are replaced by what the engine made of them. DDP and ZeRO-3 through
        accelerate.prepare; FSDP through torch's FullyShardedDataParallel itself, because
        accelerate's FSDP plugin refuses CPUs (and the CPU is where CI checks it): LoRA layers and
        decoder blocks become their own units (peft's wrap policy) so trainable and frozen weights
        never share a flat buffer."""
        if self.engine == "fsdp":
            import torch
            from peft.utils.other import fsdp_auto_wrap_policy
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import ShardingStrategy

            # Every process loads the same files with the same seed; on GPUs rank 0's copy is
            # broadcast anyway (FSDP can only do that from GPU memory).
            on_gpu = self.device.type == "cuda"
            model = FSDP(
                model,
                auto_wrap_policy=fsdp_auto_wrap_policy(model),
                use_orig_params=False,
                sharding_strategy=ShardingStrategy.FULL_SHARD,
                sync_module_states=on_gpu,
                device_id=self.device if on_gpu else torch.device("cpu"),
            )
            optimizer = make_optimizer(_trainable(model))
        else:
            model, optimizer = self.accelerator.prepare(model, make_optimizer(_trainable(model)))
        return model, optimizer, _trainable(model)

    def loss_backward(self, model, fused, cfg: Config, device: str, log, graphs: bool):
        return _EngineBackward(self.accelerator, model, fused)

    def clip_grad_norm(self, model, params: list, max_norm: float | None):
        max_norm = max_norm or 1e9
        if self.engine == "fsdp":  # the norm over every shard, not this process's part
            return model.clip_grad_norm_(max_norm)
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def mean(self, value: float) -> float:
        import torch

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean")[0])

    def total(self, value: int) -> int:
        return round(self.mean(value) * self.world)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def my_rows(self, rows: list) -> list:
        return rows[self.rank :: self.world]

    def save_adapter(self, model, path) -> None:
        """The LoRA adapter, gathered from every process (FSDP shards it), written by the first."""
        state = self._full_state_dict(model)
        if self.is_main:
            peft_model = self._unwrap(model)
            if self.engine == "fsdp":
                _save_fsdp_adapter(peft_model, state, Path(path))
            else:
                peft_model.save_pretrained(path, state_dict=state, safe_serialization=True)
        self.barrier()

    def save_checkpoint(
        self, out: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, extra=None
    ) -> Path:
        """checkpoint-N as in checkpoint.py (adapter, scheduler, trainer_state.json last, atomic
        rename), with one optimizer and RNG file per process: FSDP's optimizer state is sharded,
        so each process keeps its own; resuming needs the same number of processes."""
        import shutil

        import torch

        from .checkpoint import _rng_state, publish

        final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        self.save_adapter(model, tmp)
        torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{self.rank}.pt")
        torch.save(_rng_state(), tmp / f"rng_state-rank{self.rank}.pt")
        self.barrier()
        if self.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if extra is not None:
                extra(tmp)
            state = {**state, "global_step": step, "world_size": self.world, "strategy": self.engine}
            publish(tmp, final, state, out, keep)
        self.barrier()
        return final

    def load_state(self, ckpt: Path, model, optimizer, scheduler) -> dict:
        """This process's optimizer shard and RNG, the scheduler, and the trainer state."""
        from .checkpoint import load_training_state

        where = self.device if self.device.type == "cuda" else "cpu"  # accelerate names the CPU "cpu:0"
        return load_training_state(ckpt, optimizer, scheduler, where, f"-rank{self.rank}")

    def _full_state_dict(self, model) -> dict:
        """The whole model's state (gathered from the shards under FSDP; complete on process 0)."""
        if self.engine == "fsdp":
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            on_gpu = self.device.type == "cuda"  # gathering into CPU memory is for GPUs only
            with FSDP.state_dict_type(
                model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=on_gpu)
            ):
                return model.state_dict()
        return self.accelerator.get_state_dict(model)

    def _unwrap(self, model):
        return model.module if self.engine == "fsdp" else self.accelerator.unwrap_model(model)


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


class _EngineBackward:
    """Forward and backward of one micro-batch through the engine: accelerate's backward (under
    DeepSpeed the engine's own). Always eager: CUDA graphs are part of the single-process path."""

    enabled = False

    def __init__(self, accelerator, model, fused):
        self.accelerator, self.model, self.fused = accelerator, model, fused

    def __call__(self, batch: dict, scale: float, graphable: bool = False):
        from .model import summed_nll

        labels = batch.pop("labels")
        loss = summed_nll(self.model, self.fused, labels, **batch) * scale
        self.accelerator.backward(loss)
        return loss.detach()


def _save_fsdp_adapter(peft_model, state: dict, path: Path) -> None:
    """PEFT's adapter files from an FSDP-gathered state dict. PEFT finds adapter weights by
    walking the module tree, which FSDP has changed (its wrapper levels are in the module names,
    not in the gathered keys), so the LoRA entries are picked by name here, in PEFT's format:
    the adapter name dropped from each key, the adapter config beside the weights."""
    from safetensors.torch import save_file

    adapter = "default"
    config = peft_model.peft_config[adapter]
    weights = {
        key.replace(f".{adapter}", ""): tensor.detach().cpu().contiguous()
        for key, tensor in state.items()
        if (".lora_A." in key or ".lora_B." in key) and f".{adapter}." in key
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    inference = config.inference_mode
    config.inference_mode = True
    config.save_pretrained(str(path))
    config.inference_mode = inference
