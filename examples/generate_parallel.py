"""Generate with TwoTower split over several GPUs (or CPU processes), one process per GPU under torchrun.

    torchrun --nproc-per-node 8 examples/generate_parallel.py --model twotower --plan tp+ep "def fibonacci(n):"
    torchrun --nproc-per-node 2 examples/generate_parallel.py --plan ep --device cpu "def fibonacci(n):"

`--plan`: `tp` (tensor parallelism), `ep` (expert parallelism) or `tp+ep` (experts by expert, embeddings and heads
by vocabulary); see docs/generation.md, "Several GPUs". Every process runs the same `generate` on the same prompt and
gets the same tokens; the first prints them, with NFE and the time the call took. `--compile` decodes with
`compile=True`. Without `--model`, the bundled demo.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer

from transformers_twotower import TwoTowerForDiffusionLM
from transformers_twotower.loading_twotower import DEMO_MODEL
from transformers_twotower.parallel_twotower import PLANS, distributed_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--plan", choices=PLANS, default="tp+ep")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if args.device == "cpu":
        # transformers would start the process group for the machine's accelerator (NCCL where CUDA is): gloo here.
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    plan = distributed_config(args.plan, config=AutoConfig.from_pretrained(args.model))
    model = TwoTowerForDiffusionLM.from_pretrained(args.model, dtype=dtype, distributed_config=plan).eval()
    inputs = tokenizer([args.prompt], return_tensors="pt").to(model.device)
    began = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, compile=args.compile,
                         return_dict_in_generate=True)  # fmt: skip
    seconds = time.perf_counter() - began
    if rank == 0:
        new = out.sequences[0, inputs.input_ids.shape[1] :]
        print(tokenizer.decode(new, skip_special_tokens=True))
        print(f"--- {args.plan} over {dist.get_world_size()} processes: {len(new)} tokens, NFE {int(out.nfe[0])}, "
              f"{seconds:.1f} s")  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
