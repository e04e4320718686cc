"""Reward functions for RL (models/rewards.py): the built-in examples, loading 'module:function' and
'file.py:function' specs, the checks on what a function returns, and the sum with a reward model."""

from __future__ import annotations

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.models.rewards import (
    brevity,
    distinct_words,
    function_rewards,
    is_builtin,
    load_reward_functions,
    total_rewards,
)


def one_line_error(specs: list[str]) -> str:
    with pytest.raises(UserError) as err:
        load_reward_functions(specs)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_the_built_in_examples():
    assert brevity(["q"] * 3, ["", "x" * 50, "y" * 400]) == [1.0, 0.75, 0.0]
    assert distinct_words(["q"] * 3, ["a b a b", "One one two", ""]) == [0.5, pytest.approx(2 / 3), 0.0]
    assert is_builtin("qlora_platform.models.rewards:brevity") and not is_builtin("my_rewards:brevity")


def test_functions_load_from_modules_and_files(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def polite(prompts, completions):\n    return [float('please' in c) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    fns = load_reward_functions(["qlora_platform.models.rewards:brevity", "my_rewards.py:polite"])
    assert [f.spec for f in fns] == ["qlora_platform.models.rewards:brevity", "my_rewards.py:polite"]
    assert fns[1](["q", "q"], ["please go", "go"]) == [1.0, 0.0]
    rewards = total_rewards(fns, ["q", "q"], ["please", "x" * 200])
    assert torch.allclose(rewards, torch.tensor([1.0 + (1 - 6 / 200), 0.0])) and rewards.dtype == torch.float32


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("brevity", "give 'module:function'"),
        ("qlora_platform.models.rewards:", "give 'module:function'"),
        (":brevity", "give 'module:function'"),
        ("qlora_platform.models.rewards:not-a-name", "give 'module:function'"),
        ("no_such_module_abc:fn", "no module 'no_such_module_abc'"),
        ("missing/rewards.py:fn", "file 'missing/rewards.py' not found"),
        ("qlora_platform.models.rewards:nothing_here", "qlora_platform.models.rewards has no 'nothing_here'"),
        ("qlora_platform.models.rewards:BUILTIN_PREFIX", "is a str, not a function"),
    ],
)
def test_bad_specs_are_one_line_each(spec, needle):
    text = one_line_error([spec])
    assert needle in text and "alignment.reward_functions" in text


def test_a_file_that_fails_to_import_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import not_installed_pkg_xyz\n")
    assert "importing" in one_line_error([f"{bad}:fn"]) and "not_installed_pkg_xyz" in one_line_error([f"{bad}:fn"])
    (tmp_path / "syntax.py").write_text("def f(:\n")
    assert "SyntaxError" in one_line_error([f"{tmp_path / 'syntax.py'}:f"])


@pytest.mark.parametrize(
    ("returned", "needle"),
    [
        ("[1.0]", "returned 1 values for 2 completions"),
        ("[1.0, float('nan')]", "returned nan; rewards must be finite"),
        ("[1.0, float('inf')]", "returned inf"),
        ("['a', 'b']", "must return a list of floats"),
        ("None", "must return a list of floats"),
        ("1 / 0", "raised ZeroDivisionError"),
    ],
)
def test_what_a_function_returns_is_checked_in_one_line(tmp_path, returned, needle):
    path = tmp_path / "r.py"
    path.write_text(f"def r(prompts, completions):\n    return {returned}\n")
    (fn,) = load_reward_functions([f"{path}:r"])
    with pytest.raises(UserError) as err:
        function_rewards(fn, ["q", "q"], ["a", "b"])
    assert needle in str(err.value) and f"{path}:r" in str(err.value) and "\n" not in str(err.value)


def test_a_reward_model_score_is_added():
    class Scores:
        def score(self, input_ids, attention_mask):
            return input_ids.float().sum(1)

    ids, mask = torch.tensor([[1, 2], [3, 0]]), torch.tensor([[1, 1], [1, 0]])
    fns = load_reward_functions(["qlora_platform.models.rewards:brevity"])
    rewards = total_rewards(fns, ["q", "q"], ["", ""], Scores(), ids, mask)
    assert rewards.tolist() == [1.0 + 3.0, 1.0 + 3.0]
    assert total_rewards([], ["q"], ["a"], Scores(), ids[:1], mask[:1]).tolist() == [3.0]
