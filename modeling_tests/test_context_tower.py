"""The context tower and its decode state: prefill, extension, the states one token behind, agreement with
Nemotron-H."""

import pytest
import torch
from conftest import clean_ids, denoiser_as_context_copy, left_pad, tiny_model

from transformers_twotower import TwoTowerDecodeState
from transformers_twotower.layout_twotower import context_tower_as_nemotron_h


def assert_same_context(a: TwoTowerDecodeState, b: TwoTowerDecodeState, atol=1e-5):
    """The same context in two states: K/V at the real positions written so far, Mamba states, next-token logits."""
    assert a.num_written == b.num_written and int(a.length) == int(b.length) == a.num_written
    written = slice(0, a.num_written)
    assert torch.equal(a.key_real[:, written], b.key_real[:, written])
    real = a.key_real[:, None, written, None]
    for i in a.keys:
        for mine, theirs in ((a.keys[i], b.keys[i]), (a.values[i], b.values[i])):
            torch.testing.assert_close(mine[:, :, written] * real, theirs[:, :, written] * real, rtol=1e-4, atol=atol)
    for i in a.conv:
        torch.testing.assert_close(a.conv[i], b.conv[i], rtol=1e-4, atol=atol)
        torch.testing.assert_close(a.ssm[i], b.ssm[i], rtol=1e-4, atol=atol)
    torch.testing.assert_close(a.next_token_logits, b.next_token_logits, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("block", [1, 3, 6])
def test_extend_context_equals_prefill_of_longer_sequence(model, block):
    ids = clean_ids(model, 2, 7 + block)
    extended = model.extend_context(model.prefill(ids[:, :7], max_length=16), ids[:, 7:])
    assert_same_context(extended, model.prefill(ids, max_length=16))


def test_one_pass_prefill_equals_the_two_pass_one(model):
    """`keep_behind=False` (diffusion and AR modes) reads the prompt in one pass: the same context, and no states
    one token behind to read."""
    ids, mask = left_pad([clean_ids(model, 1, n, seed=n)[0].tolist() for n in (4, 9)])
    one_pass = model.prefill(ids, mask, keep_behind=False)
    assert not one_pass.conv_behind and not one_pass.behind_ready
    two_pass = model.prefill(ids, mask)
    assert_same_context(one_pass, two_pass)
    assert two_pass.behind_ready
    # The two-pass prefill's states behind are the one-pass states of the prompt without its last token.
    behind = model.prefill(ids[:, :-1], mask[:, :-1], keep_behind=False)
    for i in behind.conv:
        torch.testing.assert_close(two_pass.conv_behind[i], behind.conv[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(two_pass.ssm_behind[i], behind.ssm[i], rtol=1e-4, atol=1e-5)


def test_forward_last_logits_equal_prefill(model):
    ids = clean_ids(model, 2, 9)
    torch.testing.assert_close(model(ids).logits[:, -1], model.prefill(ids).next_token_logits, rtol=1e-4, atol=1e-5)


def test_context_tower_matches_transformers_nemotron_h(model):
    """The context tower is transformers' Nemotron-H once its dt clamp follows `time_step_limit`."""
    reference = context_tower_as_nemotron_h(model)
    ids = clean_ids(model, 2, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_one_token_prompt_and_the_empty_context_behind_it():
    """A one-token prompt: the prefill's logits are the context tower's on that token, and Mock-AR's view one token
    behind is the empty context (zero Mamba states, no K/V). With the context tower's weights in the denoiser, Mock-AR
    over the token then computes exactly what the context tower computes."""
    model = denoiser_as_context_copy(tiny_model())
    ids = clean_ids(model, 2, 1)
    cache = model.prefill(ids)
    reference = model(ids).logits[:, -1]
    torch.testing.assert_close(cache.next_token_logits, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        model.denoise_step(ids, cache, None, behind=True)[:, -1], reference, rtol=1e-4, atol=1e-5
    )


def test_bad_prompts_are_rejected(model):
    ids = clean_ids(model, 2, 5)
    right_padded = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="LEFT padding"):
        model.prefill(ids, attention_mask=right_padded)
    with pytest.raises(ValueError, match="attention_mask"):
        model.prefill(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model.prefill(ids[:, :0])
    cache = model.prefill(ids)
    with pytest.raises(ValueError, match="block_ids"):
        model.denoise_step(ids[:1], cache, None)
    with pytest.raises(ValueError, match="`t`"):
        model.denoise_step(ids, cache, torch.ones(3))
    model.extend_context(cache, ids)
    with pytest.raises(ValueError, match="one token behind"):
        model.denoise_step(ids[:, :1], cache, None, behind=True)
    with pytest.raises(ValueError, match="does not fit the decode state"):
        model.extend_context(cache, clean_ids(model, 2, cache.max_length))
