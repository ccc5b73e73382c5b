"""`Trainer` runs the masked-diffusion objective unchanged: ordinary batches of input_ids/labels, no custom collator."""

import torch
from conftest import tiny_model
from datasets import Dataset
from transformers import Trainer, TrainingArguments


def test_trainer_trains_the_denoiser_and_leaves_the_context_tower_alone(tmp_path):
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(4, model.config.vocab_size, (8, 10), generator=generator).tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    context_before = {k: v.clone() for k, v in model.context_tower.state_dict().items()}
    head_before = model.lm_head.weight.detach().clone()

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()

    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len([log for log in trainer.state.log_history if "loss" in log]) == 3
    assert not torch.equal(model.lm_head.weight, head_before)
    for k, v in model.context_tower.state_dict().items():
        assert torch.equal(v, context_before[k]), k
