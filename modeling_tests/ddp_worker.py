"""Trains the tiny TwoTower for a few Trainer steps on a fixed global batch; run alone or under torchrun (gloo).

    python ddp_worker.py OUT_FILE GLOBAL_BATCH          # one process
    torchrun --nproc-per-node 2 ddp_worker.py OUT_FILE GLOBAL_BATCH

Every row masks the same number of tokens, so the mean loss of the global batch equals the mean of the per-process
means, and DDP's averaged gradients equal single-process gradients on the same rows.
"""

import os
import sys

import torch
from conftest import tiny_model
from datasets import Dataset
from transformers import Trainer, TrainingArguments


def main(out_file: str, global_batch: int):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_model(seed=0)
    generator = torch.Generator().manual_seed(0)
    rows, length = 16, 12
    ids = torch.randint(4, model.config.vocab_size, (rows, length), generator=generator)
    noise = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):  # 6 masked tokens per row, at random places
        noise[r, torch.randperm(length, generator=generator)[:6]] = True
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "noise_mask": noise.tolist()})
    args = TrainingArguments(
        output_dir=os.path.dirname(out_file),
        max_steps=3,
        per_device_train_batch_size=global_batch // world,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    if trainer.is_world_process_zero():
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, out_file)
    if torch.distributed.is_initialized():  # leave together: gloo aborts a process that exits with peers still up
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
