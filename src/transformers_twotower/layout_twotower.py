"""The checkpoint layout: NVIDIA's release on disk versus this package's modules, written down once.

A TwoTower checkpoint, whether the release or a folder `save_pretrained` wrote, stores:

- the towers under `context_tower.*` and `denoiser_tower.*`, one tensor per MoE expert
  (`...mixer.experts.{i}.up_proj.weight`); the converters also read experts stacked along a first dimension
  (`...mixer.experts.up_proj`, the model's own layout), which folders written before the package fixed its layout hold;
- the denoiser's head as `lm_head` and the context tower's as `context_lm_head` (the model keeps the latter at
  `context_tower.lm_head`);
- the time conditioning (adaLN-single) at the top level, `t_embedder.*`, `t_block.*`, `scale_shift_tables.*`
  (the model keeps it at `denoiser_tower.adaln.*`).

Here live the release's names, the rename rules transformers applies when loading (and reverts when saving), the
mapping a plain Nemotron-H backbone takes into the two towers, and the release's `config.json` both ways: what a
`TwoTowerConfig` drops when it reads one, and how one is written back. The configuration, the model and the
conversion scripts read it from here. It imports nothing from this package, so any of them may import it.
"""

import re

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig


# The release's `config.json`: its model type and architecture, and the word its `auto_map` (NVIDIA's remote code,
# which this package does not ship) is recognised by.
RELEASE_MODEL_TYPE = "nemotron_h"
RELEASE_ARCHITECTURE = "NemotronHTwoTowerForCausalLM"
RELEASE_AUTO_MAP_MARKER = "NemotronHTwoTower"

# The two towers' prefixes, and the prefix a plain Nemotron-H checkpoint stores its backbone under (transformers'
# `NemotronHForCausalLM` writes `backbone.`, older saves `model.`).
CONTEXT_TOWER, DENOISER_TOWER = "context_tower", "denoiser_tower"
BACKBONE_PREFIXES = ("backbone", "model")

# The heads: the denoiser's is the model's `lm_head`; the context tower's is stored at the top level.
LM_HEAD = "lm_head"
CONTEXT_HEAD = "context_lm_head"
CONTEXT_HEAD_MODULE = f"{CONTEXT_TOWER}.lm_head"

# The time conditioning's top-level prefixes, and the module that holds them in the model.
T_EMBEDDER, T_BLOCK, SCALE_SHIFT_TABLES = "t_embedder", "t_block", "scale_shift_tables"
TIME_CONDITIONING = (T_EMBEDDER, T_BLOCK, SCALE_SHIFT_TABLES)
TIME_CONDITIONING_MODULE = f"{DENOISER_TOWER}.adaln"


def checkpoint_conversion_mapping() -> list:
    """The rules from the stored names to the model's: (1) the context head and the time conditioning move into
    the modules that own them; (2) the release stores one tensor per MoE expert, and transformers' Nemotron-H
    converters stack them when loading (its `backbone.` -> `model.` renaming is left out: TwoTower's keys have no
    `backbone.`)."""
    renamings = [WeightRenaming(rf"^{CONTEXT_HEAD}\.", f"{CONTEXT_HEAD_MODULE}.")]
    renamings += [WeightRenaming(rf"^{name}\.", f"{TIME_CONDITIONING_MODULE}.{name}.") for name in TIME_CONDITIONING]
    experts = [
        rule for rule in get_checkpoint_conversion_mapping(RELEASE_MODEL_TYPE) if isinstance(rule, WeightConverter)
    ]
    return renamings + experts


def register_checkpoint_layout(model_type: str):
    """Register the rules for `model_type`: `from_pretrained` applies them, `save_pretrained` reverts them, so a
    saved folder has the release's layout again."""
    register_checkpoint_conversion_mapping(model_type, checkpoint_conversion_mapping(), overwrite=True)


_STACKED_EXPERTS = re.compile(r"^(?P<experts>.+\.mixer\.experts)\.(?P<projection>up_proj|down_proj)$")


def release_pieces(name: str, shape) -> list[tuple[str, int | None]]:
    """The release's names for a stored tensor of `shape`: `[(name, None)]` for a tensor stored as the release stores
    it; for experts stacked along dimension 0 (`...mixer.experts.up_proj`, `(experts, out, in)`), one
    `(...mixer.experts.{i}.up_proj.weight, i)` per expert, `i` the index along that dimension."""
    match = _STACKED_EXPERTS.match(name)
    if match is None:
        return [(name, None)]
    return [(f"{match['experts']}.{i}.{match['projection']}.weight", i) for i in range(shape[0])]


_BACKBONE_KEY = re.compile(rf"^(?:{'|'.join(BACKBONE_PREFIXES)})\.(?P<rest>.+)$")


