"""TwoTower configuration: one Nemotron-H backbone description shared by both towers, plus the diffusion fields."""

from huggingface_hub.dataclasses import strict
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

from .defaults_twotower import BLOCK_SIZE, MASK_TOKEN_ID
from .layout_twotower import strip_release_fields


@strict
class TwoTowerConfig(NemotronHConfig):
    r"""
    Configuration of [`TwoTowerForDiffusionLM`]. Both towers are the same Nemotron-H backbone, so every
    [`NemotronHConfig`] field (and its legacy spellings: `hybrid_override_pattern`, `mamba_*`, `n_routed_experts`, ...)
    is accepted unchanged; the release's `config.json` loads as it is.

    mask_token_id (`int`, *optional*, defaults to 3):
        Id of the mask token that marks still-noisy positions of a block.
    block_size (`int`, *optional*, defaults to 16):
        Number of tokens the denoiser fills in parallel (`S` in the paper).
    time_embedding_size (`int`, *optional*, defaults to 256):
        Width of the sinusoidal features of the diffusion time `t` fed to `t_embedder`.
    time_embedding_scale (`float`, *optional*, defaults to 1000.0):
        `t` is multiplied by this before the sinusoidal features are taken.
    freeze_context_tower (`bool`, *optional*, defaults to `True`):
        Whether the context tower's parameters have `requires_grad=False`. The context tower always runs without
        gradient; this only decides whether an optimizer may see its parameters.

    Unlike transformers' Nemotron-H, `time_step_limit` is honoured as the clamp of the Mamba `dt` (the release's
    `[0.0, inf]` means no clamp at all).
    """

    model_type = "twotower"

    mask_token_id: int = MASK_TOKEN_ID
    block_size: int = BLOCK_SIZE
    time_embedding_size: int = 256
    time_embedding_scale: float | int = 1000.0
    freeze_context_tower: bool = True

    @staticmethod
    def _pattern_to_list(pattern: str) -> list:
        mapping = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
        unknown = sorted(set(pattern) - set(mapping))
        if unknown:
            raise ValueError(
                f"`hybrid_override_pattern` contains unknown layer characters {unknown}; "
                f"allowed are {sorted(mapping)} (M = Mamba-2, * = attention, E = MoE, - = MLP). Got {pattern!r}."
            )
        return [mapping[char] for char in pattern]

    def __post_init__(self, **kwargs):
        # The release's config.json loads as it is: its `model_type` and `auto_map` are dropped (`layout_twotower`).
        super().__post_init__(**strip_release_fields(kwargs))
        self._check_twotower_fields()

    def _check_twotower_fields(self):
        """Raise a `ValueError` naming the field for values the two towers cannot be built with."""
        if self.block_size < 1:
            raise ValueError(f"`block_size` must be >= 1, got {self.block_size}.")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"`mask_token_id` must be inside the vocabulary [0, {self.vocab_size}), got {self.mask_token_id}."
            )
        if self.time_embedding_size < 2 or self.time_embedding_size % 2:
            raise ValueError(f"`time_embedding_size` must be a positive even number, got {self.time_embedding_size}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(
                f"`mamba_num_heads` ({self.mamba_num_heads}) must be divisible by `n_groups` ({self.n_groups})."
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"`n_routed_experts` ({self.n_routed_experts}) must be divisible by `n_group` ({self.n_group})."
            )
        if len(self.time_step_limit) != 2 or self.time_step_limit[0] > self.time_step_limit[1]:
            raise ValueError(f"`time_step_limit` must be a [min, max] pair, got {self.time_step_limit}.")


TwoTowerConfig.register_for_auto_class("AutoConfig")

__all__ = ["TwoTowerConfig"]
