"""Loads a saved TwoTower sharded by tensor parallelism, expert parallelism or both, under torchrun (gloo, CPU), and
records what the tests compare with one process: every generation mode eager and compiled, the denoiser's logits,
the training loss and the denoiser's gradients (gathered whole), and what loading reported.

    torchrun --nproc-per-node N parallel_worker.py MODEL_DIR OUT_FILE PLAN [PLAN ...]    # PLAN: tp, ep, tp+ep
    python parallel_worker.py MODEL_DIR OUT_FILE none                                     # one process

Rank 0 writes `{plan: record}` with `torch.save`, and each sharded model is saved to `saved-PLAN` beside it. All plans
load in one process group, one after another.
"""

import os
import sys

import torch
from conftest import DIFFUSION, clean_rows, left_pad
from torch.distributed.tensor import DTensor
from transformers import CompileConfig

from transformers_twotower import TwoTowerForDiffusionLM
from transformers_twotower.defaults_twotower import GENERATION_MODES
from transformers_twotower.parallel_twotower import distributed_config


# Compiled with AOTAutograd (functionalization sees the DTensors) and no code generation, to stay within a CI
# budget; `TWOTOWER_PARALLEL_BACKEND=inductor` runs inductor's code instead, by hand (docs/generation.md, "Several
# GPUs").
COMPILED = CompileConfig(backend=os.environ.get("TWOTOWER_PARALLEL_BACKEND", "aot_eager"), mode=None, fullgraph=True)


def generations(model, compiled_too: bool = True) -> dict:
    """Greedy generation of a ragged left-padded batch in every mode, eager and (with `compiled_too`) compiled, with
    row 1 ending early at an EOS: `{(mode, compiled): (sequences, nfe)}`."""
    ids, mask = left_pad(clean_rows(model, (9, 5), seed=1))
    options = dict(attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True, **DIFFUSION)
    records = {}
    for mode in GENERATION_MODES:
        free = model.generate(ids, generation_mode=mode, eos_token_id=None, **options).sequences[:, ids.shape[1] :]
        eos = int(free[1, 5])
        for compiled in (False, True) if compiled_too else (False,):
            out = model.generate(
                ids, generation_mode=mode, eos_token_id=eos, compile=compiled,
                compile_config=COMPILED if compiled else None, **options,
            )  # fmt: skip
            records[mode, compiled] = (out.sequences, out.nfe)
    return records


def training(model) -> dict:
    """The masked-diffusion loss and the denoiser's logits on a fixed noise, and the denoiser's gradients (whole)."""
    ids, mask = left_pad(clean_rows(model, (10, 7, 12), seed=2))
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids, noise_mask=noise)
    out.loss.backward()
    model.eval()
    gradients = {}
    for name, parameter in model.denoiser_tower.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            gradients[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    model.zero_grad(set_to_none=True)
    logits = out.logits.full_tensor() if isinstance(out.logits, DTensor) else out.logits
    return {"loss": out.loss.detach(), "logits": logits.detach(), "gradients": gradients}


def sharded(model) -> list[str]:
    return sorted(name for name, parameter in model.named_parameters() if isinstance(parameter, DTensor))


def record(model_dir: str, plan: str, save_dir: str, compiled_too: bool = True) -> dict:
    """What one plan (`"none"`: one process) gives; the model is also saved to `save_dir` (one process writes it)."""
    config = {} if plan == "none" else {"distributed_config": distributed_config(plan)}
    model, info = TwoTowerForDiffusionLM.from_pretrained(model_dir, output_loading_info=True, **config)
    model.eval()
    problems = {kind: sorted(names) for kind, names in info.items() if names}
    model.save_pretrained(save_dir)
    return {
        "loading": problems,
        "sharded": sharded(model),
        **training(model),
        "generations": generations(model, compiled_too),
    }


def main(model_dir: str, out_file: str, plans: list[str]):
    saves = os.path.dirname(os.path.abspath(out_file))
    records = {plan: record(model_dir, plan, os.path.join(saves, f"saved-{plan}")) for plan in plans}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(records, out_file)
    if torch.distributed.is_initialized():  # leave together: gloo aborts a process that exits with peers still up
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
