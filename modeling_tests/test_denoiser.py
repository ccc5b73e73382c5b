"""The denoiser tower: joint attention over the context and the whole block, time conditioning, batching, and the
tower as a module of its own (`model.base_model`)."""

import torch
from conftest import clean_ids, left_pad

from transformers_twotower import TwoTowerDenoiser


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
    rows = [clean_ids(model, 1, n, seed=n)[0].tolist() for n in (3, 8, 5)]
    ids, mask = left_pad(rows)
    batch_cache = model.prefill(ids, attention_mask=mask)
    blocks = torch.tensor([[3, 3, 3, 3], [3, 21, 3, 9], [30, 3, 3, 3]])
    t = (blocks == 3).float().mean(-1)
    commit = clean_ids(model, 3, 4, seed=9)

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
    out = model.base_model(input_ids=block, context=cache.denoiser_context(4), t=t, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.denoiser_tower.embeddings(block), rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(out.last_hidden_state).float(), model.denoise_step(block, cache, t))

    # Training's view of a clean sequence: block 1 after context block 0 is the inference view after `ids[:, :4]`.
    clean = clean_ids(model, 2, 8, seed=1)
    training_view = model.context_tower.training_context(clean, torch.ones_like(clean), block_size=4)
    noisy = torch.cat([clean[:, :4], block], dim=1).view(4, 4)  # (B * nb, S), one row per block
    hidden = model.denoiser_tower(noisy, training_view, t.repeat_interleave(2)).last_hidden_state.view(2, 8, -1)
    inference = model.denoiser_tower(block, model.prefill(clean[:, :4]).denoiser_context(4), t).last_hidden_state
    torch.testing.assert_close(hidden[:, 4:], inference, rtol=1e-4, atol=1e-5)


def test_in_place_block_keys_equal_concatenation(model):
    """Eager inference writes each step's block K/V into the tail of the view's [context | block] buffers; with
    gradients on (or compiled) the context is concatenated instead. Both give the same logits, step after step,
    for all rows and for a subset of rows."""
    ids, mask = left_pad([clean_ids(model, 1, n, seed=n)[0].tolist() for n in (3, 8, 5)])
    cache = model.prefill(ids, attention_mask=mask)
    view = cache.denoiser_context(4)
    assert set(view.joint_keys) == set(view.keys) and view.joint_keys
    for layer, buffer in view.joint_keys.items():
        assert buffer.shape[2] == view.keys[layer].shape[2] + 4
        assert view.keys[layer].data_ptr() == buffer.data_ptr()  # the context K/V are a view of the buffer
    rows = torch.tensor([2, 0])
    for step, block in enumerate([[3, 3, 3, 3], [3, 17, 3, 3], [21, 17, 3, 9]]):
        block = torch.tensor([block] * 3)
        t = (block == 3).float().mean(-1)
        for buffer in view.joint_keys.values():
            buffer[:, :, -4:] = float("nan")
        with torch.no_grad():
            in_place = model.denoise_step(block, cache, t)
        # The eager no-grad step really wrote its block's keys into the buffers (nothing else reads the tail).
        assert not any(buffer[:, :, -4:].isnan().any() for buffer in view.joint_keys.values())
        with torch.no_grad():
            some_rows = model.denoise_step(block[rows], cache, t[rows], rows=rows)
        with torch.enable_grad():
            concatenated = model.denoise_step(block, cache, t).detach()
        torch.testing.assert_close(in_place, concatenated, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(some_rows, concatenated[rows], rtol=1e-5, atol=1e-5)
