"""The generation metrics (`metrics_twotower`): the padding rule, and the same figures `generate` reports."""

import pytest
import torch
from conftest import DIFFUSION, clean_rows, left_pad, tiny_model

from transformers_twotower.metrics_twotower import generation_metrics, real_tokens


def test_real_tokens_end_at_the_first_eos_included():
    generated = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert real_tokens(generated, 2).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    assert real_tokens(generated, [7, 9]).tolist()[1] == [True, True, True, False]
    assert real_tokens(generated, None).all()


def test_agreement_counts_the_references_real_tokens_across_widths():
    """Agreement is over the reference's real tokens; a narrower output (trailing padding dropped by `generate`)
    simply does not match past its width."""
    reference = torch.tensor([[5, 6, 7, 2], [4, 4, 4, 4]])
    generated = torch.tensor([[5, 9, 7], [4, 4, 2]])
    metrics = generation_metrics(generated, torch.tensor([2, 3]), eos_token_id=2, reference=reference)
    # Row 0: the reference's 4 real tokens, 2 agree. Row 1: 4 real tokens; the first two agree, then the generated
    # row ends (its EOS, then nothing), so positions 2 and 3 do not.
    assert metrics["agreement_with_ar"] == 4 / 8
    assert metrics["generated_tokens"] == 6
    assert metrics["tokens_per_forward"] == pytest.approx(6 / 5)


def test_generate_reports_the_same_tokens_per_forward():
    """`generate`'s per-row tokens per forward, summed back to tokens, equals the metrics' count of real tokens."""
    model = tiny_model(seed=3)
    ids, mask = left_pad(clean_rows(model, [3, 9, 5, 7], seed=4))
    kwargs = dict(max_new_tokens=16, return_dict_in_generate=True, **DIFFUSION)
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **kwargs).sequences[:, ids.shape[1] :]
    eos = free[0, 5].item()  # a token row 0 produces, so at least one row ends early
    out = model.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0, **kwargs)
    generated = out.sequences[:, ids.shape[1] :]
    metrics = generation_metrics(generated, out.nfe, eos_token_id=eos)
    per_row = (out.tokens_per_forward * out.nfe).round().long()
    assert per_row.tolist() == real_tokens(generated, eos).sum(-1).tolist()
    assert int(per_row.sum()) == metrics["generated_tokens"] < generated.numel()
    assert metrics["tokens_per_forward"] == pytest.approx(metrics["generated_tokens"] / int(out.nfe.sum()))
