"""Fine-tune TwoTower's denoiser on a local text or JSONL file with the stock `Trainer`.

    python examples/finetune_denoiser.py --model DIR --data corpus.txt --output OUT [--seq-len 512] [--max-steps 1000]
        [--batch-size 4] [--lr 1e-4] [--lora-r 16] [--text-field text] [--gradient-checkpointing]
    python examples/finetune_denoiser.py --distill --model DIR --data corpus.txt --output OUT [--distill-prompts 512]
        [--prompt-len 64] [--new-tokens 32] [--eval-prompts 16] [--eval-data held_out.jsonl]

    accelerate launch examples/finetune_denoiser.py ...        # several processes (DDP)
    torchrun --nproc-per-node 8 examples/finetune_denoiser.py ...

The file is read with `datasets.load_dataset("text" | "json", data_files=...)`, tokenized (`<s> text </s>` per
row), packed into sequences whose length is a multiple of the model's `block_size`, and trained on the model's own
masked-diffusion loss (`model(input_ids, labels=input_ids).loss`): the masking happens inside the model, so the
default collator is enough. Only the denoiser and its time conditioning train; the context tower is frozen. With
`--lora-r`, LoRA adapters go on the denoiser's attention and Mamba projections (the package's default targets).

`--distill` is self-distillation: the targets are the context tower's own greedy continuations of prompts cut from
the data (the AR tower is the teacher, and it is already inside the model). Each training row is `prompt |
continuation` with the prompt's labels at -100 (never masked, clean context), so the denoiser learns to fill exactly
the blocks `generate` asks it for. Before and after training, held-out prompts (`--eval-data`, or the data's last
`--eval-prompts` windows, which are then not trained on) measure what distillation is for: tokens per denoiser forward
and the token-level agreement of diffusion's greedy output with AR's (`distill_report.json` in `--output`).
"""

import argparse
import functools
import gc
import json
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from transformers_twotower import TwoTowerForDiffusionLM
from transformers_twotower.metrics_twotower import generation_metrics


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


# --- Self-distillation -------------------------------------------------------------------------------------------


def token_windows(tokenizer, path: str, length: int, text_field: str = "text") -> torch.Tensor:
    """Consecutive `length`-token windows `(N, length)` of the data's `<s> text </s>` stream."""
    ids = [token for t in load_text_rows(path, text_field) if t for token in with_bos_and_eos(tokenizer, t)]
    count = len(ids) // length
    if count == 0:
        raise ValueError(f"{path} holds {len(ids)} tokens, fewer than one {length}-token prompt; lower --prompt-len.")
    return torch.tensor(ids[: count * length]).view(count, length)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, batch_size: int, **options) -> tuple[torch.Tensor, int]:
    """Greedy continuations `(N, new_tokens)` of the (unpadded) prompts and the denoiser or tower forwards they took;
    `options` go to `generate` (`generation_mode`, `confidence_threshold`, ...). No EOS: every row is full length."""
    device = next(model.parameters()).device
    outputs, forwards = [], 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size].to(device)
        out = model.generate(
            batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
            **options,
        )  # fmt: skip
        outputs.append(out.sequences[:, batch.shape[1] :].cpu())
        forwards += int(out.nfe.sum())
    return torch.cat(outputs), forwards


def distillation_dataset(model, prompts: torch.Tensor, new_tokens: int, batch_size: int) -> Dataset:
    """Rows `prompt | AR continuation`, labels -100 on the prompt. The prompt length must be whole blocks, so the
    continuation's blocks are the ones `generate` fills."""
    block_size = model.config.block_size
    if prompts.shape[1] % block_size:
        raise ValueError(
            f"--prompt-len ({prompts.shape[1]}) must be a multiple of the model's block_size ({block_size})."
        )
    continuations, _ = greedy(model, prompts, new_tokens, batch_size, generation_mode="ar")
    input_ids = torch.cat([prompts, continuations], dim=1)
    labels = input_ids.clone()
    labels[:, : prompts.shape[1]] = -100
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})


