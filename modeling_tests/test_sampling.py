"""The commit rule and the prediction step on hand-made tensors, and the block loop on a mock model."""

import pytest
import torch
from transformers import PretrainedConfig

from transformers_twotower import TwoTowerGenerationMixin
from transformers_twotower.generation_config_twotower import TwoTowerGenerationConfig
from transformers_twotower.sampling_twotower import commit_mask, num_to_commit, predict_tokens


def run_block(confidences, steps, threshold):
    """Fill one block with the commit rule alone; returns the number of steps used and the commit order."""
    masked = torch.ones_like(confidences, dtype=torch.bool)
    order = []
    for step in range(steps):
        if not masked.any():
            return step, order
        commit = commit_mask(confidences, masked, step, steps, threshold)
        assert not (commit & ~masked).any(), "a committed position was committed again"
        order.append(commit[0].nonzero()[:, 0].tolist())
        masked &= ~commit
    assert not masked.any(), "the last step must commit everything"
    return steps, order


def test_threshold_above_one_commits_one_token_per_step():
    confidences = torch.tensor([[0.99, 0.2, 1.0, 0.5]])
    used, order = run_block(confidences, steps=4, threshold=1.01)
    assert used == 4
    assert order == [[2], [0], [3], [1]]  # most confident first


def test_threshold_zero_fills_the_block_in_one_step():
    used, order = run_block(torch.tensor([[0.3, 0.01, 0.6, 0.2]]), steps=4, threshold=0.0)
    assert used == 1 and order == [[0, 1, 2, 3]]


def test_last_step_commits_everything_and_even_share_keeps_pace():
    # 8 positions, 2 steps, nothing confident: ceil(8 / 2) = 4 at step 0, the rest at the last step.
    used, order = run_block(torch.full((1, 8), 0.1), steps=2, threshold=0.9)
    assert used == 2 and [len(o) for o in order] == [4, 4]
    assert num_to_commit(torch.tensor([5]), torch.tensor([0]), 0, 2).item() == 3
    assert num_to_commit(torch.tensor([5]), torch.tensor([4]), 0, 4).item() == 4
    assert num_to_commit(torch.tensor([3]), torch.tensor([0]), 3, 4).item() == 3  # last step
    assert num_to_commit(torch.tensor([0]), torch.tensor([0]), 0, 4).item() == 0  # nothing left


def test_confident_positions_are_committed_together():
    confidences = torch.tensor([[0.95, 0.1, 0.91, 0.2]])
    commit = commit_mask(confidences, torch.ones(1, 4, dtype=torch.bool), 0, 4, 0.9)
    assert commit[0].tolist() == [True, False, True, False]


def test_ties_go_to_the_leftmost_position():
    masked = torch.tensor([[False, True, True, True, True]])
    commit = commit_mask(torch.full((1, 5), 0.5), masked, 0, 4, 0.9)  # ceil(4 / 4) = 1
    assert commit[0].tolist() == [False, True, False, False, False]
    commit = commit_mask(torch.full((1, 5), 0.5), masked, 0, 2, 0.9)  # ceil(4 / 2) = 2
    assert commit[0].tolist() == [False, True, True, False, False]


def test_rows_are_independent():
    confidences = torch.tensor([[0.95, 0.1, 0.2, 0.3], [0.1, 0.1, 0.1, 0.1]])
    masked = torch.tensor([[True, True, True, True], [False, False, True, False]])
    commit = commit_mask(confidences, masked, 0, 4, 0.9)
    assert commit.tolist() == [[True, False, False, False], [False, False, True, False]]


def test_predict_never_returns_the_mask_and_measures_unscaled_confidence():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 9.0], [3.0, 0.0, 0.0, 0.0]]])
    pred, confidence, _ = predict_tokens(logits, mask_token_id=3)
    assert pred.tolist() == [[2, 0]]
    without_mask = logits[..., :3].softmax(-1)
    torch.testing.assert_close(confidence, without_mask.max(-1).values)

    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.5), TopKLogitsWarper(1)])
    sampled, sampled_confidence, _ = predict_tokens(logits, 3, warpers, torch.Generator().manual_seed(0))
    assert sampled.tolist() == [[2, 0]]  # top-1 leaves one choice
    torch.testing.assert_close(sampled_confidence, confidence)  # measured on the unscaled distribution


class MockState:
    """A decode state that only knows its rows."""

    def __init__(self, batch_size, max_length, block_size, keep_behind, device):
        self.batch_size, self.max_length, self.block_size, self.keep_behind = (
            batch_size,
            max_length,
            block_size,
            keep_behind,
        )
        self.device, self.next_token_logits = torch.device(device), None

    def copy_rows_from(self, other, rows):
        return self


class MockSteps:
    """Random logits; `calls` records each step's kind and token count, `rows` the rows each denoiser call computed."""

    compiled = False

    def __init__(self, model):
        self.model = model

    def extend(self, state, token_ids, keep_behind=False):
        self.model.calls.append(("extend", token_ids.shape[1]))

    def denoise(self, state, block_ids, t, behind=False):
        self.model.calls.append(("denoise", block_ids.shape[1]))
        self.model.rows_computed.append(block_ids.shape[0])
        return torch.randn(*block_ids.shape, self.model.vocab, generator=self.model.generator) * 3


