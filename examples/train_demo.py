"""Train the bundled demo TwoTower end to end on a CPU, from nothing, in one command.

    python examples/train_demo.py [--output src/transformers_twotower/demo] [--seed 0]

1. A byte-level BPE tokenizer (ids 0-3 = <pad>, <s>, </s>, <mask>, as in the release) on the Python source of the
   running interpreter's standard library, minus the held-out modules (`HELD_OUT`, kept for evaluation).
2. A small Nemotron-H autoregressive backbone (every layer type: Mamba-2, attention, MoE, MLP), trained on that
   source with the next-token loss.
3. `conversion/convert_nemotron_h_to_twotower.py` turns it into a TwoTower (both towers copies of the backbone,
   identity time conditioning); the context tower stays frozen and the denoiser is trained with the model's own
   masked-diffusion loss.
4. The result (tokenizer, config, generation config, bf16 weights, the package's code for `trust_remote_code`) is
   written to `--output`, with `train_log.json` (losses, token counts, timings).

Step counts are fixed (not time-based) so that a run is reproducible from `--seed`; they were chosen to fit the whole
run in about an hour on 2 CPU cores.
"""

import argparse
import json
import math
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conversion"))

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<mask>"]
HELD_OUT = [  # stdlib modules never trained on; the benchmark draws its prompts from them
    "bisect.py", "colorsys.py", "fractions.py", "graphlib.py", "heapq.py", "shlex.py", "statistics.py",
    "string.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "queue.py",
]  # fmt: skip
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the running interpreter's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))
    held_out = [root / name for name in HELD_OUT if (root / name).is_file()]
    train = [p for p in files if p not in held_out]
    return train, held_out


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # BOS comes from the tokenizer itself (as Llama-style tokenizers do), so the pipeline, the command line, the
    # benchmark and the training data all begin a text the same way.
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>",
        padding_side="left",  # a decoder-only model's batches are left-padded
    )  # fmt: skip


def pack(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """`<s> file </s>` for every file (the tokenizer adds `<s>`), concatenated and cut into rows of `length` tokens."""
    ids = []
    for text in texts:
        ids += [*tokenizer(text).input_ids, tokenizer.eos_token_id]
    rows = len(ids) // length
    return torch.tensor(ids[: rows * length]).view(rows, length)


def backbone_config(vocab_size: int):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        hybrid_override_pattern="M*ME-M*E",  # Mamba-2, attention, MoE, MLP
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=8,
        mamba_head_dim=32,
        n_groups=1,
        ssm_state_size=32,
        conv_kernel=4,
        chunk_size=64,
        intermediate_size=512,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256,
        routed_scaling_factor=1.0,
        time_step_limit=(0.0, float("inf")),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def shuffled_batches(num_rows: int, batch_size: int, generator: torch.Generator):
    """Row indices, batch by batch, one fresh permutation per epoch."""
    while True:
        order = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(model, data: torch.Tensor, steps: int, batch_size: int, peak_lr: float, seed: int, label: str, log: dict):
    """A plain AdamW loop over shuffled rows; `model(input_ids, labels)` supplies the loss."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    rows = shuffled_batches(len(data), batch_size, generator)
    losses, start = [], time.time()
    for step in range(steps):
        batch = data[next(rows)]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=max(1, steps // 20))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.time() - start
            rate = (step + 1) * batch.numel() / elapsed
            print(f"[{label}] step {step:5d}/{steps} loss {sum(losses[-25:]) / len(losses[-25:]):.3f} "
                  f"{rate:,.0f} tok/s {elapsed / 60:.1f} min", flush=True)  # fmt: skip
    log[label] = dict(
        steps=steps,
        batch_size=batch_size,
        tokens=steps * batch_size * data.shape[1],
        seconds=time.time() - start,
        first_loss=sum(losses[:25]) / len(losses[:25]),
        last_loss=sum(losses[-25:]) / len(losses[-25:]),
    )
    model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "src/transformers_twotower/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ar-steps", type=int, default=1000)
    parser.add_argument("--denoiser-steps", type=int, default=800)
    args = parser.parse_args(argv)

    from convert_nemotron_h_to_twotower import convert_nemotron_h_to_twotower
    from transformers import NemotronHForCausalLM

    from transformers_twotower import TwoTowerForDiffusionLM, TwoTowerGenerationConfig

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.time()
    log = {"seed": args.seed, "python": sys.version.split()[0], "torch": torch.__version__, "held_out": HELD_OUT}

    # 1. Tokenizer and data.
    train_files, held_out = stdlib_files()
    texts = [read(p) for p in train_files]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    data = pack(tokenizer, texts, args.seq_len)
    log.update(train_files=len(train_files), held_out_files=len(held_out), train_tokens=data.numel())
    print(f"{len(train_files)} files, {data.numel():,} tokens in {len(data)} rows of {args.seq_len}", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # 2. The autoregressive backbone. transformers' Nemotron-H clamps the Mamba dt at time_step_min; align it with
        # the release's `time_step_limit` (no clamp), which the TwoTower towers honour.
        backbone = NemotronHForCausalLM(backbone_config(len(tokenizer)))
        for layer in backbone.model.layers:
            if layer.block_type == "linear_attention":
                layer.mixer.time_step_limit = tuple(backbone.config.time_step_limit)
        log["backbone_parameters"] = sum(p.numel() for p in backbone.parameters())
        train(backbone, data, args.ar_steps, args.batch_size, 2e-3, args.seed, "backbone", log)
        backbone.save_pretrained(scratch / "backbone")
        tokenizer.save_pretrained(scratch / "backbone")

        # 3. TwoTower from the backbone; train the denoiser.
        convert_nemotron_h_to_twotower(scratch / "backbone", scratch / "twotower")  # block 16, mask id 3
        model = TwoTowerForDiffusionLM.from_pretrained(scratch / "twotower", dtype=torch.float32)
        log["twotower_parameters"] = sum(p.numel() for p in model.parameters())
        train(model, data, args.denoiser_steps, args.batch_size, 1e-3, args.seed + 1, "denoiser", log)

        # 4. Save: bf16 weights, tokenizer, generation config at the published operating point. The demo ships inside
        # the package and loads through it: no code copies, no `auto_map` (a Hub upload would keep both).
        output = Path(args.output)
        if output.exists():
            shutil.rmtree(output)
        model.generation_config = TwoTowerGenerationConfig.from_model_config(model.config)
        # A model this small falls into loops under greedy decoding; a mild penalty breaks them (distinct-2 of mask
        # diffusion on the held-out prompts 0.50 -> 0.69, agreement with AR 0.138 -> 0.127; `bench --quality`).
        model.generation_config.repetition_penalty = 1.2
        model.to(torch.bfloat16).save_pretrained(output)
        tokenizer.save_pretrained(output)
        for code in output.glob("*.py"):
            code.unlink()
        config = json.loads((output / "config.json").read_text())
        del config["auto_map"]
        (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log["total_minutes"] = (time.time() - started) / 60
    (output / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
