"""Training: the block-wise masked-diffusion loss (docs/architecture.md, "Training"), one pass of each tower.

`TwoTowerForDiffusionLM.forward(input_ids, labels=...)` and `diffusion_loss` return what this computes.
"""

import torch
import torch.nn.functional as F


def masked_diffusion_forward(
    model,
    input_ids,
    labels,
    attention_mask=None,
    noise_mask=None,
    generator=None,
    output_hidden_states=False,
    output_router_logits=False,
):
    """Block-wise masked-diffusion loss (docs/architecture.md, "Training"). Returns `(loss, logits, noise_mask,
    hidden_states, router_logits)`: the denoiser's hidden states `(B, N, H)` per layer, and its routers' logits
    `(B * N', n_routed_experts)` per MoE layer (`N'`: `N` padded to whole blocks), each None unless asked for.

    Per block, `t ~ U(0, 1]` and each token is masked with probability `t`; positions whose label is -100 are
    never masked (prompt or padding stays clean context). `noise_mask` (B, N) fixes which positions are masked
    instead. Logits are `(B, N, V)` fp32 (sequence padded to whole blocks, then trimmed back).
    """
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(labels.shape)}."
        )
    batch_size, length = input_ids.shape
    block_size, mask_id = model.config.block_size, model.config.mask_token_id
    num_blocks = -(-length // block_size)
    pad = num_blocks * block_size - length

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    maskable = (labels != -100) & mask.bool()
    if noise_mask is None:
        # The generator is named only when given: `generator=None` fails under torch.compile once the length is
        # symbolic (the second length a compiled model sees; torch 2.13).
        seeded = {} if generator is None else {"generator": generator}
        t = 1.0 - torch.rand(batch_size, num_blocks, 1, device=input_ids.device, **seeded)
        draws = torch.rand(batch_size, num_blocks, block_size, device=input_ids.device, **seeded)
        noise_mask = (draws < t).view(batch_size, -1)[:, :length]
    elif noise_mask.shape != input_ids.shape:
        raise ValueError(
            f"`noise_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(noise_mask.shape)}."
        )
    noise_mask = noise_mask.bool() & maskable

    # Whole blocks: pad the tail with invisible positions.
    clean = F.pad(input_ids, (0, pad), value=mask_id)
    mask = F.pad(mask, (0, pad), value=0)
    padded_noise = F.pad(noise_mask, (0, pad), value=False)
    noisy = clean.masked_fill(padded_noise, mask_id).view(batch_size * num_blocks, block_size)
    t = padded_noise.view(batch_size * num_blocks, block_size).float().mean(-1)  # each block's masked fraction

    context = model.context_tower.training_context(clean, mask, block_size)
    outputs = model.denoiser_tower(
        noisy, context, t, output_hidden_states=output_hidden_states, output_router_logits=output_router_logits
    )
    logits = model.lm_head(outputs.last_hidden_state).float().view(batch_size, num_blocks * block_size, -1)
    logits = logits[:, :length]
    hidden_states = None
    if output_hidden_states:
        hidden_states = tuple(
            h.view(batch_size, num_blocks * block_size, -1)[:, :length] for h in outputs.hidden_states
        )

    # The mean over masked tokens, written without data-dependent shapes (it compiles); 0 when nothing is masked.
    targets = labels.masked_fill(~noise_mask, -100)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    loss = loss / noise_mask.sum().clamp_min(1)
    return loss, logits, noise_mask, hidden_states, outputs.router_logits


__all__ = ["masked_diffusion_forward"]
