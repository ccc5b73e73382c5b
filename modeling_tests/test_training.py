"""Training: the block-wise masked-diffusion loss against inference, its masking, and what it trains."""

import dataclasses

import pytest
import torch
from conftest import clean_ids, left_pad, tiny_model

from transformers_twotower import TwoTowerContextTower


def test_one_pass_training_context_equals_reading_the_sequence_block_by_block(model):
    """One causal pass records the Mamba states at every block start; they equal the states of a cache that reads
    the sequence one block at a time (the reference), left padding included, as do all K/V."""
    S = model.config.block_size
    rows = [clean_ids(model, 1, 3 * S, seed=1)[0].tolist(), clean_ids(model, 1, 3 * S - 3, seed=2)[0].tolist()]
    ids, mask = left_pad(rows)
    view = model.context_tower.training_context(ids, mask, S)

    state = model.new_decode_state(2, 3 * S, keep_behind=False)
    starts = [({i: c.clone() for i, c in state.conv.items()}, {i: h.clone() for i, h in state.ssm.items()})]
    model.prefill(ids[:, :S], mask[:, :S], keep_behind=False, state=state)
    for b in range(1, 3):
        starts.append(({i: c.clone() for i, c in state.conv.items()}, {i: h.clone() for i, h in state.ssm.items()}))
        model.extend_context(state, ids[:, b * S : (b + 1) * S], keep_behind=False)
    for i in state.conv:
        conv = view.conv_history[i].unflatten(0, (2, 3))  # (B, nb, conv_dim, K - 1)
        ssm = view.ssm_states[i].unflatten(0, (2, 3))
        for b, (conv_start, ssm_start) in enumerate(starts):
            torch.testing.assert_close(conv[:, b], conv_start[i][..., 1:], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ssm[:, b], ssm_start[i], rtol=1e-5, atol=1e-6)
    real = mask.bool()[:, None, :, None]
    for i in state.keys:
        for trained, decoded in ((view.keys[i], state.keys[i]), (view.values[i], state.values[i])):
            torch.testing.assert_close(trained * real, decoded[:, :, : 3 * S] * real, rtol=1e-5, atol=1e-6)


def test_training_forward_equals_inference(model):
    """Block b's training logits == `denoise_step` on the same noisy block after `prefill` of the clean prefix,
    including a trailing partial block (its missing positions are invisible padding)."""
    S = model.config.block_size
    ids = clean_ids(model, 2, 3 * S + 2)
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    noise[:, 0] = True
    out = model(ids, labels=ids, noise_mask=noise)
    noisy = ids.masked_fill(noise, model.config.mask_token_id)
    for b in range(1, 4):
        span = slice(b * S, min((b + 1) * S, ids.shape[1]))
        t = noise[:, span].float().sum(-1) / S
        expected = model.denoise_step(noisy[:, span], model.prefill(ids[:, : b * S]), t)
        torch.testing.assert_close(out.logits[:, span], expected, rtol=1e-4, atol=1e-4)


def test_later_blocks_change_nothing_in_earlier_ones(model):
    S = model.config.block_size
    ids = clean_ids(model, 1, 3 * S)
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    base = model(ids, labels=ids, noise_mask=noise).logits
    changed_ids, changed_noise = ids.clone(), noise.clone()
    changed_ids[:, 2 * S :] = clean_ids(model, 1, S, seed=5)
    changed_noise[:, 2 * S :] = ~noise[:, 2 * S :]
    changed = model(changed_ids, labels=changed_ids, noise_mask=changed_noise).logits
    # Identical up to float summation order (experts batch tokens differently).
    torch.testing.assert_close(changed[:, : 2 * S], base[:, : 2 * S], rtol=0, atol=1e-6)
    assert (changed[:, 2 * S :] - base[:, 2 * S :]).abs().max() > 1e-3


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_a_masked_block_never_sees_its_own_clean_tokens(model, num_blocks):
    """With every position of the last block masked, its logits do not depend on what its clean tokens were: the
    context it reads ends where it starts. One block alone included (its context is empty)."""
    S = model.config.block_size
    ids = clean_ids(model, 1, num_blocks * S)
    noise = torch.zeros_like(ids, dtype=torch.bool)
    noise[:, -S:] = True
    changed = ids.clone()
    changed[:, -S:] = clean_ids(model, 1, S, seed=7)
    assert not torch.equal(changed, ids)
    logits = model(ids, labels=ids, noise_mask=noise).logits[:, -S:]
    torch.testing.assert_close(model(changed, labels=changed, noise_mask=noise).logits[:, -S:], logits)


