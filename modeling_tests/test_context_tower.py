"""The context tower and its cache: prefill, extension, the view one token behind, agreement with Nemotron-H."""

import pytest
import torch
from conftest import clean_ids, denoiser_as_context_copy, left_pad, tiny_model

from transformers_twotower import TwoTowerCache
from transformers_twotower.layout_twotower import context_tower_as_nemotron_h


def assert_same_context(a: TwoTowerCache, b: TwoTowerCache, atol=1e-5):
    for i in a.attention_layers:
        torch.testing.assert_close(a.layers[i].keys, b.layers[i].keys, rtol=1e-4, atol=atol)
        torch.testing.assert_close(a.layers[i].values, b.layers[i].values, rtol=1e-4, atol=atol)
    for (conv_a, ssm_a), (conv_b, ssm_b) in zip(a.mamba_states().values(), b.mamba_states().values()):
        torch.testing.assert_close(conv_a, conv_b, rtol=1e-4, atol=atol)
        torch.testing.assert_close(ssm_a, ssm_b, rtol=1e-4, atol=atol)
    torch.testing.assert_close(a.next_token_logits, b.next_token_logits, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("block", [1, 3, 6])
def test_extend_context_equals_prefill_of_longer_sequence(model, block):
    ids = clean_ids(model, 2, 7 + block)
    extended = model.extend_context(model.prefill(ids[:, :7]), ids[:, 7:])
    assert_same_context(extended, model.prefill(ids))
    assert extended.num_context_tokens == ids.shape[1]


def test_one_pass_prefill_equals_the_two_pass_one(model):
    """`keep_behind=False` (diffusion and AR modes) reads the prompt in one pass: same cache, no states behind."""
    ids, mask = left_pad([clean_ids(model, 1, n, seed=n)[0].tolist() for n in (4, 9)])
    one_pass = model.prefill(ids, mask, keep_behind=False)
    assert one_pass.mamba_states_behind is None and one_pass.num_context_tokens == 9
    assert_same_context(one_pass, model.prefill(ids, mask))


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
