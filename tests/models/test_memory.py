import pytest
from transformers import MistralConfig

from qlora_platform.config import load_config
from qlora_platform.errors import UserError
from qlora_platform.models.memory import GIB, check_fits, estimate_training_memory
from qlora_platform.train.synthetic import SHAPES

MISTRAL = MistralConfig(**SHAPES["mistral-7b"])


def _cfg(**kw):
    return load_config("configs/mistral-7b.yaml", kw)


def test_estimate_matches_the_measured_7b_anchor():
    # Measured on an H100 (shared/device anchors) with peft's fp32 norms: 7.17 GiB at b2 x s1024,
    # 8.09 GiB at b1 x s2048, 48.5 GiB at b4 x s4096.
    est = estimate_training_memory(MISTRAL, _cfg(fp32_norms=True, offload_checkpoints=False))["total"] / GIB
    assert 7.17 * 0.85 < est < 7.17 * 1.15, est
    est = (
        estimate_training_memory(
            MISTRAL, _cfg(fp32_norms=True, offload_checkpoints=False, batch_size=1, max_seq_len=2048)
        )["total"]
        / GIB
    )
    assert 8.09 * 0.85 < est < 8.09 * 1.15, est
    est = (
        estimate_training_memory(
            MISTRAL, _cfg(fp32_norms=True, offload_checkpoints=False, batch_size=4, max_seq_len=4096)
        )["total"]
        / GIB
    )
    assert 48.5 * 0.85 < est < 48.5 * 1.15, est


@pytest.mark.parametrize("batch, seq, measured", [(2, 1024, 5.39), (1, 2048, 5.40), (4, 4096, 14.47)])
def test_estimate_matches_the_16bit_peft_path_within_10_percent(batch, seq, measured):
    # benchmarks/results/train_throughput.jsonl, run h100-20261125-b (PEFT's layers, plain checkpointing).
    cfg = _cfg(batch_size=batch, max_seq_len=seq, fast_kernels=False, offload_checkpoints=False)
    est = estimate_training_memory(MISTRAL, cfg)["total"] / GIB
    assert measured <= est < measured * 1.10, est


@pytest.mark.parametrize(
    "batch, seq, measured, overrides",
    [
        (2, 1024, 4.73, {}),
        (1, 2048, 4.73, {}),
        (4, 4096, 7.64, {}),
        (4, 4096, 7.60, {"fp8": True, "fp8_input_grad": True}),
    ],
)
def test_estimate_matches_the_fast_gpu_path_within_10_percent(batch, seq, measured, overrides):
    # benchmarks/results/train_throughput.jsonl: runs h100-20261125-x and -y (the GPU default: fast kernels,
    # offloaded checkpoints with attention kept, flat adapter, CUDA graphs) and probe-d for fp8.
    est = estimate_training_memory(MISTRAL, _cfg(batch_size=batch, max_seq_len=seq, **overrides))["total"] / GIB
    assert measured * 0.98 <= est < measured * 1.10, est


def test_estimate_moves_the_right_way():
    base = estimate_training_memory(MISTRAL, _cfg())["total"]
    assert estimate_training_memory(MISTRAL, _cfg(gradient_checkpointing=False))["total"] > base
    assert estimate_training_memory(MISTRAL, _cfg(batch_size=4))["total"] > base
    assert estimate_training_memory(MISTRAL, _cfg(r=64))["total"] > base


def test_check_fits_refuses_with_advice():
    cfg = _cfg(batch_size=8, max_seq_len=4096, gradient_checkpointing=False)
    est = estimate_training_memory(MISTRAL, cfg)
    with pytest.raises(
        UserError,
        match=r"needs about .* GiB but RTX 4060 has 7.6 GiB free; try "
        r"--gradient_checkpointing true or --batch_size 4",
    ):
        check_fits(est, int(7.6 * GIB), "RTX 4060", cfg)
    check_fits(estimate_training_memory(MISTRAL, _cfg()), int(70 * GIB), "H100", _cfg())


def test_sharded_strategies_split_weights_adapter_and_optimizer():
    one = estimate_training_memory(MISTRAL, _cfg())
    ddp = estimate_training_memory(MISTRAL, _cfg(strategy="ddp"), processes=2)
    fsdp = estimate_training_memory(MISTRAL, _cfg(strategy="fsdp"), processes=2)
    assert ddp["weights_4bit"] == one["weights_4bit"]  # DDP: a full copy each
    assert fsdp["weights_4bit"] < 0.6 * one["weights_4bit"]  # half, plus one gathered block
    assert fsdp["optimizer_state"] == one["optimizer_state"] / 2
    assert ddp["activations_kept"] > one["activations_kept"]  # no offloading with several processes


def test_the_cpu_estimate_is_near_the_measured_peak_resident_memory():
    """SmolLM2-135M preset on the CPU (b4 x s384 packed, no checkpointing, bf16 compute, fp32 norms):
    the process peaked at 5.87 GiB resident (docs/lab-log.md); the estimate used to assume a GPU (1.5 GiB)."""
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    cfg = load_config("configs/smollm2-135m.yaml", {"compute_dtype": "bfloat16"})
    est = estimate_training_memory(smollm2, cfg, device="cpu")["total"] / GIB
    assert 5.87 * 0.8 < est < 5.87 * 1.1, est
    assert estimate_training_memory(smollm2, cfg, device="cuda")["total"] / GIB < 2.5


def test_preference_and_rl_methods_count_their_rows_and_full_logits():
    from qlora_platform.models.memory import micro_batch_rows

    dpo = load_config("configs/mistral-7b-dpo.yaml")
    assert micro_batch_rows(dpo) == 4  # 2 pairs: their chosen and rejected rows
    assert micro_batch_rows(_cfg(method="grpo", batch_size=1, num_generations=6)) == 6
    est, sft = estimate_training_memory(MISTRAL, dpo), estimate_training_memory(MISTRAL, _cfg(batch_size=4))
    assert est["activations_kept"] == sft["activations_kept"]  # the same rows of 1024 tokens
    assert est["logits_and_loss"] > 4 * sft["logits_and_loss"]  # answers are scored from full logits
    assert est["total"] < 7.5 * GIB, est["total"] / GIB
