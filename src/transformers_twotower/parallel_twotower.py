"""Several processes: the `DistributedConfig` of each way TwoTower splits across GPUs under `torchrun`.

Both towers inherit Nemotron-H's plans (transformers merges a submodule's plan under its prefix):

- tensor parallelism (`"tp"`): each expert's `up_proj` by columns and `down_proj` by rows (every rank holds a slice
  of every expert), the embeddings by vocabulary rows, both heads by vocabulary columns (gathered);
- expert parallelism (`"ep"`): each rank holds `n_routed_experts / N` whole experts and the routed tokens reach them
  (`ep_dispatch_experts`); everything else is replicated;
- both (`"tp+ep"`): experts as in `"ep"`, embeddings and heads as in `"tp"`.

Attention, Mamba, the shared experts and the router stay whole on every rank (docs/generation.md, "Several GPUs").
"""

import os

from transformers.distributed import DistributedConfig


PLANS = ("tp", "ep", "tp+ep")

# What tensor parallelism splits outside the experts. Expert parallelism alone keeps them whole ("replicate"):
# transformers 5.23 refuses `tp_size > 1` with an empty `tp_plan`, which its docs give as the form of EP alone.
DENSE_TP_MODULES = ("lm_head", "context_tower.lm_head", "context_tower.embeddings", "denoiser_tower.embeddings")


def distributed_config(plan: str, size: int | None = None, config=None) -> DistributedConfig:
    """The `DistributedConfig` for `plan` (`"tp"`, `"ep"` or `"tp+ep"`) over `size` processes (default: torchrun's
    `WORLD_SIZE`). Pass it to `from_pretrained(..., distributed_config=...)`. With the model's `config`, a size that
    does not divide its routed experts (expert parallelism) is refused here, not deep inside loading."""
    if plan not in PLANS:
        raise ValueError(f"`plan` must be one of {PLANS}, got {plan!r}.")
    size = int(os.environ.get("WORLD_SIZE", "1")) if size is None else size
    if config is not None and plan != "tp" and config.n_routed_experts % size:
        raise ValueError(
            f"Expert parallelism over {size} processes needs a number of routed experts they divide; this model has "
            f'{config.n_routed_experts}. Use another process count, or `plan="tp"`.'
        )
    if plan == "tp":
        return DistributedConfig(tp_size=size, tp_plan="auto")
    if plan == "ep":
        return DistributedConfig(tp_size=size, ep_size=size, tp_plan=dict.fromkeys(DENSE_TP_MODULES, "replicate"))
    return DistributedConfig(tp_size=size, ep_size=size, tp_plan="auto")


__all__ = ["PLANS", "distributed_config"]
