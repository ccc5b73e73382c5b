"""Behaviour of the tiny random TwoTower: caches, denoiser structure, batching, training, save/load."""

import pytest
import torch
from conftest import left_pad, nemotron_h_from_context_tower, tiny_model
from safetensors import safe_open

from transformers_twotower import TwoTowerCache, TwoTowerForDiffusionLM


def clean_ids(model, batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Ids >= 4 avoid the special ids (mask is 3).
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=generator)


# --- caches -----------------------------------------------------------------------------------------------------------


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
    reference = nemotron_h_from_context_tower(model)
    ids = clean_ids(model, 2, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_one_token_prompt(model):
    ids = clean_ids(model, 2, 1)
    cache = model.prefill(ids)
    torch.testing.assert_close(cache.next_token_logits, model(ids).logits[:, -1], rtol=1e-4, atol=1e-5)
    # Mock-AR's view one token behind is the empty context.
    logits = model.denoise_step(ids, cache, None, behind=True)
    assert logits.shape == (2, 1, model.config.vocab_size) and torch.isfinite(logits).all()


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


# --- the denoiser -----------------------------------------------------------------------------------------------------


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


# --- training ---------------------------------------------------------------------------------------------------------


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


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = None
    results = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            assert model.denoiser_tower.layers[0].gradient_checkpointing
        calls = []
        model.denoiser_tower.layers[0].mixer.in_proj.register_forward_hook(lambda *_: calls.append(1))
        ids = clean_ids(model, 2, 8) if ids is None else ids
        noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.5
        loss = model(ids, labels=ids, noise_mask=noise).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1), "the backward pass recomputes checkpointed layers"
        results.append(
            (
                loss.detach(),
                model.denoiser_tower.adaln.t_embedder.mlp[0].weight.grad.clone(),
                model.lm_head.weight.grad.clone(),
            )
        )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- save / load ------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    # Saved in the release's layout: one tensor per expert, time conditioning at the top level.
    assert "denoiser_tower.layers.2.mixer.experts.3.up_proj.weight" in names
    assert "scale_shift_tables.7" in names and "t_block.1.weight" in names and "context_lm_head.weight" in names
    loaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path).eval()
    assert not any(p.requires_grad for p in loaded.context_tower.parameters())
    ids = clean_ids(model, 2, 6)
    block = torch.tensor([[3, 3, 5, 3], [3, 9, 3, 3]])
    t = torch.tensor([0.75, 0.75])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.denoise_step(block, loaded.prefill(ids), t),
        model.denoise_step(block, model.prefill(ids), t),
        rtol=0,
        atol=0,
    )
