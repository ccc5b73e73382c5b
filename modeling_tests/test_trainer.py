"""`Trainer` runs the masked-diffusion objective unchanged: ordinary batches of input_ids/labels, no custom collator."""

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup


STEPS, LEARNING_RATE = 3, 1e-2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch_compile"])
def test_trainer_takes_the_steps_of_a_plain_training_loop(tmp_path, compiled):
    """Three Trainer steps on one full batch (its noise fixed by a `noise_mask` column) end where a hand-written eager
    AdamW loop with the same schedule and clipping ends; the context tower is untouched. With `torch_compile=True`
    the Trainer compiles the model (`aot_eager`: the graphs inductor would compile, forward and backward, without its
    code generation)."""
    generator = torch.Generator().manual_seed(0)
    model = tiny_model()
    rows = torch.randint(4, model.config.vocab_size, (8, 10), generator=generator)
    noise = torch.rand(rows.shape, generator=generator) < 0.5
    dataset = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist(), "noise_mask": noise.tolist()})
    context_before = {k: v.clone() for k, v in model.context_tower.state_dict().items()}

    reference = tiny_model().train()
    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    for _ in range(STEPS):
        loss = reference(rows, labels=rows, noise_mask=noise).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=LEARNING_RATE,
        optim="adamw_torch",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        torch_compile=compiled,
        torch_compile_backend="aot_eager" if compiled else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert compiled == hasattr(trainer.model_wrapped, "_orig_mod"), "the Trainer compiled the model as asked"

    assert len([log for log in trainer.state.log_history if "loss" in log]) == STEPS
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            # Steps are lr-sized (1e-2); summation order (the Trainer shuffles the batch) moves Adam's updates of
            # near-zero gradients by up to ~2e-5.
            torch.testing.assert_close(model.get_parameter(name), parameter, rtol=1e-4, atol=1e-4, msg=name)
    assert not torch.equal(model.lm_head.weight, tiny_model().lm_head.weight), "the Trainer changed the denoiser"
    for k, v in model.context_tower.state_dict().items():
        assert torch.equal(v, context_before[k]), k