def agreement_with_ar(model, prompts: torch.Tensor, new_tokens: int, batch_size: int, threshold=None) -> dict:
    """Mask diffusion's greedy output against AR's on the same prompts: tokens per denoiser forward and the fraction
    of generated tokens equal to AR's (quality retention that needs no labels)."""
    was_training = model.training
    model.eval()
    ar, _ = greedy(model, prompts, new_tokens, batch_size, generation_mode="ar")
    options = {} if threshold is None else {"confidence_threshold": threshold}
    diffusion, forwards = greedy(model, prompts, new_tokens, batch_size, generation_mode="mask_diffusion", **options)
    model.train(was_training)
    metrics = generation_metrics(diffusion, torch.tensor([forwards]), reference=ar)  # no EOS: every token is real
    return {
        "prompts": len(prompts),
        **{name: round(value, 4) for name, value in metrics.items() if name != "generated_tokens"},
    }


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
    distill = parser.add_argument_group("self-distillation")
    distill.add_argument("--distill", action="store_true", help="train on the AR tower's greedy continuations")
    distill.add_argument("--distill-prompts", type=int, default=512, help="training prompts (at most)")
    distill.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (whole blocks)")
    distill.add_argument("--new-tokens", type=int, default=32, help="tokens per continuation")
    distill.add_argument("--eval-prompts", type=int, default=16)
    distill.add_argument("--eval-data", help="held-out text for the evaluation prompts (default: the data's tail)")
    distill.add_argument("--threshold", type=float, help="confidence threshold of the evaluation (default: model's)")
    distill.add_argument("--generate-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.fsdp and (args.cpu or not torch.cuda.is_available()):
        raise SystemExit(
            "error: --fsdp needs GPUs: on the CPU Accelerate runs DDP whatever `fsdp` says (its distributed type is "
            "MULTI_CPU and its FSDP plugin is not used). For sharding on CPU processes, see the fully_shard recipe "
            "in modeling_tests/fsdp_worker.py."
        )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = TwoTowerForDiffusionLM.from_pretrained(args.model, dtype=torch.float32)
    if args.distill:
        windows = token_windows(tokenizer, args.data, args.prompt_len, args.text_field)
        if args.eval_data:
            held_out = token_windows(tokenizer, args.eval_data, args.prompt_len, args.text_field)[: args.eval_prompts]
        else:  # the tail, never trained on
            held_out, windows = windows[-args.eval_prompts :], windows[: -args.eval_prompts]
        # Spread the training prompts over the whole data, not its first pages.
        prompts = windows[torch.linspace(0, len(windows) - 1, min(args.distill_prompts, len(windows))).long()]
        evaluate = functools.partial(
            agreement_with_ar, prompts=held_out, new_tokens=args.new_tokens,
            batch_size=args.generate_batch_size, threshold=args.threshold,
        )  # fmt: skip
        report = {"before": evaluate(model)}
        dataset = distillation_dataset(model, prompts, args.new_tokens, args.generate_batch_size)
    else:
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
        if args.distill:
            report |= {"after": evaluate(model), "train_prompts": len(dataset), "max_steps": args.max_steps}
            (Path(args.output) / "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report, indent=2))
    if torch.distributed.is_initialized():
        leave_process_group(trainer)
    return trainer


def leave_process_group(trainer):
    """Leave the process group together and in order. The DDP wrapper holds the group: if the last reference to it
    goes with the trainer at exit, gloo's destructor joins its worker threads while this thread holds the GIL, and a
    worker still releasing a tensor waits for the GIL: the process never exits (seen in CI and here on the
    torchrun test). So the wrapper goes first, while the group is alive; then a barrier, so that no process exits with
    a peer still up (gloo aborts it), then the group itself."""
    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
