"""The denoiser tower: joint attention over the context and the whole block, time conditioning, batching, and the
tower as a module of its own (`model.base_model`)."""

import torch
from conftest import clean_ids, left_pad

from transformers_twotower import TwoTowerDenoiser
from transformers_twotower.decoding_twotower import denoiser_context


def test_every_block_position_sees_every_other(model):
    cache = model.prefill(clean_ids(model, 1, 6))
    block = torch.tensor([[3, 17, 3, 3]])
    t = torch.tensor([0.75])
    base = model.denoise_step(block, cache, t)
    for j in range(4):
        changed = block.clone()
        changed[0, j] = 40 + j
        delta = (model.denoise_step(changed, cache, t) - base).abs().amax(-1)[0]  # (L,)
        assert (delta > 1e-4).all(), f"changing position {j} left some position unchanged: {delta}"


def test_time_conditioning_changes_the_output(model):
    cache = model.prefill(clean_ids(model, 1, 6))
    block = torch.tensor([[3, 17, 3, 3]])
    a = model.denoise_step(block, cache, torch.tensor([0.75]))
    b = model.denoise_step(block, cache, torch.tensor([0.25]))
    c = model.denoise_step(block, cache, None)
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_left_padded_batch_gives_each_row_its_own_result(model):
    """Prefill, a denoiser step, Mock-AR's step behind and an extension: each row of a left-padded batch gets what it
    gets alone, a one-token prompt included (its context behind is empty: padding keys must stay invisible)."""
    rows = [clean_ids(model, 1, n, seed=n)[0].tolist() for n in (3, 8, 1, 5)]
    ids, mask = left_pad(rows)
    batch_cache = model.prefill(ids, attention_mask=mask)
    blocks = torch.tensor([[3, 3, 3, 3], [3, 21, 3, 9], [3, 3, 17, 3], [30, 3, 3, 3]])
    t = (blocks == 3).float().mean(-1)
    commit = clean_ids(model, 4, 4, seed=9)

    batch_step = model.denoise_step(blocks, batch_cache, t)
    batch_behind = model.denoise_step(ids[:, -1:], batch_cache, None, behind=True)
    model.extend_context(batch_cache, commit)
    batch_after = model.denoise_step(blocks, batch_cache, t)
    for i, row in enumerate(rows):
        cache = model.prefill(torch.tensor([row]))
        torch.testing.assert_close(
            batch_cache.next_token_logits[i],
            model.extend_context(model.prefill(torch.tensor([row])), commit[i : i + 1]).next_token_logits[0],
            rtol=1e-4,
            atol=1e-5,
        )
        torch.testing.assert_close(
            batch_step[i], model.denoise_step(blocks[i : i + 1], cache, t[i : i + 1])[0], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            batch_behind[i],
            model.denoise_step(torch.tensor([row[-1:]]), cache, None, behind=True)[0],
            rtol=1e-4,
            atol=1e-5,
        )
        model.extend_context(cache, commit[i : i + 1])
        torch.testing.assert_close(
            batch_after[i], model.denoise_step(blocks[i : i + 1], cache, t[i : i + 1])[0], rtol=1e-4, atol=1e-5
        )


def test_the_denoiser_tower_is_callable_on_a_block_and_a_context(model):
    """`model.base_model` is the denoiser tower: called on noisy blocks and a context view (from the cache at
    inference, from the context tower in training), its hidden states under the head are `denoise_step`'s logits."""
    assert model.base_model is model.denoiser_tower and isinstance(model.denoiser_tower, TwoTowerDenoiser)
    ids, block, t = clean_ids(model, 2, 6), torch.tensor([[3, 17, 3, 3], [3, 3, 3, 9]]), torch.tensor([0.75, 0.75])
    cache = model.prefill(ids)
    out = model.base_model(input_ids=block, context=denoiser_context(cache, 4, False), t=t, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.denoiser_tower.embeddings(block), rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(out.last_hidden_state).float(), model.denoise_step(block, cache, t))

    # Training's view of a clean sequence: block 1 after context block 0 is the inference view after `ids[:, :4]`.
    clean = clean_ids(model, 2, 8, seed=1)
    training_view = model.context_tower.training_context(clean, torch.ones_like(clean), block_size=4)
    noisy = torch.cat([clean[:, :4], block], dim=1).view(4, 4)  # (B * nb, S), one row per block
    hidden = model.denoiser_tower(noisy, training_view, t.repeat_interleave(2)).last_hidden_state.view(2, 8, -1)
    inference = model.denoiser_tower(
        block, denoiser_context(model.prefill(clean[:, :4]), 4, False), t
    ).last_hidden_state
    torch.testing.assert_close(hidden[:, 4:], inference, rtol=1e-4, atol=1e-5)


def test_block_keys_are_written_at_the_block_region_and_gradients_flow(model):
    """A denoiser step writes its block's K/V at the state's block region only (the context K/V stay as the context
    tower wrote them), and the same step with gradients on gives the same logits, for a whole block and for one token
    (a one-token block with grad enabled once failed on mismatched shapes)."""
    ids, mask = left_pad([clean_ids(model, 1, n, seed=n)[0].tolist() for n in (3, 8, 5)])
    state = model.prefill(ids, attention_mask=mask, max_length=12)
    context_keys = {i: k[:, :, : state.max_length].clone() for i, k in state.keys.items()}
    for block in ([[3, 3, 3, 3]] * 3, [[3, 17, 3, 3]] * 3, [[21], [17], [3]]):
        block = torch.tensor(block)
        t = (block == 3).float().mean(-1)
        for buffer in state.keys.values():
            buffer[:, :, state.max_length :] = 1234.5  # finite: a masked key must not turn the scores into NaN
        with torch.no_grad():
            logits = model.denoise_step(block, state, t)
        written = range(state.max_length + 4 - block.shape[1], state.max_length + 4)
        for i, buffer in state.keys.items():
            assert (buffer[:, :, written] != 1234.5).all(), "the block's keys were not written where they belong"
            assert torch.equal(buffer[:, :, : state.max_length], context_keys[i]), "the context was written"
        with torch.enable_grad():
            trained = model.denoise_step(block, state, t)
            trained.sum().backward()  # the state's buffers took no part in the graph: they were not written
        attention = [layer.mixer for layer in model.denoiser_tower.layers if layer.block_type == "full_attention"]
        assert all(
            mixer.k_proj.weight.grad.abs().sum() > 0 for mixer in attention
        )  # the block's keys are in the graph
        torch.testing.assert_close(trained.detach(), logits, rtol=1e-5, atol=1e-5)
        assert not any(buffer.requires_grad for buffer in state.keys.values())
    model.zero_grad(set_to_none=True)
