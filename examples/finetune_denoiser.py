"""Fine-tune TwoTower's denoiser on a local text or JSONL file with the stock `Trainer`.

    python examples/finetune_denoiser.py --model DIR --data corpus.txt --output OUT [--seq-len 512] [--max-steps 1000]
        [--batch-size 4] [--lr 1e-4] [--lora-r 16] [--text-field text] [--gradient-checkpointing]

    accelerate launch examples/finetune_denoiser.py ...        # several processes (DDP)
    torchrun --nproc-per-node 8 examples/finetune_denoiser.py ...

The file is read with `datasets.load_dataset("text" | "json", data_files=...)`, tokenized (`<s> text </s>` per
row), packed into sequences whose length is a multiple of the model's `block_size`, and trained on the model's own
masked-diffusion loss (`model(input_ids, labels=input_ids).loss`): the masking happens inside the model, so the
default collator is enough. Only the denoiser and its time conditioning train; the context tower is frozen. With
`--lora-r`, LoRA adapters go on the denoiser's attention and Mamba projections (the package's default targets).
"""

import argparse
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from transformers_twotower import TwoTowerForDiffusionLM


def pack_for_diffusion(token_rows: list[list[int]], seq_len: int, block_size: int) -> Dataset:
    """Concatenate tokenized rows and cut them into `seq_len`-token sequences (`labels` = `input_ids`)."""
    if seq_len % block_size:
        raise ValueError(f"`seq_len` ({seq_len}) must be a multiple of the model's block_size ({block_size}).")
    ids = [token for row in token_rows for token in row]
    if len(ids) < seq_len:
        raise ValueError(
            f"The dataset holds {len(ids)} tokens, fewer than one training sequence of {seq_len} "
            f"({seq_len // block_size} blocks of {block_size}); add text or lower --seq-len."
        )
    count = len(ids) // seq_len
    rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(count)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def load_text_rows(path: str, text_field: str) -> list[str]:
    suffix = Path(path).suffix
    if suffix in (".json", ".jsonl"):
        rows = load_dataset("json", data_files=path, split="train")
        if text_field not in rows.column_names:
            raise ValueError(f"{path} has no field {text_field!r} (fields: {rows.column_names}); pass --text-field.")
        return rows[text_field]
    return load_dataset("text", data_files=path, split="train")["text"]


def build_dataset(tokenizer, path: str, seq_len: int, block_size: int, text_field: str = "text") -> Dataset:
    texts = [t for t in load_text_rows(path, text_field) if t]
    return pack_for_diffusion([with_bos_and_eos(tokenizer, t) for t in texts], seq_len, block_size)


def with_bos_and_eos(tokenizer, text: str) -> list[int]:
    """`<s> text </s>`: the tokenizer's own special tokens (the demo's adds BOS itself), BOS added where it adds none."""
    ids = tokenizer(text).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return [*ids, tokenizer.eos_token_id]


def fsdp_arguments() -> dict:
    """FSDP2 through Accelerate: every block of both towers a unit (the frozen context tower is sharded too, weights
    only: the least memory per process, docs/training.md), a full state dict saved in the release's layout."""
    return dict(
        fsdp=True,
        fsdp_config={
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["TwoTowerContextBlock", "TwoTowerDenoiserBlock"],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a TwoTower checkpoint folder (with its tokenizer)")
    parser.add_argument("--data", required=True, help="a .txt (one example per line) or .json/.jsonl file")
    parser.add_argument("--output", required=True)
    parser.add_argument("--text-field", default="text", help="the JSON field holding the text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-r", type=int, default=0, help="> 0: train LoRA adapters instead of the denoiser")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument(
        "--fsdp", action="store_true", help="shard both towers with FSDP2 (GPUs; see docs/training.md)"
    )
    args = parser.parse_args(argv)
    if args.fsdp and (args.cpu or not torch.cuda.is_available()):
        raise SystemExit(
            "error: --fsdp needs GPUs: on the CPU Accelerate runs DDP whatever `fsdp` says (its distributed type is "
            "MULTI_CPU and its FSDP plugin is not used). For sharding on CPU processes, see the fully_shard recipe "
            "in modeling_tests/fsdp_worker.py."
        )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = TwoTowerForDiffusionLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = build_dataset(tokenizer, args.data, args.seq_len, model.config.block_size, args.text_field)
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r))

    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 50),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        activation_checkpointing=args.gradient_checkpointing,
        use_cpu=args.cpu,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient
        bf16=torch.cuda.is_available() and not args.cpu,
        **(fsdp_arguments() if args.fsdp else {}),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(args.output)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output)
    if torch.distributed.is_initialized():  # leave together: gloo aborts a process that exits with peers still up
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return trainer


if __name__ == "__main__":
    main()
