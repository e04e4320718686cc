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
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..config import Config, dump_config
from ..data.formats import iter_jsonl, to_chat_record
from ..data.tokenize import IGNORE, encode_records
from ..errors import UserError
from ..eval.perplexity import holdout_perplexity
from ..models.loader import device_label, fast_kernels_on, load_tokenizer, pick_device
from ..models.memory import memory_advice, peak_memory_gib
from .batching import collate, plan_epoch
from .checkpoint import latest_checkpoint, load_adapter_weights, load_checkpoint, save_checkpoint
from .flat_params import FlatParams
from .distributed import world_size
from .model import build_training_model, loss_backward, summed_nll
from .model_card import write_model_card
from .tracking import NullTracker, Tracker

# Changing any of these between a checkpoint and --resume changes the data order or shapes.
RESUME_KEYS = [("training", "batch_size"), ("training", "grad_accum"), ("training", "seed"),
               ("data", "max_seq_len"), ("data", "packing"), ("data", "train_file"), ("lora", "r"),
               ("lora", "target_modules"), ("model", "name"), ("training", "fast_kernels")]


def load_records(path: str | None, what: str) -> list[dict]:
    if not path:
        return []
    if not Path(path).is_file():
        raise UserError(f"{what} '{path}' does not exist; run 'qlora prepare' first or set data.{what}")
    records = [to_chat_record(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]
    if not records:
        raise UserError(f"{what} '{path}' has no records")
    return records


def build_optimizer(params, cfg: Config, device: str):
    name = cfg.training.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device == "cuda" else "adamw"
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


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.output.dir)
        tc = cfg.training
        self.device = pick_device(tc.device)
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        train_records = load_records(cfg.data.train_file, "train_file")
        eval_records = load_records(cfg.data.eval_file, "eval_file") if cfg.data.eval_file else []
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_examples, dropped = encode_records(self.tokenizer, train_records, cfg.data.max_seq_len)
        self.eval_examples, eval_dropped = encode_records(self.tokenizer, eval_records, cfg.data.max_seq_len)
        truncated = sum(ex["truncated"] for ex in self.train_examples)
        self.data_stats = {"train_records": len(train_records), "train_examples": len(self.train_examples),
                           "eval_examples": len(self.eval_examples), "truncated": truncated,
                           "dropped_no_labels": dropped + eval_dropped}
        log(f"data: {len(self.train_examples)} training examples ({truncated} truncated to "
            f"{cfg.data.max_seq_len} tokens, {dropped} dropped with no answer token left), "
            f"{len(self.eval_examples)} holdout examples")
        if not self.train_examples:
            raise UserError(f"no usable training example in '{cfg.data.train_file}' "
                            f"(all answers were truncated away? raise data.max_seq_len)")
        # Several processes (torchrun / accelerate launch): accelerate's DDP, FSDP or ZeRO-3.
        self.dist = None
        if world_size() > 1:
            from .distributed import Distributed
            self.dist = Distributed(cfg, self.device)
            if not self.dist.is_main:
                self.log = log = _quiet
        if self.device == "cuda":
            self._preflight()

        torch.manual_seed(tc.seed)
        self.model, self.fused_loss = build_training_model(cfg, self.device, log, distributed=bool(self.dist))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # With the fast kernels the adapter lives in one flat buffer: one optimizer launch a step.
        self.flat = FlatParams(self.trainable) if fast_kernels_on(cfg, self.device) and not self.dist else None
        self.optimized = [self.flat.param] if self.flat else self.trainable
        # Forward + backward of a batch; CUDA graphs need gradients that stay put (FlatParams).
        self.run_batch = loss_backward(self.model, self.fused_loss, cfg, self.device, log)
        self.run_batch.enabled = self.run_batch.enabled and self.flat is not None
        self.optimizer = None if self.dist else build_optimizer(self.optimized, cfg, self.device)
        if self.dist and resume:
            self._resume_adapter()     # before wrapping: FSDP shards what it is given
        if self.dist:
            self.model, self.optimizer = self.dist.wrap(self.model, lambda ps: build_optimizer(ps, cfg, self.device))
            self.optimized = [p for p in self.model.parameters() if p.requires_grad]
        self.lengths = [len(ex["input_ids"]) for ex in self.train_examples]
        # Labelled tokens after the one-token shift; packing masks each example's first label too.
        self.label_counts = [sum(lab != IGNORE for lab in ex["labels"][1:]) for ex in self.train_examples]
        batches_per_epoch = len(self._plan(0))
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * batches_per_epoch / tc.grad_accum))
        from transformers import get_scheduler
        self.scheduler = get_scheduler(tc.lr_scheduler if tc.lr_scheduler != "constant" else "constant_with_warmup",
                                       self.optimizer, num_warmup_steps=int(tc.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.step, self.history = 0, []
        self.train_seconds, self.train_tokens = 0.0, 0
        if resume:
            self._resume()

    # -- set-up helpers ---------------------------------------------------------------
    def _preflight(self):
        from ..models.memory import check_fits, estimate_training_memory
        from ..models.loader import resolve_model_source
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(resolve_model_source(self.cfg.model.name),
                                        trust_remote_code=self.cfg.model.trust_remote_code)
        free, _ = torch.cuda.mem_get_info()
        est = estimate_training_memory(mc, self.cfg, self.dist.world if self.dist else 1)
        check_fits(est, free, torch.cuda.get_device_name(), self.cfg)

    def _plan(self, epoch: int):
        """Global batches: batch_size rows for each process, the same plan on every process."""
        tc = self.cfg.training
        world = self.dist.world if self.dist else 1
        return plan_epoch(self.lengths, epoch, tc.seed, tc.batch_size * world, self.cfg.data.max_seq_len,
                          self.cfg.data.packing)

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
        """The checkpoint --resume continues from, after checking it fits this run."""
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.log(f"--resume: no complete checkpoint in {self.out}; starting from step 0")
            return None
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved, now = state.get("config", {}), self.cfg.model_dump()
        for section, key in RESUME_KEYS:
            if saved.get(section, {}).get(key) != now[section][key]:
                raise UserError(f"--resume: {section}.{key} was {saved.get(section, {}).get(key)!r} in "
                                f"{ckpt} but is {now[section][key]!r} now; restore it or start a new "
                                f"output.dir")
        world = self.dist.world if self.dist else 1
        if state.get("world_size", 1) != world:
            raise UserError(f"--resume: {ckpt} was written by {state.get('world_size', 1)} process(es), this run "
                            f"has {world}; resume with --num-processes {state.get('world_size', 1)}")
        return ckpt

    def _resume_adapter(self):
        self._resume_from = self._resume_checkpoint()
        if self._resume_from is not None:
            load_adapter_weights(self._resume_from, self.model)

    def _resume(self):
        if self.dist:
            if self._resume_from is None:
                return
            from .distributed import load_distributed_state
            ckpt, state = self._resume_from, load_distributed_state(self, self._resume_from)
        else:
            ckpt = self._resume_checkpoint()
            if ckpt is None:
                return
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        self.step = state["global_step"]
        self.history = state.get("history", [])
        self.train_seconds = state.get("train_seconds", 0.0)
        self.train_tokens = state.get("train_tokens", 0)
        self.log(f"resumed from {ckpt} at step {self.step}/{self.total_steps}")

    # -- evaluation -----------------------------------------------------------------
    def evaluate(self) -> dict | None:
        if not self.eval_examples:
            return None
        return holdout_perplexity(self.model, self.eval_examples, batch_size=self.cfg.training.batch_size,
                                  pad_id=self.tokenizer.pad_token_id, progress=True)

    # -- training ---------------------------------------------------------------------
    def _batch(self, rows) -> tuple[dict, int, float, bool]:
        """A micro-batch on the device: (inputs with labels, its tokens, loss weight across
        processes, whether it may run from a CUDA graph: no mask and no packing positions)."""
        scale = 1.0
        if self.dist:
            # This process's rows; the engine averages gradients over processes, so the summed
            # loss is scaled by their number. A process left without rows (a short last batch)
            # still runs one row, weighted 0, so the collectives line up.
            mine = self.dist.my_rows(rows)
            rows, scale = (mine, float(self.dist.world)) if mine else (rows[:1], 0.0)
        examples = [[self.train_examples[i] for i in row] for row in rows]
        batch = collate(examples, self.tokenizer.pad_token_id, self.cfg.data.packing)
        dev = self.device
        inputs = {"labels": batch["labels"].to(dev), "input_ids": batch["input_ids"].to(dev)}
        graphable = False
        if self.cfg.data.packing:   # boundaries from the positions (batching.py); transformers
            # reads them only when there is no attention mask and no cache
            inputs["position_ids"] = batch["position_ids"].to(dev)
            inputs["use_cache"] = False
        elif bool(batch["attention_mask"].all()):   # no padding: the causal mask alone (on the host, no sync)
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
        if self.dist:
            labels = inputs.pop("labels")
            loss = summed_nll(self.model, self.fused_loss, labels, **inputs) * weight
            self.dist.accelerator.backward(loss)
            return loss.detach(), ntok
        return self.run_batch(inputs, weight, graphable=graphable), ntok

    def _zero_grad(self) -> None:
        if self.flat:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _state(self) -> dict:
        return {"history": self.history, "config": self.cfg.model_dump(), "train_seconds": self.train_seconds,
                "train_tokens": self.train_tokens, "total_steps": self.total_steps}

    def _writes(self) -> bool:
        """Whether this process writes files (all but the first of several only compute)."""
        return self.dist is None or self.dist.is_main

    def save_checkpoint(self) -> Path:
        if self.dist:
            from .distributed import save_distributed_checkpoint
            return save_distributed_checkpoint(self)
        return save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler,
                               self._state(), keep=self.cfg.training.save_total_limit)

    def train(self) -> dict:
        from tqdm import tqdm

        tc = self.cfg.training
        self.out.mkdir(parents=True, exist_ok=True)
        if self._writes():
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
        tracker = Tracker(self.out, tc.report_to, self.cfg) if self._writes() else NullTracker()
        self.model.train()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batches = self._micro_batches(skip=self.step * tc.grad_accum)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not self._writes())
        window_loss, window_tokens, window_start = 0.0, 0, time.time()
        steps_in_window = 0
        try:
            while self.step < self.total_steps:
                t0 = time.time()
                micro = [next(batches) for _ in range(tc.grad_accum)]
                n_label = sum(self.label_counts[i] for _, rows in micro for row in rows for i in row)
                step_loss, step_tokens = 0.0, 0
                for epoch, rows in micro:
                    loss, ntok = self._forward_backward(rows, n_label)
                    step_loss += loss.item()
                    step_tokens += ntok
                if self.flat:
                    self.flat.check()
                if self.dist:   # the loss over all processes, and all their tokens
                    step_loss = self.dist.mean(step_loss)
                    step_tokens = round(self.dist.mean(step_tokens) * self.dist.world)
                    grad_norm = self.dist.clip_grad_norm(self.model, self.optimized, tc.max_grad_norm or 1e9)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.optimized, tc.max_grad_norm or float("inf"))
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
                    raise UserError(f"the loss became {step_loss} at step {self.step}; lower "
                                    f"training.learning_rate (now {tc.learning_rate}) and resume")
                if self.step % tc.logging_steps == 0 or self.step == self.total_steps:
                    elapsed = time.time() - window_start
                    record = {"step": self.step, "epoch": round(epoch + 0.0, 3),
                              "loss": window_loss / steps_in_window, "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    self.history.append(record)
                    tracker.log(record, self.step)
                    window_loss, window_tokens, steps_in_window, window_start = 0.0, 0, 0, time.time()
                if tc.eval_steps and self.step % tc.eval_steps == 0 and self.step < self.total_steps:
                    self._log_eval(tracker)
                if self.step % tc.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            self._zero_grad()
            path = self.save_checkpoint()
            tracker.close()
            raise UserError(f"interrupted at step {self.step}/{self.total_steps}; saved {path}. "
                            f"Continue with: qlora train --config {self.out / 'config.yaml'} --resume",
                            exit_code=130) from None
        except torch.OutOfMemoryError:
            bar.close()
            tracker.close()
            raise UserError(self._out_of_memory()) from None
        bar.close()
        final_eval = self._log_eval(tracker) if self.eval_examples else None
        tracker.close()
        return self._finish(final_eval)

    def _out_of_memory(self) -> str:
        """What to say when a step ran out of memory. The finished steps are saved first (the
        failed step's partial gradients dropped), so no finished work is lost."""
        peak = peak_memory_gib(self.device)
        self._zero_grad()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        saved = "nothing to save yet (no step finished)"
        if self.step > 0:
            try:
                saved = f"saved the {self.step} finished steps in {self.save_checkpoint()}"
            except (torch.OutOfMemoryError, OSError) as err:
                saved = f"could not save a checkpoint ({type(err).__name__})"
        text = (f"out of memory in step {self.step + 1}/{self.total_steps} (peak {peak:.2f} GiB on "
                f"{device_label(self.device)}); {saved}. To fit, try {memory_advice(self.cfg)}")
        if self.step > 0 and not self.cfg.training.gradient_checkpointing:
            text += (f"; with only --gradient_checkpointing true added, qlora train --config "
                     f"{self.out / 'config.yaml'} --resume continues from the saved steps")
        return text + " (a new batch size or sequence length reorders the data: use a new output.dir)"

    def _log_eval(self, tracker) -> dict:
        result = self.evaluate()
        record = {"step": self.step, "eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}
        self.history.append(record)
        tracker.log(record, self.step)
        return result

    def _finish(self, final_eval: dict | None) -> dict:
        final = self.out / "final_adapter"
        if self.dist:
            from .distributed import save_adapter
            save_adapter(self, final)
        else:
            self.model.save_pretrained(final, safe_serialization=True)
        if not self._writes():
            return {}
        self.tokenizer.save_pretrained(final)
        summary = {
            "steps": self.step, "train_seconds": round(self.train_seconds, 1),
            "tokens_per_s": round(self.train_tokens / max(self.train_seconds, 1e-9), 1),
            "train_loss_first": next((h["loss"] for h in self.history if "loss" in h), None),
            "train_loss_last": next((h["loss"] for h in reversed(self.history) if "loss" in h), None),
            "eval_loss": final_eval["loss"] if final_eval else None,
            "eval_perplexity": final_eval["perplexity"] if final_eval else None,
            "peak_memory_gib": round(peak_memory_gib(self.device), 2), "device": device_label(self.device),
            **self.data_stats,
        }
        write_model_card(final, self.cfg, summary)
        (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        self.log(f"final adapter: {final}")
        return summary