def backbone_to_towers(name: str) -> list[str]:
    """The names a plain Nemotron-H tensor takes in a TwoTower: a backbone tensor under both towers, the head as both
    heads. Raises a `ValueError` for any other name."""
    if name == f"{LM_HEAD}.weight":
        return [f"{CONTEXT_HEAD}.weight", f"{LM_HEAD}.weight"]
    match = _BACKBONE_KEY.match(name)
    if match is None:
        expected = ", ".join(f"{prefix}.*" for prefix in BACKBONE_PREFIXES)
        raise ValueError(f"{name} is not a Nemotron-H backbone tensor (expected {expected} or {LM_HEAD}.weight)")
    return [f"{CONTEXT_TOWER}.{match['rest']}", f"{DENOISER_TOWER}.{match['rest']}"]


def context_tower_to_backbone(name: str) -> list[str]:
    """The name a TwoTower tensor takes in a plain Nemotron-H checkpoint of its context tower (the AR baseline): the
    context tower under `backbone.`, its head as `lm_head`; the denoiser and the time conditioning are left out
    (`[]`)."""
    if name == f"{CONTEXT_HEAD}.weight":
        return [f"{LM_HEAD}.weight"]
    if name.startswith(f"{CONTEXT_TOWER}."):
        return [f"{BACKBONE_PREFIXES[0]}.{name.removeprefix(f'{CONTEXT_TOWER}.')}"]
    return []


def context_tower_as_nemotron_h(model):
    """transformers' own `NemotronHForCausalLM` holding a TwoTower's context tower and its head: the AR baseline,
    with Nemotron-H's code. Its Mamba layers clamp `dt` with the config's `time_step_limit`, as the towers do
    (transformers' Nemotron-H clamps at `time_step_min`). It shares no memory with `model` (the weights are copied)."""
    from transformers import NemotronHForCausalLM

    fields = NemotronHConfig.__dataclass_fields__
    config = NemotronHConfig(**{k: v for k, v in model.config.to_dict().items() if k in fields})
    nemotron_h = NemotronHForCausalLM(config).to(device=model.device, dtype=model.dtype).train(model.training)
    state = {f"model.{k}": v for k, v in model.context_tower.state_dict().items() if not k.startswith(f"{LM_HEAD}.")}
    nemotron_h.load_state_dict({**state, f"{LM_HEAD}.weight": model.context_tower.lm_head.weight})
    for layer in nemotron_h.model.layers:
        if layer.block_type == "linear_attention":
            layer.mixer.time_step_limit = tuple(model.config.time_step_limit)
    return nemotron_h


def strip_release_fields(kwargs: dict) -> dict:
    """Drop, in place, what a config's kwargs carry that does not describe `TwoTowerConfig`: any `model_type` (the
    release says `nemotron_h`) and an `auto_map` naming the release's remote code. Returns `kwargs`."""
    kwargs.pop("model_type", None)
    if RELEASE_AUTO_MAP_MARKER in str(kwargs.get("auto_map", "")):
        kwargs.pop("auto_map")
    return kwargs


def release_config_dict(config: NemotronHConfig) -> dict:
    """The release's `config.json` for a `TwoTowerConfig`: its Nemotron-H fields under the release's model type and
    architecture. The release's `auto_map` names remote code this package does not ship, so it is not written."""
    full = config.to_dict()
    values = {name: full[name] for name in NemotronHConfig.__annotations__ if name in full}
    values.pop("layers_block_type", None)
    values.pop("mtp_layers_block_type", None)
    values.update(
        model_type=RELEASE_MODEL_TYPE,
        architectures=[RELEASE_ARCHITECTURE],
        hybrid_override_pattern=config.hybrid_override_pattern,
        time_step_limit=list(config.time_step_limit),
        torch_dtype=str(config.dtype).removeprefix("torch.") if config.dtype is not None else "bfloat16",
    )
    return values


def context_tower_config_dict(config: NemotronHConfig) -> dict:
    """The `config.json` of a plain Nemotron-H checkpoint holding a TwoTower's context tower: the release's fields,
    read by transformers' `NemotronHForCausalLM`. transformers clamps the Mamba `dt` from below at `time_step_min`,
    NVIDIA's code at `time_step_limit[0]`: `time_step_min` is set to the latter, so both compute what the tower
    computes (otherwise it only sets the range `dt_bias` is initialised in, which a trained checkpoint no longer uses).
    Where that is 0 (the release), the smallest normal float32 stands in: the initialisation takes its logarithm, and
    `softplus` gives no `dt` between the two.
    """
    values = release_config_dict(config) | {"architectures": ["NemotronHForCausalLM"]}
    values["time_step_min"] = max(float(config.time_step_limit[0]), torch.finfo(torch.float32).tiny)
    return values
