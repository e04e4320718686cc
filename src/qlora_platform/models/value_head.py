"""The scalar head on a model's final hidden states: the reward model's score and PPO's value.

    head = ScalarHead(hidden_size).to(device)
    hidden = final_hidden(peft_model, input_ids, attention_mask)         # [B, T, H]
    reward = head(last_token_hidden(hidden, attention_mask))             # [B] float32
    save_head(head, folder); head = load_head(folder, hidden_size)      # folder/scalar_head.safetensors

The head is one Linear(hidden_size, 1) kept in float32 whatever the base computes in, so its
small updates are not rounded away in bf16. It is saved beside a LoRA adapter as HEAD_FILE
(safetensors: tensors only, nothing that runs code when read back).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

HEAD_FILE = "scalar_head.safetensors"


class ScalarHead(nn.Module):
    """Linear(hidden_size, 1) in float32: hidden states [..., H] to scalars [...]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # Scores start near N(0, 1) on unit-scale (normalised) hidden states; no offset.
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, H]: each row's hidden state at its last attended token (the row's last 1 in the mask)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (attention_mask.to(positions.device).long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last.to(hidden.device)]


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] final hidden states (after the last norm) of a PEFT or plain causal LM, with the
    adapter that is active; the output head is skipped, so no logits are made."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def save_head(head: ScalarHead, folder: Path) -> None:
    """folder/HEAD_FILE with the head's weight and bias."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().float().cpu().contiguous() for name, t in head.linear.state_dict().items()}
    save_file(tensors, str(Path(folder) / HEAD_FILE), metadata={"hidden_size": str(head.hidden_size)})


def load_head(folder: Path, hidden_size: int) -> ScalarHead:
    """The head saved in `folder` (on the CPU), for a base of `hidden_size`; one line when it is
    missing or was trained on a base of another hidden size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise UserError(
            f"'{folder}' has no {HEAD_FILE}: it is not the adapter of a training.method reward run; point at "
            f"<reward run>/final_adapter (or one of its checkpoint-N)"
        )
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}); train the reward model again") from None
    weight = tensors.get("weight")
    if weight is None or "bias" not in tensors or weight.dim() != 2 or weight.size(0) != 1:
        raise UserError(f"{path} is not a scalar head (it needs a [1, hidden] weight and a bias)")
    if weight.size(1) != hidden_size:
        raise UserError(
            f"{path} was trained on a base of hidden size {weight.size(1)}, this base has {hidden_size}; "
            f"use a reward model trained on the same base model"
        )
    head = ScalarHead(hidden_size)
    head.linear.load_state_dict({"weight": weight.float(), "bias": tensors["bias"].float()})
    return head
