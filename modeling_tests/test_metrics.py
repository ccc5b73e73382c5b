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
    """`generate`'s count of real tokens per row is the padding rule's, and its tokens per forward is the metrics'.
    With the release's EOS rule (`keep_eos_block`) it counts the whole last block, and the metrics follow it when
    given that count."""
    model = tiny_model(seed=3)
    ids, mask = left_pad(clean_rows(model, [3, 9, 5, 7], seed=4))
    kwargs = dict(max_new_tokens=16, return_dict_in_generate=True, pad_token_id=0, **DIFFUSION)
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **kwargs).sequences[:, ids.shape[1] :]
    eos = free[0, 5].item()  # a token row 0 produces inside its second block, so at least one row ends early
    out = model.generate(ids, attention_mask=mask, eos_token_id=eos, **kwargs)
    generated = out.sequences[:, ids.shape[1] :]
    metrics = generation_metrics(generated, out.nfe, eos_token_id=eos)
    assert out.num_generated.tolist() == real_tokens(generated, eos).sum(-1).tolist()
    assert int(out.num_generated.sum()) == metrics["generated_tokens"] < generated.numel()
    assert metrics["tokens_per_forward"] == pytest.approx(metrics["generated_tokens"] / int(out.nfe.sum()))
    torch.testing.assert_close(out.tokens_per_forward, out.num_generated / out.nfe)

    whole = model.generate(ids, attention_mask=mask, eos_token_id=eos, keep_eos_block=True, **kwargs)
    generated = whole.sequences[:, ids.shape[1] :]
    given = generation_metrics(generated, whole.nfe, eos_token_id=eos, num_generated=whole.num_generated)
    assert given["generated_tokens"] == int(whole.num_generated.sum()) > int(real_tokens(generated, eos).sum())
