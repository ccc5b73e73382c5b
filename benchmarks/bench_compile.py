"""`torch.compile` on the demo TwoTower: compile time, and compiled against eager step time.

    python benchmarks/bench_compile.py [--model DIR] [--backend inductor] [--repeats 5] [--threads 1]

Two steps are measured, each eager and compiled (`backend`, default inductor):

- training: `model(input_ids, labels=...)` forward and backward, `torch.compile(model)`, batch 4 x 128 tokens;
- denoising: `denoise_step` on one block of 16 after a 512-token prompt, batch 1, the denoiser tower compiled
  (`model.denoiser_tower.compile()`).

The compile time is the wall time of the first compiled call less one eager call, with inductor's on-disk caches off
(what a first run costs). Step times are process CPU time
(`time.process_time`) on `--threads` threads, eager and compiled calls alternated, median of `--repeats`. Writes
`benchmarks/results/compile_cpu.json`.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config


ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(name: str, eager, compiled, repeats: int) -> dict:
    """`eager` and `compiled` are calls of the same step; the first compiled call compiles."""
    eager()  # warm-up
    start = time.perf_counter()
    eager()
    eager_wall = time.perf_counter() - start
    start = time.perf_counter()
    compiled()
    compile_seconds = time.perf_counter() - start - eager_wall
    compiled()  # a second call may still specialise
    eager_times, compiled_times = [], []
    for _ in range(repeats):
        eager_times.append(cpu_seconds(eager))
        compiled_times.append(cpu_seconds(compiled))
    eager_ms, compiled_ms = statistics.median(eager_times) * 1e3, statistics.median(compiled_times) * 1e3
    row = {
        "step": name,
        "compile_seconds": round(compile_seconds, 1),
        "eager_ms": round(eager_ms, 2),
        "compiled_ms": round(compiled_ms, 2),
        "compiled_over_eager": round(compiled_ms / eager_ms, 3),
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "src/transformers_twotower/demo"))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/compile_cpu.json"))
    args = parser.parse_args(argv)

    from transformers_twotower import TwoTowerForDiffusionLM

    torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True
    generator = torch.Generator().manual_seed(0)

    def load():
        return TwoTowerForDiffusionLM.from_pretrained(args.model, dtype=torch.float32)

    rows = []

    # Training: forward and backward of the masked-diffusion loss.
    eager_model, compiled_source = load().train(), load().train()
    compiled_model = torch.compile(compiled_source, backend=args.backend)
    vocab = eager_model.config.vocab_size
    ids = torch.randint(4, vocab, (4, 128), generator=generator)
    noise = torch.rand(ids.shape, generator=generator) < 0.5

    def train_step(model, source):
        def step():
            source.zero_grad(set_to_none=True)
            model(ids, labels=ids, noise_mask=noise).loss.backward()

        return step

    rows.append(
        measure(
            "training forward+backward (4 x 128)",
            train_step(eager_model, eager_model),
            train_step(compiled_model, compiled_source),
            args.repeats,
        )
    )

    # Denoising: one step over a block (the model's size) after a 512-token prompt, 5 of its tokens committed.
    model = load().eval()
    prompt = torch.randint(4, vocab, (1, 512), generator=generator)
    size = model.config.block_size
    block = torch.full((1, size), model.config.mask_token_id)
    block[0, :5] = torch.randint(4, vocab, (5,), generator=generator)
    t = torch.tensor([(size - 5) / size])
    cache = model.prefill(prompt)
    eager_denoiser = model.denoiser_tower
    compiled_denoiser = torch.compile(eager_denoiser, backend=args.backend)

    def denoise_step(denoiser):
        def step():
            model.denoiser_tower = denoiser
            with torch.no_grad():
                model.denoise_step(block, cache, t)

        return step

    rows.append(
        measure(
            "denoise_step (1 x 16 after 512)",
            denoise_step(eager_denoiser),
            denoise_step(compiled_denoiser),
            args.repeats,
        )
    )
    model.denoiser_tower = eager_denoiser

    result = {
        "backend": args.backend,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
