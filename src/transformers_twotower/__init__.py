"""Nemotron-Labs-TwoTower for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_twotower import TwoTowerConfig
from .context_twotower import DenoiserContext, TwoTowerCache, TwoTowerContextTower, TwoTowerDecodeState
from .denoiser_twotower import TwoTowerDenoiser
from .generation_config_twotower import DiffusionStep, TwoTowerGenerationConfig, TwoTowerGenerationOutput
from .generation_twotower import TwoTowerGenerationMixin
from .modeling_twotower import TwoTowerForDiffusionLM, TwoTowerPreTrainedModel, two_tower_device_map


AutoConfig.register("twotower", TwoTowerConfig, exist_ok=True)
AutoModel.register(TwoTowerConfig, TwoTowerForDiffusionLM, exist_ok=True)
AutoModelForCausalLM.register(TwoTowerConfig, TwoTowerForDiffusionLM, exist_ok=True)

__all__ = [
    "DenoiserContext",
    "DiffusionStep",
    "TwoTowerCache",
    "TwoTowerConfig",
    "TwoTowerContextTower",
    "TwoTowerDecodeState",
    "TwoTowerDenoiser",
    "TwoTowerForDiffusionLM",
    "TwoTowerGenerationConfig",
    "TwoTowerGenerationMixin",
    "TwoTowerGenerationOutput",
    "TwoTowerPreTrainedModel",
    "two_tower_device_map",
]
