"""Trains the tiny TwoTower's denoiser for a few steps, sharded with FSDP2 (`fully_shard`) under torchrun on CPU
processes (gloo), or alone; writes the full (unsharded) weights and a `save_pretrained` folder.

    python fsdp_worker.py OUT_FILE SAVE_DIR                          # one process, no sharding
    torchrun --nproc-per-node 2 fsdp_worker.py OUT_FILE SAVE_DIR     # two processes, the denoiser sharded
    torchrun --nproc-per-node 2 fsdp_worker.py OUT_FILE SAVE_DIR compiled   # and every block compiled

With `compiled`, every block of both towers is compiled (`aot_eager`: the graphs, forward and backward, without
inductor's code generation) before it is sharded, as torchtitan compiles its blocks under FSDP2.

Every block of both towers, each tower's remaining parameters (embeddings, adaLN-single, final norm, the context
head) and the denoiser's head are FSDP units: the frozen context tower is sharded too (weights only: it has no
gradient and no optimizer state), the choice that needs least memory per process (docs/training.md). Every row masks the same number of
tokens, so the mean of the per-process losses is the global mean and the averaged gradients are the single-process
ones.
"""

import os
import sys

import torch
from conftest import tiny_model

from transformers_twotower import TwoTowerForDiffusionLM


def batch():
    generator = torch.Generator().manual_seed(0)
    rows, length = 8, 12
    ids = torch.randint(4, 64, (rows, length), generator=generator)
    noise = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):  # 6 masked tokens per row, at random places
        noise[r, torch.randperm(length, generator=generator)[:6]] = True
    return ids, noise


def main(out_file: str, save_dir: str, compiled: bool = False):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = tiny_model(seed=0).train()
    if compiled:
        for tower in (model.context_tower, model.denoiser_tower):
            for layer in tower.layers:
                layer.compile(backend="aot_eager")
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for tower in (model.context_tower, model.denoiser_tower):
            for layer in tower.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(tower, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh)

    ids, noise = batch()
    rows = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)  # this process's share of the batch
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(ids[rows], labels=ids[rows], noise_mask=noise[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "the blocks ran uncompiled"
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        state = {k: v.detach().clone() for k, v in state.items()}
        torch.save(state, out_file)
        full = TwoTowerForDiffusionLM(model.config)  # unsharded, for `save_pretrained` in the release's layout
        full.load_state_dict(state)
        full.save_pretrained(save_dir)
    if world > 1:  # leave together: gloo aborts a process that exits with peers still up
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], compiled=sys.argv[3:] == ["compiled"])
