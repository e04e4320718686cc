"""The QLoRA training loop: data in, checkpoints and a final adapter out.

A plain loop rather than TRL's SFTTrainer, for three reasons measured or needed
here: the loss is on assistant tokens located through the chat template itself
(SFTTrainer's assistant-only loss needs templates with generation markers, which
most models lack); checkpoints are atomic and resume at the exact step and data
order; and bitsandbytes' CPU repacking trap is handled before the first forward.

    trainer = Trainer(cfg, resume=False)
    base = trainer.evaluate()        # safe before training (see models.loader)
    summary = trainer.train()        # checkpoints, logs, final_adapter/

Run it as `qlora train --config configs/smollm2-135m.yaml`.

No finished step is lost: the final step is checkpointed and `final_adapter` is
written (atomically) before the final evaluation; running out of memory saves
the finished steps; SIGINT and SIGTERM (Ctrl-C, `kill`, SLURM, `docker stop`)
save a checkpoint at the step reached and say how to continue, also when the
output goes to a pipe whose reader is gone (progress output then stops instead
of killing the run). An output.dir that holds a run is continued (`--resume`)
or started again (`--overwrite`), never mixed with a second run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from ..config import Config, dump_config, resolve, resume_keys
from ..data.formats import load_records
from ..data.tokenize import IGNORE, encode_records
from ..errors import UserError
from ..models.loader import device_label, load_tokenizer, pick_device
from ..models.memory import memory_advice, peak_memory_gib
from ..models.model_card import write_model_card
from ..models.scoring import holdout_perplexity
from .batching import collate, plan_epoch
from .checkpoint import latest_checkpoint, load_adapter_weights, newest_loadable, replace_folder
from .distributed import pick_strategy
from .flat_params import FlatParams
from .model import build_training_model
from .preference import check_record_kind
from .tracking import LOG_FILE, NullTracker, Tracker, truncate_log

SUMMARY_FILE = "train_summary.json"
# What a training run writes into output.dir: --overwrite removes these (and checkpoint-N);
# a log, a summary, a final adapter or a checkpoint mark the folder as used.
RUN_FILES = (
    LOG_FILE,
    SUMMARY_FILE,
    "config.yaml",
    "final_adapter",
    "final_adapter.tmp",
    "final_adapter.old",
    "logs",
    "wandb",
    "eval",
)
USED_MARKS = (LOG_FILE, SUMMARY_FILE, "final_adapter")
_CHECKPOINT = re.compile(r"^checkpoint-\d+(\.tmp)?$")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def claim_output_dir(out: Path, resume: bool, overwrite: bool, log=print, clear: bool = True) -> None:
    """Keep one run per output.dir. A folder that already holds a run is continued with --resume
    or started again with --overwrite, which first removes the earlier run's files (only where
    `clear`: the first of several processes does it)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in output.dir and --overwrite deletes it; give one of them")
    if resume or not out.is_dir():
        return
    used = sorted(p.name for p in out.iterdir() if p.name in USED_MARKS or _CHECKPOINT.match(p.name))
    if not used:
        return
    if not overwrite:
        raise UserError(
            f"output.dir '{out}' already holds a training run ({', '.join(used[:4])}); continue it "
            f"with --resume, or start again with --overwrite (deletes its checkpoints, logs, final "
            f"adapter and eval report), or set another --output.dir"
        )
    if clear:
        for path in out.iterdir():
            if path.name in RUN_FILES or _CHECKPOINT.match(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        log(f"--overwrite: removed the earlier run's checkpoints, logs, final adapter and eval report from {out}")


# -- output that outlives its reader -------------------------------------------------------
def silence(stream) -> None:
    """Point a stream whose reader is gone (a closed pipe, `| tee` killed by the same Ctrl-C) at
    /dev/null, so later writes and Python's flush at exit succeed instead of raising."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class GuardedStream:
    """A text stream that stops writing, instead of raising BrokenPipeError (or EIO), once its
    reader is gone: a progress bar must never end a run before it saves."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except OSError:
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError:
                self._break()

    def _break(self) -> None:
        self.broken = True
        silence(self._stream)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def say(text: str, stream) -> None:
    """One line to `stream`, silently dropped when nobody reads it any more."""
    out = GuardedStream(stream)
    out.write(text + "\n")
    out.flush()


def flush_quietly(stream) -> None:
    GuardedStream(stream).flush()


def guard_log(log):
    """`log` (print by default) that stops printing, instead of raising, once stdout is gone."""

    def guarded(*args, **kwargs):
        try:
            log(*args, **kwargs)
        except OSError:  # BrokenPipeError, or EIO from a terminal that closed
            silence(kwargs.get("file") or sys.stdout)

    return guarded


# -- stopping on a signal -------------------------------------------------------------------
class TrainingInterrupted(UserError):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint; exit code 128 + signal."""


class _Stopped(BaseException):
    """Raised from the signal handler (a BaseException, like KeyboardInterrupt, so no library's
    `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """SIGINT and SIGTERM turned into a clean stop. Inside `interruptible()` (forward, backward,
    evaluation) the step is abandoned at once: its gradients are dropped and nothing is half
    updated. Elsewhere (the optimizer step, a checkpoint being written) the request is noted and
    acted on when that part is done. `immediate=False` (several processes) only notes it: the
    processes agree at the end of a step to stop together."""

    def __init__(self, immediate: bool = True):
        self.signum: int | None = None
        self.immediate = immediate
        self._window = False

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        if self._window:
            self._window = False
            raise _Stopped(signum)

    @contextmanager
    def installed(self):
        """The handlers, for SIGINT too where it is ignored (a background job of a script)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    @contextmanager
    def interruptible(self):
        if self.immediate and self.signum is not None:
            raise _Stopped(self.signum)
        self._window = self.immediate
        try:
            yield
        finally:
            self._window = False


def build_optimizer(params, cfg: Config, device: str):
    name = resolve(cfg, device).optimizer
    lr, wd = cfg.training.learning_rate, cfg.training.weight_decay
    if name in ("paged_adamw_8bit", "adamw_8bit"):
        if device != "cuda":
            raise UserError(f"training.optimizer '{name}' needs a GPU; use 'adamw' on the CPU")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _quiet(*_args, **_kwargs) -> None:
    pass


def changed_keys(saved: dict, now: dict) -> list[tuple[str, str, object, object]]:
    """(section, key, saved value, current value) for every config key that differs."""
    out = []
    for section, values in now.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value:
                out.append((section, key, old, value))
    return out


class Trainer:
    """Set up in named steps, each reading what the ones before it set: the data, the strategy
    (one device, or several processes through accelerate), the step plan, --resume's checkpoint,
    the model, the optimizer, the schedule, then the resumed state. This class trains SFT; the
    other methods' trainers (reward, DPO, ORPO, KTO, PPO, GRPO) change the data, the loss and the
    evaluation (`train.methods.make_trainer` picks the one of training.method)."""

    def __init__(self, cfg: Config, resume: bool = False, log=print, overwrite: bool = False, final_eval: bool = True):
        """`final_eval=False` skips the holdout evaluation after the last step (for a caller that
        runs `qlora eval` next, which scores the same holdout the same way)."""
        self.cfg, self.log = cfg, guard_log(log)
        self.final_eval = final_eval
        self.out = Path(cfg.output.dir)
        claim_output_dir(self.out, resume, overwrite, self.log, clear=int(os.environ.get("RANK", "0")) == 0)
        self.device = pick_device(cfg.training.device)
        # Every device-dependent default, decided once; the set-up below reads these values.
        self.resolved = resolve(cfg, self.device)
        if cfg.training.num_threads:
            torch.set_num_threads(cfg.training.num_threads)
        self.step, self.history = 0, []
        self.train_seconds, self.train_tokens = 0.0, 0
        self.resumed, self.finished, self.summary = resume, False, None
        self._saved_step: int | None = None  # the step of the checkpoint on disk for this run
        self._evaluating = False

        self._setup_data()
        self._setup_strategy()
        self._plan_steps()
        self._resume_from = self._find_resume() if resume else None
        if self.finished:
            return
        self._setup_model()
        self._setup_optimizer()
        self._setup_schedule()
        self._resume()

    # -- set-up steps -----------------------------------------------------------------
    def _setup_data(self) -> None:
        """The tokenizer and the encoded training and holdout examples (every process logs them)."""
        cfg = self.cfg
        if cfg.training.method != "sft":
            raise UserError(
                f"training.method {cfg.training.method}: this Trainer trains sft; "
                "build it with train.methods.make_trainer"
            )
        for what in ("train_file", "eval_file"):
            check_record_kind(getattr(cfg.data, what), what, "sft")
        train_records = load_records(cfg.data.train_file, "train_file")
        eval_records = load_records(cfg.data.eval_file, "eval_file") if cfg.data.eval_file else []
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_examples, dropped = encode_records(self.tokenizer, train_records, cfg.data.max_seq_len)
        self.eval_examples, eval_dropped = encode_records(self.tokenizer, eval_records, cfg.data.max_seq_len)
        truncated = self._count_data(len(train_records), dropped + eval_dropped)
        self.log(
            f"data: {len(self.train_examples)} training examples ({truncated} truncated to "
            f"{cfg.data.max_seq_len} tokens, {dropped} dropped with no answer token left), "
            f"{len(self.eval_examples)} holdout examples"
        )
        if not self.train_examples:
            raise UserError(
                f"no usable training example in '{cfg.data.train_file}' "
                f"(all answers were truncated away? raise data.max_seq_len)"
            )

    def _count_data(self, n_records: int, dropped: int) -> int:
        """Record the data's counts in `data_stats`; returns how many training examples were truncated."""
        truncated = sum(ex["truncated"] for ex in self.train_examples)
        self.data_stats = {
            "train_records": n_records,
            "train_examples": len(self.train_examples),
            "eval_examples": len(self.eval_examples),
            "truncated": truncated,
            "dropped_no_labels": dropped,
        }
        return truncated

    def _setup_strategy(self) -> None:
        """One device, or several processes (torchrun / accelerate launch) through accelerate's
        DDP, FSDP or ZeRO-3; only the first of several logs."""
        self.strategy = pick_strategy(self.cfg, self.device)
        method = self.cfg.training.method
        if method != "sft" and self.strategy.world > 1:
            raise UserError(f"training.method {method} runs in one process for now; drop --num-processes")
        if not self.strategy.is_main:
            self.log = _quiet

    def _plan_steps(self) -> None:
        """The step plan. It needs only the data, so --resume knows where it stands (and whether
        there is anything left to do) before the model is loaded."""
        tc = self.cfg.training
        self.lengths, self.label_counts = self._lengths_and_weights()
        self.batches_per_epoch = len(self._plan(0))
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * self.batches_per_epoch / tc.grad_accum))

    def _lengths_and_weights(self) -> tuple[list[int], list[int]]:
        """Each example's length (for the batch plan) and its weight in a step's loss: its labelled
        tokens after the one-token shift (packing masks each example's first label too)."""
        lengths = [len(ex["input_ids"]) for ex in self.train_examples]
        return lengths, [sum(lab != IGNORE for lab in ex["labels"][1:]) for ex in self.train_examples]

    def _find_resume(self) -> Path | None:
        """The checkpoint --resume continues from (None: start at step 0); sets `finished` when
        the run it belongs to is complete, so that nothing is loaded."""
        ckpt = self._resume_checkpoint()
        if ckpt is not None and self._finished_run():
            self.finished = True
        return ckpt

    def _setup_model(self) -> None:
        """The 4-bit base with its LoRA adapter, holding the checkpoint's adapter when resuming;
        on the fast path the adapter lives in one flat buffer (one optimizer launch a step)."""
        if self.device == "cuda":
            self._preflight()
        torch.manual_seed(self.cfg.training.seed)
        self.model, self.fused_loss = build_training_model(
            self.cfg, self.device, self.log, distributed=not self.strategy.fast_path
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        fast = self.resolved.fast_kernels and self.strategy.fast_path
        self.flat = FlatParams(self.trainable) if fast else None
        if self._resume_from is not None:
            load_adapter_weights(self._resume_from, self.model)  # before wrapping: FSDP shards what it is given

    def _setup_optimizer(self) -> None:
        """The model as the strategy runs it, its optimizer, and the forward + backward of a batch
        (CUDA graphs need gradients that stay put: the flat buffer)."""
        params = ([self.flat.param] if self.flat else self.trainable) + self.extra_trainable()
        self.model, self.optimizer, self.optimized = self.strategy.wrap(
            self.model, params, lambda ps: build_optimizer(ps, self.cfg, self.device)
        )
        self.run_batch = self.strategy.loss_backward(
            self.model, self.fused_loss, self.cfg, self.device, self.log, graphs=self.flat is not None
        )

    def _setup_schedule(self) -> None:
        """The learning-rate schedule over the planned steps."""
        from transformers import get_scheduler

        tc = self.cfg.training
        self.scheduler = get_scheduler(
            tc.lr_scheduler if tc.lr_scheduler != "constant" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=int(tc.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )

    def _resume(self) -> None:
        """Optimizer, scheduler, RNG and the run's history from --resume's checkpoint."""
        ckpt = self._resume_from
        if ckpt is None:
            return
        state = self.strategy.load_state(ckpt, self.model, self.optimizer, self.scheduler)
        self._load_extra(ckpt)
        self._use_configured_rates()
        self.step = state["global_step"]
        self._saved_step = self.step
        self.history = [h for h in state.get("history", []) if h.get("step", 0) <= self.step]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.train_tokens = state.get("train_tokens", 0)
        self.log(f"resumed from {ckpt} at step {self.step}/{self.total_steps}")

    # -- set-up helpers ---------------------------------------------------------------
    def _preflight(self):
        from transformers import AutoConfig

        from ..models.loader import resolve_model_source
        from ..models.memory import check_fits, estimate_training_memory

        mc = AutoConfig.from_pretrained(
            resolve_model_source(self.cfg.model.name), trust_remote_code=self.cfg.model.trust_remote_code
        )
        free, _ = torch.cuda.mem_get_info()
        est = estimate_training_memory(mc, self.resolved, self.strategy.world)
        check_fits(est, free, torch.cuda.get_device_name(), self.cfg)

    def _plan(self, epoch: int):
        """Global batches: batch_size rows for each process, the same plan on every process."""
        tc = self.cfg.training
        rows = tc.batch_size * self.strategy.world
        return plan_epoch(self.lengths, epoch, tc.seed, rows, self.cfg.data.max_seq_len, self.cfg.data.packing)

    def _micro_batches(self, skip: int):
        """Endless (epoch, batch rows) in the deterministic order, the first `skip` passed over."""
        epoch, seen = 0, 0
        while True:
            plan = self._plan(epoch)
            for rows in plan:
                if seen >= skip:
                    yield epoch, rows
                seen += 1
            epoch += 1

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint --resume continues from (the newest that loads), after checking it fits
        this run; config keys that may change are reported with their old and new values."""
        ckpt = newest_loadable(self.out, self.log)
        if ckpt is None:
            self.log(f"--resume: no complete checkpoint in {self.out}; starting from step 0")
            return None
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved, now = state.get("config", {}), self.cfg.model_dump()
        changed = changed_keys(saved, now)
        refused = [
            f"{section}.{key} was {old!r} in {ckpt} but is {new!r} now"
            for section, key, old, new in changed
            if (section, key) in resume_keys()
        ]
        if refused:
            raise UserError(
                f"--resume: {'; '.join(refused)}; restore {'it' if len(refused) == 1 else 'them'}, "
                f"or start a new output.dir (or again with --overwrite)"
            )
        world = self.strategy.world
        if state.get("world_size", 1) != world:
            raise UserError(
                f"--resume: {ckpt} was written by {state.get('world_size', 1)} process(es), this run "
                f"has {world}; resume with --num-processes {state.get('world_size', 1)}"
            )
        notes = [
            f"{section}.{key}: {old!r} -> {new!r}"
            for section, key, old, new in changed
            if (section, key) != ("output", "dir")
        ]
        if notes:
            self.log(
                f"--resume: changed since {ckpt.name} (the new values apply from step "
                f"{state['global_step'] + 1}): {', '.join(notes)}"
            )
        self._resume_state = state
        return ckpt

    def _finished_run(self) -> bool:
        """Whether the run --resume points at is complete: its last step reached, its final adapter
        and summary written. (A run stopped in its final evaluation is not: resuming evaluates.)"""
        step = self._resume_state["global_step"]
        final, summary = self.out / "final_adapter", self.out / SUMMARY_FILE
        if step < self.total_steps or not (final / "adapter_model.safetensors").is_file() or not summary.is_file():
            return False
        try:
            self.summary = json.loads(summary.read_text())
        except ValueError:
            return False
        if self.summary.get("steps") != step:
            return False
        self.step = step
        self.log(
            f"--resume: the run in {self.out} is finished ({plural(step, 'step')} of {self.total_steps}, "
            f"adapter in {final}); nothing to train. Raise training.max_steps to train on, or start "
            f"again with --overwrite"
        )
        return True

    def _use_configured_rates(self) -> None:
        """The loaded optimizer and scheduler carry the learning rate and weight decay they were
        saved with; the config's values (perhaps changed for this resume) take their place, and the
        current rate is recomputed on this run's schedule."""
        tc, groups = self.cfg.training, self.optimizer.param_groups
        for group in groups:
            group["weight_decay"] = tc.weight_decay
            group["initial_lr"] = tc.learning_rate
        lambdas = getattr(self.scheduler, "lr_lambdas", None)
        if lambdas is None:
            return
        self.scheduler.base_lrs = [tc.learning_rate for _ in groups]
        for group, factor in zip(groups, lambdas):
            group["lr"] = tc.learning_rate * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports

    # -- evaluation -----------------------------------------------------------------
    def evaluate(self) -> dict | None:
        if not self.eval_examples:
            return None
        return holdout_perplexity(
            self.model,
            self.eval_examples,
            batch_size=self.cfg.training.batch_size,
            pad_id=self.tokenizer.pad_token_id,
            progress=True,
        )

    # -- training ---------------------------------------------------------------------
    def _batch(self, rows) -> tuple[dict, int, float, bool]:
        """A micro-batch on the device: (inputs with labels, its tokens, loss weight across
        processes, whether it may run from a CUDA graph: no mask and no packing positions)."""
        # This process's rows; the engine averages gradients over processes, so the summed loss
        # is scaled by their number. A process left without rows (a short last batch) still runs
        # one row, weighted 0, so the collectives line up. One process: all rows, weight 1.
        mine = self.strategy.my_rows(rows)
        rows, scale = (mine, float(self.strategy.world)) if mine else (rows[:1], 0.0)
        examples = [[self.train_examples[i] for i in row] for row in rows]
        fast = self.flat is not None
        # The fast path gets batches in a few shapes (full-width packed rows, padded widths in
        # buckets: batching.py), so that CUDA graphs replay them.
        batch = collate(
            examples, self.tokenizer.pad_token_id, self.cfg.data.packing, self.cfg.data.max_seq_len if fast else None
        )
        dev = self.device
        inputs = {"labels": batch["labels"].to(dev), "input_ids": batch["input_ids"].to(dev)}
        if fast:
            # Packed rows carry their sequences' boundaries for variable-length attention
            # (kernels/decoder_layer.py); right padding needs no mask: under causal attention no
            # real token sees a pad, and pads carry no label. Either may replay from a graph.
            if self.cfg.data.packing:
                inputs["position_ids"] = batch["position_ids"].to(dev)
                inputs["cu_seq_lens"] = batch["cu_seq_lens"].to(dev)
            return inputs, batch["num_tokens"] if scale else 0, scale, True
        graphable = False
        if self.cfg.data.packing:  # boundaries from the positions (batching.py); transformers
            # reads them only when there is no attention mask and no cache
            inputs["position_ids"] = batch["position_ids"].to(dev)
            inputs["use_cache"] = False
        elif bool(batch["attention_mask"].all()):  # no padding: the causal mask alone (on the host, no sync)
            graphable = True
        else:
            inputs["attention_mask"] = batch["attention_mask"].to(dev)
        return inputs, batch["num_tokens"] if scale else 0, scale, graphable

    def _forward_backward(self, rows, n_label_window: int) -> tuple[torch.Tensor, int]:
        """Loss of one micro-batch (its gradients accumulated). Summed over the window's labelled
        tokens, then divided once: every token weighs the same however the tokens fall into
        micro-batches."""
        inputs, ntok, scale, graphable = self._batch(rows)
        weight = scale / max(n_label_window, 1)
        return self.run_batch(inputs, weight, graphable=graphable), ntok

    def _zero_grad(self) -> None:
        if self.flat:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _state(self) -> dict:
        return {
            "history": self.history,
            "config": self.cfg.model_dump(),
            "train_seconds": self.train_seconds,
            "train_tokens": self.train_tokens,
            "total_steps": self.total_steps,
        }

    def _continue_hint(self) -> str:
        return f"qlora train --config {self.out / 'config.yaml'} --resume"

    def save_checkpoint(self) -> Path:
        """checkpoint-N at the step reached; a failed write (a full disk) becomes one line naming the
        newest checkpoint that is on disk."""
        try:
            path = self.strategy.save_checkpoint(
                self.out,
                self.step,
                self.model,
                self.optimizer,
                self.scheduler,
                self._state(),
                keep=self.cfg.training.save_total_limit,
                extra=self._save_extra,
            )
        except OSError as err:
            newest = latest_checkpoint(self.out)
            kept = f"the newest saved one is {newest}" if newest else "no checkpoint is saved yet"
            raise UserError(
                f"could not write checkpoint-{self.step} in {self.out} ({err.strerror or err}); "
                f"{kept}. Free disk space, then continue with: {self._continue_hint()}"
            ) from None
        self._saved_step = self.step
        return path

    def _checkpoint_now(self) -> Path:
        """A checkpoint at the step reached: the one already written at this step, or a new one."""
        if self._saved_step == self.step:
            return self.out / f"checkpoint-{self.step}"
        return self.save_checkpoint()

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether to stop now; several processes stop together when any of them was signalled."""
        return self.strategy.mean(1.0 if stop.signum is not None else 0.0) > 0

    def train(self) -> dict:
        if self.finished:
            return self.summary
        from tqdm import tqdm

        tc = self.cfg.training
        self.out.mkdir(parents=True, exist_ok=True)
        if self.strategy.is_main:
            if self.resumed:  # each step once in the log, also when resuming from an earlier checkpoint
                truncate_log(self.out, self.step)
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
        tracker = Tracker(self.out, tc.report_to, self.cfg) if self.strategy.is_main else NullTracker()
        self.model.train()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stop = StopRequest(immediate=self.strategy.world == 1)
        # Progress and messages go to streams that stop writing when their reader is gone.
        err, out = GuardedStream(sys.stderr), GuardedStream(sys.stdout)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            disable=not self.strategy.is_main,
            file=err,
        )
        try:
            with stop.installed(), redirect_stderr(err), redirect_stdout(out):
                try:
                    self._steps(bar, tracker, stop)
                    bar.close()
                    final_eval = self._final(tracker, stop)
                except (_Stopped, KeyboardInterrupt) as stopped:
                    bar.close()
                    signum = stopped.signum if isinstance(stopped, _Stopped) else signal.SIGINT
                    raise self._interrupted(signum) from None
                except torch.OutOfMemoryError:
                    bar.close()
                    raise UserError(self._out_of_memory()) from None
        finally:
            bar.close()
            tracker.close()
        return self._summarize(final_eval)

    def _steps(self, bar, tracker, stop: StopRequest) -> None:
        tc = self.cfg.training
        batches = self._micro_batches(skip=self.step * tc.grad_accum)
        window_loss, window_tokens, window_start = 0.0, 0, time.time()
        steps_in_window = 0
        while self.step < self.total_steps:
            t0 = time.time()
            with stop.interruptible():  # stopped here, the step's gradients are simply dropped
                micro = [next(batches) for _ in range(tc.grad_accum)]
                n_label = sum(self.label_counts[i] for _, rows in micro for row in rows for i in row)
                step_loss, step_tokens = 0.0, 0
                for _, rows in micro:
                    loss, ntok = self._forward_backward(rows, n_label)
                    step_loss += loss.item()
                    step_tokens += ntok
            if self.flat:
                self.flat.check()
            # The loss over all processes, and all their tokens.
            step_loss = self.strategy.mean(step_loss)
            step_tokens = self.strategy.total(step_tokens)
            grad_norm = self.strategy.clip_grad_norm(self.model, self.optimized, tc.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self._zero_grad()
            self.step += 1
            self.train_seconds += time.time() - t0
            self.train_tokens += step_tokens
            window_loss += step_loss
            window_tokens += step_tokens
            steps_in_window += 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if not math.isfinite(step_loss):
                raise UserError(
                    f"the loss became {step_loss} at step {self.step}; lower "
                    f"training.learning_rate (now {tc.learning_rate}) and resume"
                )
            # The first step is always logged: train_loss_first is the loss before any learning.
            if self.step == 1 or self.step % tc.logging_steps == 0 or self.step == self.total_steps:
                elapsed = time.time() - window_start
                record = {
                    "step": self.step,
                    "epoch": round(self.step * tc.grad_accum / self.batches_per_epoch, 3),
                    "loss": window_loss / steps_in_window,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "tokens": window_tokens,
                    **self._window_metrics(),
                }
                self.history.append(record)
                tracker.log(record, self.step)
                window_loss, window_tokens, steps_in_window, window_start = 0.0, 0, 0, time.time()
            if self._stop_agreed(stop):
                raise _Stopped(stop.signum or signal.SIGTERM)
            if tc.eval_steps and self.step % tc.eval_steps == 0 and self.step < self.total_steps:
                with stop.interruptible():
                    self._log_eval(tracker)
            if self.step % tc.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()

    def _final(self, tracker, stop: StopRequest) -> dict | None:
        """The last step's checkpoint and the final adapter, then the final evaluation: an
        evaluation that runs out of memory or is stopped loses no training."""
        self._checkpoint_now()
        self._save_final_adapter()
        if self._stop_agreed(stop):
            raise _Stopped(stop.signum or signal.SIGTERM)
        if not self.eval_examples or not self.final_eval:
            return None
        with stop.interruptible():
            return self._log_eval(tracker)

    def _save_final_adapter(self) -> Path:
        """final_adapter/ (adapter, tokenizer), written beside it and renamed into place whole."""
        final, tmp = self.out / "final_adapter", self.out / "final_adapter.tmp"
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.strategy.save_adapter(self.model, tmp)
            if self.strategy.is_main:
                self.tokenizer.save_pretrained(tmp)
                self._save_extra(tmp)
                replace_folder(tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"could not write {final} ({err.strerror or err}); the trained steps are saved in "
                f"{self.out / f'checkpoint-{self.step}'}. Free disk space, then continue with: "
                f"{self._continue_hint()}"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _interrupted(self, signum: int) -> TrainingInterrupted:
        """Save the finished steps (the interrupted step's partial gradients dropped) and say how
        to continue. Exit code 128 + the signal: 130 for SIGINT, 143 for SIGTERM."""
        self._zero_grad()
        path = self._checkpoint_now()
        name = signal.Signals(signum).name
        return TrainingInterrupted(
            f"interrupted at step {self.step}/{self.total_steps} by {name}; saved {path}. "
            f"Continue with: {self._continue_hint()}",
            exit_code=128 + signum,
        )

    def _out_of_memory(self) -> str:
        """What to say when a step or an evaluation ran out of memory. The finished steps are saved
        first (the failed step's partial gradients dropped), so no finished work is lost."""
        peak = peak_memory_gib(self.device)
        self._zero_grad()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        saved = "nothing to save yet (no step finished)"
        if self.step > 0:
            try:
                saved = f"saved the {plural(self.step, 'finished step')} in {self._checkpoint_now()}"
            except (torch.OutOfMemoryError, OSError, UserError) as err:
                saved = f"could not save a checkpoint ({type(err).__name__})"
        final = self.out / "final_adapter"
        if self._evaluating and self.step >= self.total_steps:
            return (
                f"out of memory in the final holdout evaluation (peak {peak:.2f} GiB on "
                f"{device_label(self.device)}); training is complete: {saved}, the adapter is in {final}. "
                f"Evaluate it with qlora eval --adapter {final}, or run the final evaluation again with "
                f"{self._continue_hint()}"
            )
        where = (
            f"the holdout evaluation at step {self.step}/{self.total_steps}"
            if self._evaluating
            else f"step {self.step + 1}/{self.total_steps}"
        )
        text = (
            f"out of memory in {where} (peak {peak:.2f} GiB on "
            f"{device_label(self.device)}); {saved}. To fit, try {memory_advice(self.cfg)}"
        )
        if self.step > 0 and not self.cfg.training.gradient_checkpointing:
            text += (
                f"; with only --gradient_checkpointing true added, {self._continue_hint()} "
                f"continues from the saved steps"
            )
        return text + " (a new batch size or sequence length reorders the data: use a new output.dir)"

    def _log_eval(self, tracker) -> dict:
        self._evaluating = True  # stays set if it fails: the out-of-memory message reads it
        result = self.evaluate()
        self._evaluating = False
        record = {"step": self.step, **self._eval_record(result)}
        self.history.append(record)
        tracker.log(record, self.step)
        return result

    # -- tensors trained beside the adapter (a reward or value head; none for SFT) ------------
    def extra_trainable(self) -> list[torch.nn.Parameter]:
        """Parameters trained beside the adapter, in the optimizer after its own (set up in
        `_setup_model`); their gradients are clipped with the adapter's. One process only: several
        (train/distributed.py) optimise the model's own parameters."""
        return []

    def _save_extra(self, folder: Path) -> None:
        """Write those parameters into `folder` beside the adapter: every checkpoint-N (before it
        is published) and final_adapter."""

    def _load_extra(self, folder: Path) -> None:
        """Restore them from --resume's checkpoint `folder` (after the optimizer state is loaded)."""

    def _window_metrics(self) -> dict:
        """Further means over the steps of a log line (none for SFT)."""
        return {}

    def _eval_record(self, result: dict) -> dict:
        """What a holdout evaluation adds to the log."""
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}

    def _eval_summary(self, result: dict | None) -> dict:
        """What the final holdout evaluation adds to the run's summary."""
        return {
            "eval_loss": result["loss"] if result else None,
            "eval_perplexity": result["perplexity"] if result else None,
        }

    def _summarize(self, final_eval: dict | None) -> dict:
        if not self.strategy.is_main:
            return {}
        final = self.out / "final_adapter"
        summary = {
            "steps": self.step,
            "train_seconds": round(self.train_seconds, 1),
            "tokens_per_s": round(self.train_tokens / max(self.train_seconds, 1e-9), 1),
            "train_loss_first": next((h["loss"] for h in self.history if "loss" in h), None),
            "train_loss_last": next((h["loss"] for h in reversed(self.history) if "loss" in h), None),
            **self._eval_summary(final_eval),
            "peak_memory_gib": round(peak_memory_gib(self.device), 2),
            "device": device_label(self.device),
            **self.data_stats,
        }
        write_model_card(final, self.cfg, summary)
        tmp = self.out / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / SUMMARY_FILE)
        self.log(f"final adapter: {final}")
        return summary
