"""NVIDIA's TwoTower release layout <-> this package's layout.

    python conversion/convert_nvidia_twotower.py --input RELEASE_DIR --output OUT_DIR [--dtype auto|bfloat16|float32]
        [--max-shard-size 5GB] [--overwrite] [--reverse | --context-tower]

Release -> package writes exactly what `TwoTowerForDiffusionLM.save_pretrained` writes, so the folder loads with
`TwoTowerForDiffusionLM.from_pretrained(OUT_DIR)`, or anywhere with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`:

- `config.json`: a `TwoTowerConfig` with `auto_map` for AutoConfig and AutoModelForCausalLM, and the package's code;
- `generation_config.json`: mask diffusion at the published operating point (block 16, 16 steps, threshold 0.8);
- the weights under the release's names (the layout `save_pretrained` writes: one tensor per MoE expert), resharded
  safetensors with an index, optionally cast;
- the tokenizer files when the input has them, and a model card (README.md).

`--reverse` writes the release's `nemotron_h` config back. Release -> package -> release gives the same tensors bit
for bit, dtypes included. Both directions read the experts one tensor per expert (the release, and what
`save_pretrained` writes) or stacked (folders saved before the package wrote one layout).

`--context-tower` writes the frozen context tower alone as a plain Nemotron-H checkpoint (`backbone.*`, `lm_head`,
a `NemotronHForCausalLM` config): the AR baseline, for transformers' `NemotronHForCausalLM` (and engines that
read Nemotron-H checkpoints; not tried here).

The conversion streams: it holds about one source shard and one output shard in memory, never the model. It writes
into a temporary folder beside the output and moves it into place at the end, so a failed or interrupted run leaves
the output as it was. Only safetensors are read.
"""

import argparse
import json
import sys
from pathlib import Path

from checkpoint_io import (
    MAX_SHARD_SIZE,
    add_output_arguments,
    atomic_output_dir,
    convert_tensors,
    copy_tokenizer_files,
    load_config,
    nemotron_h_tensor_shapes,
    resolve_dtype,
    run_conversion,
    saved_tensor_shapes,
    write_model_files,
)

from transformers_twotower import TwoTowerConfig, TwoTowerGenerationConfig
from transformers_twotower.card_twotower import model_card as package_model_card
from transformers_twotower.layout_twotower import (
    context_tower_config_dict,
    context_tower_to_backbone,
    release_config_dict,
)


def model_card(config: TwoTowerConfig, source: str) -> str:
    description = (
        f"Converted from `{source}` by `conversion/convert_nvidia_twotower.py` of the `transformers-twotower` package, "
        "which runs TwoTower through the Hugging Face Transformers API."
    )
    extra = """## Published figures

From NVIDIA's release of Nemotron-Labs-TwoTower (model card and paper): the denoiser keeps 98.7% of the AR baseline's
aggregate benchmark quality at 2.42x its wall-clock generation throughput (block 16, threshold 0.8, bf16 on 2xH100),
after training on about 2.1T tokens. Examples (AR baseline -> TwoTower): MMLU 78.56 -> 78.24, GSM8K 92.49 -> 90.14,
HumanEval 79.27 -> 75.58, ARC-C 91.72 -> 92.66.

## License

NVIDIA Open Model License, as the original release."""
    card = package_model_card(
        config, TwoTowerGenerationConfig.from_model_config(config),
        title="Nemotron-Labs-TwoTower (transformers-twotower layout)", description=description,
        base_model="nvidia/Nemotron-Labs-TwoTower-30B-A3B-Base-BF16", license="other",
        license_name="nvidia-open-model-license",
        license_link="https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/",
        extra=extra,
    )  # fmt: skip
    return str(card)


def copy_checkpoint(
    input_dir, output_dir, dtype: str, max_shard_size: str | int, overwrite: bool, write_files,
    rename=lambda name: [name], tensor_shapes=saved_tensor_shapes,
):  # fmt: skip
    """Every direction: the tensors pass through as they are, renamed by `rename` (the names are the same in the
    release and in this package's folders, the layout `save_pretrained` writes), resharded and perhaps cast, and
    checked against `tensor_shapes(config)`; the files around them (`write_files(work, config, input_dir, dtype)`)
    differ."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    target_dtype = resolve_dtype(dtype)
    config = load_config(input_dir)
    with atomic_output_dir(output_dir, overwrite) as work:
        expected = tensor_shapes(config)
        convert_tensors(input_dir, work, rename, expected, target_dtype, max_shard_size, str(input_dir))
        write_files(work, config, input_dir, target_dtype)
    return output_dir


def files_without_code(config_dict):
    """`copy_checkpoint`'s `write_files` for a folder that needs no code of ours: `config_dict(config)` as its
    `config.json` (Python's json writes the bare `Infinity` the release's has) and the tokenizer files."""

    def write_files(work, config, source, target_dtype):
        if target_dtype is not None:
            config.dtype = target_dtype
        (work / "config.json").write_text(json.dumps(config_dict(config), indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(source, work)

    return write_files


def convert_release_to_package(
    input_dir, output_dir, dtype: str = "auto", max_shard_size: str | int = MAX_SHARD_SIZE, overwrite: bool = False
) -> Path:
    """NVIDIA's release layout -> this package's folder (see the module docstring). Returns the output folder."""

    def package_files(work, config, source, target_dtype):
        write_model_files(work, config, source, model_card(config, str(source)), target_dtype)

    return copy_checkpoint(input_dir, output_dir, dtype, max_shard_size, overwrite, package_files)


def convert_package_to_release(
    input_dir, output_dir, dtype: str = "auto", max_shard_size: str | int = MAX_SHARD_SIZE, overwrite: bool = False
) -> Path:
    """This package's layout -> NVIDIA's release layout (a `nemotron_h` config, no code). Returns the output folder."""
    return copy_checkpoint(
        input_dir, output_dir, dtype, max_shard_size, overwrite, files_without_code(release_config_dict)
    )


def convert_context_tower(
    input_dir, output_dir, dtype: str = "auto", max_shard_size: str | int = MAX_SHARD_SIZE, overwrite: bool = False
) -> Path:
    """A TwoTower folder (either layout) -> a plain Nemotron-H checkpoint of its context tower, the AR baseline that
    transformers' `NemotronHForCausalLM` loads as it is. Returns the output folder."""
    return copy_checkpoint(
        input_dir, output_dir, dtype, max_shard_size, overwrite, files_without_code(context_tower_config_dict),
        rename=context_tower_to_backbone, tensor_shapes=nemotron_h_tensor_shapes,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="checkpoint folder to read")
    add_output_arguments(parser)
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--reverse", action="store_true", help="this package's layout -> NVIDIA's release layout")
    direction.add_argument(
        "--context-tower", action="store_true", help="the context tower alone, as a plain Nemotron-H checkpoint"
    )
    args = parser.parse_args(argv)
    convert = convert_release_to_package
    if args.reverse:
        convert = convert_package_to_release
    elif args.context_tower:
        convert = convert_context_tower
    return run_conversion(lambda: convert(args.input, args.output, args.dtype, args.max_shard_size, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