def test_loss_is_cross_entropy_on_masked_positions_only(model):
    ids = clean_ids(model, 2, 8)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt: never masked, never scored
    noise = torch.zeros_like(ids, dtype=torch.bool)
    noise[:, [1, 3, 6]] = True
    out = model(ids, labels=labels, noise_mask=noise)
    scored = noise & (labels != -100)
    expected = torch.nn.functional.cross_entropy(out.logits[scored], labels[scored])
    torch.testing.assert_close(out.loss, expected)
    # The -100 position 1 stayed clean: masking it by hand changes the logits.
    forced = model(ids.masked_fill(torch.arange(8) == 1, 3), labels=labels, noise_mask=noise)
    assert (forced.logits - out.logits).abs().max() > 1e-4


def test_noise_is_seedable(model):
    ids = clean_ids(model, 2, 12)
    draw = lambda seed: model.diffusion_loss(ids, ids, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    loss_a, _, mask_a = draw(0)
    loss_b, _, mask_b = draw(0)
    _, _, mask_c = draw(1)
    assert torch.equal(mask_a, mask_b) and loss_a == loss_b
    assert not torch.equal(mask_a, mask_c)


def test_the_frozen_tower_costs_one_forward_and_keeps_nothing_for_backward():
    """A training step runs the context tower once, without gradient, and autograd saves none of its activations;
    the denoiser saves what its backward needs."""
    model = tiny_model().train()
    ids = clean_ids(model, 2, 12)
    calls, inside, saved = [], [False], {"context": 0, "elsewhere": 0}

    def enter(module, args, kwargs):
        calls.append(torch.is_grad_enabled())
        inside[0] = True

    def leave(module, args, kwargs, output):
        inside[0] = False

    def pack(tensor):
        saved["context" if inside[0] else "elsewhere"] += 1
        return tensor

    model.context_tower.register_forward_pre_hook(enter, with_kwargs=True)
    model.context_tower.register_forward_hook(leave, with_kwargs=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert calls == [False], "one pass of the context tower, without gradient"
    assert saved["context"] == 0 and saved["elsewhere"] > 0, saved


def test_loss_trains_the_denoiser_only_and_goes_down():
    model = tiny_model().train()
    ids = clean_ids(model, 2, 12)
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    context_before = {k: v.clone() for k, v in model.context_tower.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids, noise_mask=noise).loss
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is None for p in model.context_tower.parameters())
            assert all(p.grad is None for p in model.context_tower.lm_head.parameters())
            assert model.denoiser_tower.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0
            assert model.denoiser_tower.adaln.t_embedder.mlp[0].weight.grad.abs().sum() > 0
            assert model.denoiser_tower.adaln.scale_shift_tables[3].grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for k, v in model.context_tower.state_dict().items():
        assert torch.equal(v, context_before[k]), k


BLOCKWISE_CONTEXT = TwoTowerContextTower.training_context


def dense_training_context(tower, input_ids, attention_mask, block_size):
    """`training_context` with a dense `(B, 1, N, 2N)` additive mask instead of the blockwise form: block `b`'s queries
    see the context keys `< b * S` and their own block, real positions only. The reference for every form."""
    context = BLOCKWISE_CONTEXT(tower, input_ids, attention_mask, block_size)
    length, device = input_ids.shape[1], input_ids.device
    block_of = torch.arange(length, device=device) // block_size
    sees_context = torch.arange(length, device=device)[None, :] < (block_of * block_size)[:, None]
    sees_block = block_of[None, :] == block_of[:, None]
    real = attention_mask.bool().repeat(1, 2)  # the context's keys, then the blocks' keys
    visible = torch.cat([sees_context, sees_block], dim=1)[None] & real[:, None, :]
    dtype = next(iter(context.keys.values())).dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    return dataclasses.replace(context, attention_mask=mask[:, None], blockwise=False, key_real=None)


def blockwise_and_dense(model, monkeypatch, gradients: bool = True, blocks: tuple = (3, 2)):
    """The loss and gradients of one training step on the model's device, blockwise and with the dense reference:
    two rows of `blocks` whole blocks and a few tokens more, so left padding (a whole block of it), -100 labels and a
    partial last block. `((loss, grads), (loss, grads))`."""
    S, device = model.config.block_size, model.device
    rows = [clean_ids(model, 1, blocks[0] * S + 5, seed=3)[0].tolist(),
            clean_ids(model, 1, blocks[1] * S + 1, seed=4)[0].tolist()]  # fmt: skip
    ids, mask = left_pad(rows)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : S // 2] = -100  # a prompt
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    ids, mask, labels, noise = (t.to(device) for t in (ids, mask, labels, noise))

    def run(context):
        monkeypatch.setattr(TwoTowerContextTower, "training_context", context)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(gradients):
            loss = model(ids, attention_mask=mask, labels=labels, noise_mask=noise).loss
        if gradients:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    return run(BLOCKWISE_CONTEXT), run(dense_training_context)


@pytest.mark.parametrize("form", ["chunks of 1", "chunks of 3", "chunks of 8", "flex"])
def test_blockwise_attention_gives_the_dense_masks_loss_and_gradients(form, monkeypatch):
    """Training attends with no (N, 2N) mask, in chunks of blocks (one attention call per chunk; 3 leaves a partial
    last chunk) or in one `flex_attention` call; `dense_training_context`, a dense mask over the same keys, is the
    reference. Same loss and gradients within 1e-5 on the release fixture. flex_attention has no backward on the CPU:
    here its loss only, run eagerly, over enough blocks that its `BlockMask` skips whole tiles of 128 (test_gpu.py
    holds its gradients, compiled on CUDA)."""
    from conftest import RELEASE_FIXTURE

    import transformers_twotower.denoiser_twotower as denoiser
    from transformers_twotower import TwoTowerForDiffusionLM

    calls = []
    if form == "flex":
        monkeypatch.setattr(denoiser, "flex_attention_runs", lambda device, dropout: True)
        monkeypatch.setattr(denoiser, "compiled_flex_attention",
                            lambda: lambda *a, **k: calls.append(k["block_mask"]) or denoiser.flex_attention(*a, **k))  # fmt: skip
    else:
        monkeypatch.setattr(denoiser, "CHUNK_BLOCKS", int(form.split()[-1]))
    model = TwoTowerForDiffusionLM.from_pretrained(RELEASE_FIXTURE, dtype=torch.float32).train()
    (loss, grads), (dense_loss, dense_grads) = blockwise_and_dense(model, monkeypatch, form != "flex")
    if form == "flex":  # also over 20 blocks, where the BlockMask skips whole tiles
        attention_layers = sum(layer.block_type == "full_attention" for layer in model.denoiser_tower.layers)
        assert len(calls) == attention_layers > 0, "one flex_attention call per attention layer"
        (long_loss, _), (long_dense_loss, _) = blockwise_and_dense(model, monkeypatch, False, blocks=(20, 13))
        torch.testing.assert_close(long_loss, long_dense_loss, rtol=0, atol=1e-5)
        assert calls[-1].sparsity() > 0, "whole tiles skipped"
    torch.testing.assert_close(loss, dense_loss, rtol=0, atol=1e-5)
    assert dense_grads.keys() == grads.keys() and (len(dense_grads) > 0) == (form != "flex")
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=name)
