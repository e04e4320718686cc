"""The set-up every trainer on preference pairs shares (reward, DPO, ORPO).

    class DPOTrainer(PairTrainer):
        window = _Window           # collects the per-pair figures between log lines

The data step loads the pairs of data.train_file and data.eval_file (refusing another record
kind with one line), encodes them (the prompt cut from its start to fit data.max_seq_len, a
pair whose longer answer does not fit dropped) and plans each pair by its longer row, weighing
one in the loss (a mean over pairs).
"""

from __future__ import annotations

from ..data.preference import load_kind_records
from ..data.preference_tokenize import encode_pairs
from ..errors import UserError
from ..models.loader import load_tokenizer
from .preference import check_record_kind
from .trainer import Trainer


class PairTrainer(Trainer):
    """A Trainer whose data are preference pairs; subclasses set `window` and the loss."""

    window: type

    def _setup_data(self) -> None:
        cfg = self.cfg
        for what in ("train_file", "eval_file"):
            check_record_kind(getattr(cfg.data, what), what, cfg.training.method)
        train_records = load_kind_records(cfg.data.train_file, "train_file", "preference")
        eval_records = load_kind_records(cfg.data.eval_file, "eval_file", "preference") if cfg.data.eval_file else []
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_examples, dropped = encode_pairs(self.tokenizer, train_records, cfg.data.max_seq_len)
        self.eval_examples, eval_dropped = encode_pairs(self.tokenizer, eval_records, cfg.data.max_seq_len)
        truncated = self._count_data(len(train_records), dropped + eval_dropped)
        self.log(
            f"data: {len(self.train_examples)} training pairs ({truncated} with the prompt cut to fit "
            f"{cfg.data.max_seq_len} tokens, {dropped} dropped whose answer does not fit), "
            f"{len(self.eval_examples)} holdout pairs"
        )
        if not self.train_examples:
            raise UserError(
                f"no usable preference pair in '{cfg.data.train_file}' (no answer fits in "
                f"data.max_seq_len {cfg.data.max_seq_len}; raise it)"
            )
        self._window = self.window()

    def _lengths_and_weights(self) -> tuple[list[int], list[int]]:
        """Each pair is planned by its longer row and weighs one in the loss (a mean over pairs)."""
        lengths = [max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) for ex in self.train_examples]
        return lengths, [1] * len(self.train_examples)
