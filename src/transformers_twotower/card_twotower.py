"""The Hub model card (`README.md`) that `save_pretrained` and the conversion scripts write: one function, metadata
through `huggingface_hub`'s `ModelCardData`."""

from huggingface_hub import ModelCard, ModelCardData

from .defaults_twotower import MODEL_GENERATION_DEFAULTS as MODEL_DEFAULTS


TAGS = ["twotower", "diffusion", "block-diffusion", "nemotron-h", "mamba2", "mixture-of-experts"]


def model_card(
    config,
    generation_config,
    title: str = "A TwoTower model",
    description: str = "",
    base_model: str | None = None,
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    extra: str = "",
) -> ModelCard:
    """The card: YAML metadata (`library_name`, `pipeline_tag`, tags; `base_model` and the license where known),
    how to load the model with `trust_remote_code`, its generation defaults and the three generation modes.
    `description` and `extra` are Markdown placed after the title and at the end."""
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS,
        base_model=base_model,
        license=license,
        license_name=license_name,
        license_link=license_link,
    )

    def default(name):  # the model's value, else what `generate` would use
        value = getattr(generation_config, name, None)
        return MODEL_DEFAULTS.get(name) if value is None else value

    block = default("block_size") or config.block_size
    body = f"""
# {title}

{description + chr(10) * 2 if description else ""}TwoTower is a block-wise mask-diffusion language model made of two copies of the Nemotron-H hybrid backbone
(Mamba-2 + attention + mixture-of-experts; pattern `{config.hybrid_override_pattern}`). A frozen autoregressive
*context tower* reads the prompt and every committed token; a trained *denoiser tower* fills blocks of {block} masked
tokens (mask id {config.mask_token_id}) in a few parallel steps, attending layer by layer to the context tower's K/V
and starting its Mamba scans from the context tower's states.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=True)
inputs = tokenizer(["The capital of France is"], return_tensors="pt").to(model.device)
out = model.generate(**inputs)                                  # mask diffusion, with the defaults below
out = model.generate(**inputs, generation_mode="ar")            # the autoregressive baseline (context tower alone)
```

`AutoModel` loads the same model. The tokenizer line passes `trust_remote_code=True` too: transformers reads the
model's configuration (TwoTower's own class, in this folder) before the tokenizer, and would otherwise ask whether
to run it. With the `transformers-twotower` package installed, `TwoTowerForDiffusionLM.from_pretrained(path)` needs
no remote code.

## Generation defaults

| field | value |
|---|---|
| `generation_mode` | `{default("generation_mode")}` |
| `max_new_tokens` | {default("max_new_tokens")} |
| `block_size` | {block} |
| `steps_per_block` | {default("steps_per_block")} |
| `confidence_threshold` | {default("confidence_threshold")} |
| `do_sample` | {default("do_sample")} |
| `repetition_penalty` | {default("repetition_penalty")} |

## Generation modes

- `mask_diffusion`: blocks of {block} tokens, up to `steps_per_block` denoiser steps per block, committing every
  masked position whose confidence exceeds `confidence_threshold` (at least one per step).
- `mock_ar`: the denoiser decoding one token at a time.
- `ar`: the context tower alone, i.e. the original backbone.

{extra}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body.rstrip()}\n")


__all__ = ["model_card"]
