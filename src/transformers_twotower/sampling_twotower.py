"""Model-free pieces of mask-diffusion decoding: prediction with confidence, and the commit rule.

Both work on plain tensors (no model inside), so they are tested with hand-made logits.
"""

import math

import torch
from transformers import LogitsProcessorList


def predict_tokens(
    logits: torch.Tensor,
    mask_token_id: int,
    warpers: LogitsProcessorList | None = None,
    generator: torch.Generator | None = None,
    processors: LogitsProcessorList | None = None,
    input_ids: torch.LongTensor | None = None,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predict a token at every position of a noisy block and how confident the model is in it.

    logits: (B, L, V) raw denoiser logits. The mask token is never predicted, nor a token `banned` (B, L, V) bool at a
    position. `processors` act on each position's distribution on its own (penalties, bans; see
    `positionwise_processors`); each position sees `input_ids` (B, N), the row's context and the block as it stands.
    The confidence is the probability of the prediction under the processed distribution, before any warper. Without
    `warpers` the prediction is its argmax (greedy). With `warpers` (temperature, top-k, top-p, ...), it is a
    Gumbel-max sample from the warped distribution: the release measures the confidence unscaled.
    Returns `(pred (B, L) long, confidence (B, L) fp32, scores (B, L, V) fp32)`, the scores as sampling saw them.
    """
    batch, length, vocab = logits.shape
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")
    per_position = None  # every position sees its row's tokens (processors read them; transformers' warpers do not)
    if processors and input_ids is not None:
        per_position = input_ids.repeat_interleave(length, dim=0)
    if processors:
        logits = processors(per_position, logits.view(batch * length, vocab)).view(batch, length, vocab)
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1)  # log p(x0 | x_t), processed
    if warpers is None:
        scores = logits
        pred = log_probs.argmax(-1)
    else:
        scores = warpers(per_position, log_probs.view(batch * length, vocab)).view(batch, length, vocab)
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(scores.dtype).tiny)))
        pred = (scores + gumbel).argmax(-1)
    confidence = log_probs.gather(-1, pred[..., None])[..., 0].exp()
    return pred, confidence, scores


def num_to_commit(
    num_masked: torch.Tensor, num_confident: torch.Tensor, step: int, steps_per_block: int
) -> torch.Tensor:
    """How many masked positions each row commits at `step` (0-based) of `steps_per_block`.

    The confident ones (at least one), and never fewer than an even share of what is left,
    `ceil(n / (T - step))`, so the block is always full after the last step; never more than `n`.
    """
    if step >= steps_per_block - 1:
        return num_masked
    even_share = torch.div(num_masked + (steps_per_block - step - 1), steps_per_block - step, rounding_mode="floor")
    k = torch.maximum(num_confident.clamp_min(1), even_share)
    return torch.minimum(k, num_masked)


def commit_mask(
    confidence: torch.Tensor, masked: torch.Tensor, step: int, steps_per_block: int, threshold: float
) -> torch.Tensor:
    """Which masked positions take their prediction at this step: each row's `k` most confident masked positions,
    `k` from `num_to_commit` with "confident" meaning `confidence > threshold` (strict).

    Ties in confidence go to the leftmost position (a stable sort), so the rule is deterministic.
    confidence, masked: (B, L). Returns a bool (B, L) that is only ever True where `masked` is.
    """
    num_masked = masked.sum(-1)
    num_confident = ((confidence > threshold) & masked).sum(-1)
    k = num_to_commit(num_masked, num_confident, step, steps_per_block)  # (B,)

    ranked = confidence.float().masked_fill(~masked, -math.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices  # most confident first
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return masked & (rank < k[:, None])


__all__ = ["predict_tokens", "num_to_commit", "commit_mask"]
