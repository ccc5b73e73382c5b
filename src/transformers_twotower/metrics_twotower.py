"""Generation metrics, defined once: `generate`'s outputs, the harness, the examples and the benchmarks use these.

The padding rule: a row's generated tokens are real up to and including its first EOS, and what follows is padding
(transformers' rule); without an EOS id every generated position is real. Every metric counts real tokens only.
`generate` applies the rule as it commits and also ends a row at a stop string or criterion (its `num_generated`);
`real_tokens` applies it to ids afterwards, for runs whose only stop is EOS, unless the row lengths are given.
"""

import torch


def real_tokens(generated: torch.LongTensor, eos_token_id: int | list[int] | None = None) -> torch.BoolTensor:
    """`(B, N)` True at the real positions of generated ids `(B, N)` (the prompt excluded): up to the first EOS."""
    if eos_token_id is None:
        return torch.ones_like(generated, dtype=torch.bool)
    is_eos = torch.isin(generated, torch.as_tensor(eos_token_id, device=generated.device))
    return (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # no EOS strictly before


def tokens_per_forward(num_tokens: torch.Tensor, nfe: torch.Tensor) -> torch.FloatTensor:
    """Real generated tokens per model forward that predicted tokens (0 for a row that ran none)."""
    return num_tokens.float() / nfe.clamp_min(1).float()


def generation_metrics(
    generated: torch.LongTensor,
    nfe: torch.LongTensor,
    eos_token_id: int | list[int] | None = None,
    reference: torch.LongTensor | None = None,
    num_generated: torch.LongTensor | None = None,
) -> dict[str, float | int]:
    """A batch's metrics: `generated_tokens` (real ones), `tokens_per_forward` over the batch and, with `reference`
    (another mode's generated ids for the same prompts, usually AR's), `agreement_with_ar`: the fraction of the
    reference's real tokens that `generated` has at the same position.

    generated, reference: `(B, N)` and `(B, N')` generated ids (prompts excluded; the widths may differ, as `generate`
    drops trailing columns that are padding in every row); nfe: `(B,)`, `generate`'s `nfe`; num_generated: `(B,)`,
    `generate`'s count of each row's real tokens, which then decides instead of `eos_token_id` (for `generated`).
    """
    if num_generated is None:
        real = real_tokens(generated, eos_token_id)
    else:
        real = torch.arange(generated.shape[1], device=generated.device) < num_generated[:, None].to(generated.device)
    metrics = {
        "generated_tokens": int(real.sum()),
        "tokens_per_forward": tokens_per_forward(real.sum(), nfe.sum()).item(),
    }
    if reference is not None:
        reference_real = real_tokens(reference, eos_token_id)
        width = max(generated.shape[1], reference.shape[1])
        widen = lambda t, fill: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)  # noqa: E731
        same = (widen(generated, -1) == widen(reference, -1)) & widen(real, False) & widen(reference_real, False)
        metrics["agreement_with_ar"] = same.sum().item() / max(int(reference_real.sum()), 1)
    return metrics


__all__ = ["generation_metrics", "real_tokens", "tokens_per_forward"]