class MockTwoTower(TwoTowerGenerationMixin):
    """The generation loop with a fake model: random logits, a state that only counts."""

    def __init__(self, vocab=16, seed=0):
        self.generation_config = TwoTowerGenerationConfig(mask_token_id=3, pad_token_id=0, eos_token_id=None)
        self.config = PretrainedConfig(vocab_size=vocab)
        self.vocab = vocab
        self.generator = torch.Generator().manual_seed(seed)
        self.calls, self.rows_computed = [], []

    def new_decode_state(self, batch_size, max_length, block_size=None, keep_behind=True, device=None):
        return MockState(batch_size, max_length, block_size, keep_behind, device)

    def prefill(self, input_ids, attention_mask=None, keep_behind=True, max_length=None, state=None):
        self.calls.append(("prefill", input_ids.shape[1]))
        return state

    def decode_steps(self, compile_config=None):
        return MockSteps(self)


def test_committed_tokens_never_change_and_every_block_is_filled():
    model = MockTwoTower(seed=2)  # a seed whose rows fill their blocks in different numbers of steps
    out = model.generate(
        torch.tensor([[5, 6, 7], [8, 9, 10]]),
        max_new_tokens=8, block_size=4, steps_per_block=4, confidence_threshold=0.5,
        return_dict_in_generate=True, output_history=True,
    )  # fmt: skip
    history = out.history
    for before, after in zip(history, history[1:]):
        if before["block"] != after["block"]:
            continue
        committed_before = before["tokens"] != 3
        assert torch.equal(after["tokens"][committed_before], before["tokens"][committed_before])
        newly = (after["tokens"] != 3) & ~committed_before
        assert torch.equal(newly, before["committed"])
    assert (out.sequences[:, 3:] != 3).all() and out.sequences.shape == (2, 11)
    assert [c for c in model.calls if c[0] != "denoise"] == [("prefill", 3), ("extend", 4)]
    # NFE against the forwards the model ran: every forward computes both rows (none has finished), and a row counts
    # those in which something of its block was still masked; the rows fill their blocks in different numbers of steps.
    assert model.rows_computed == [2] * len(history) and out.nfe[0] != out.nfe[1]
    assert out.nfe.tolist() == [len([h for h in history if h["t"][i] > 0]) for i in range(2)]
    assert out.nfe.max() == len(history)


def test_the_mixin_requires_the_host_interface():
    """A class that mixes in `TwoTowerGenerationMixin` without `GenerationHost`'s methods is refused when it is
    defined, naming what it lacks (instead of an AttributeError in the middle of `generate`)."""
    with pytest.raises(TypeError, match=r"\['decode_steps'\]"):

        class NoSteps(TwoTowerGenerationMixin):
            def new_decode_state(self, batch_size, max_length, block_size=None, keep_behind=True, device=None): ...

            def prefill(self, input_ids, attention_mask=None, keep_behind=True, max_length=None, state=None): ...


def test_the_release_functions_are_generate_release_with_the_mode():
    """The three release functions are one: each runs `generate` in its mode with the release's defaults (for mask
    diffusion the release's threshold 0.9 and its EOS rule, the block kept whole); past `max_new_tokens` they take
    keywords, so a call written for another function's positions is refused instead of mis-read."""
    seen = []
    model = MockTwoTower()
    model.generate = lambda input_ids, generation_config, **kwargs: seen.append(generation_config) or input_ids
    ids = torch.tensor([[5, 6, 7]])
    model.generate_mask_diffusion(ids, 8, block_size=4)
    model.generate_ar(ids, 8, temperature=0.5, top_p=0.9)
    model.generate_mock_ar(ids, 8)
    diffusion, ar, mock_ar = seen
    assert (diffusion.generation_mode, diffusion.confidence_threshold, diffusion.keep_eos_block) == (
        "mask_diffusion", 0.9, True
    )  # fmt: skip
    assert (diffusion.block_size, diffusion.steps_per_block, diffusion.do_sample) == (4, 16, False)
    assert (ar.generation_mode, ar.do_sample, ar.temperature, ar.top_p) == ("ar", True, 0.5, 0.9)
    assert (mock_ar.generation_mode, mock_ar.keep_eos_block, mock_ar.max_new_tokens) == ("mock_ar", None, 8)
    with pytest.raises(TypeError):
        model.generate_mask_diffusion(ids, 8, 4)  # the release's block_size, positionally
    with pytest.raises(ValueError, match="step_callback"):
        model.generate_ar(ids, 8, step_callback=print)
    with pytest.raises(ValueError, match=r"\['block_size', 'confidence_threshold'\]"):
        model.generate_mock_ar(ids, 8, confidence_threshold=5.0, block_size=4)  # mask diffusion's, not ignored
