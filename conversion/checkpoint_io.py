"""What the conversion scripts share: streaming safetensors I/O, and the one folder layout they write.

- `list_shards` / `open_shard`: read a checkpoint's shards (safetensors only; nothing is ever unpickled), with errors
  that name the file at fault.
- `convert_tensors`: plan the output's shards from the names, shapes and dtypes the source's headers give
  (`huggingface_hub.split_torch_state_dict_into_shards`, as `save_pretrained` plans them), then fill one output shard
  at a time, reading each of its tensors by name from the source shards.
- `atomic_output_dir`: build the result in a temporary folder beside the target and move it into place only when
  everything succeeded, so an interrupted or failed run leaves the target as it was.
- `saved_tensor_shapes` / `check_keys`: the tensors `save_pretrained` writes for a config (the release's layout: one
  tensor per MoE expert, time conditioning at the top level), and the check that a conversion produced exactly them.
- `write_model_files`: everything but the weights, as `save_pretrained` writes it (config with `auto_map`, generation
  config, the package's code), plus the tokenizer files and a model card.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.core_model_loading import revert_weight_conversion
from transformers.dynamic_module_utils import custom_object_save

from transformers_twotower import TwoTowerConfig, TwoTowerForDiffusionLM
from transformers_twotower.layout_twotower import BACKBONE_PREFIXES, release_pieces
from transformers_twotower.modeling_twotower import add_auto_model


INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"  # the converters' default (the Hub's usual shard size; `save_pretrained`'s is 50GB)
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # model.safetensors, or model-0000i-of-0000n.safetensors
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
KEEP_FP32 = ("e_score_correction_bias",)  # the router's bias stays fp32, as the release and transformers keep it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensor at fault."""


def load_config(input_dir: Path) -> TwoTowerConfig:
    if not (input_dir / "config.json").is_file():
        raise CheckpointError(f"{input_dir} has no config.json")
    try:
        return TwoTowerConfig.from_pretrained(input_dir)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{input_dir / 'config.json'}: {error}") from error


def resolve_dtype(dtype: str) -> torch.dtype | None:
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def output_dtype(name: str, source: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype tensor `name` is written in: `dtype` for floating tensors except `KEEP_FP32`, else its own."""
    if dtype is None or not source.is_floating_point or any(k in name for k in KEEP_FP32):
        return source
    return dtype


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def list_shards(folder: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a checkpoint folder: those its index names, in order, or a lone `model.safetensors`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"input folder {folder} does not exist")
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: not a safetensors index ({error})") from error
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            path = folder / name
            if Path(name).is_absolute() or path.resolve().parent != folder.resolve():
                raise CheckpointError(f"{index} names a shard outside the input folder: {name!r}")
            if not path.is_file():
                raise CheckpointError(f"{index} names a shard that does not exist: {name}")
            shards.append(path)
        return shards
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds pickle checkpoints only ({', '.join(pickles)}); they are never unpickled here. "
            "Convert them to safetensors first."
        )
    raise CheckpointError(f"no safetensors weights in {folder}")


@contextmanager
def open_shard(shard: Path) -> Iterator:
    """`safe_open` for one shard (random access by name, memory-mapped); any failure reading it names the file."""
    try:
        with safe_open(shard, framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{shard.name}: corrupt or truncated safetensors file ({error})") from error


def shard_keys(shard: Path) -> list[str]:
    with open_shard(shard) as handle:
        return list(handle.keys())


def check_index_matches_shards(folder: Path, shards: list[Path]):
    """An index must name exactly the tensors its shards hold."""
    index = folder / INDEX_NAME
    if not index.exists():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for shard in shards:
        listed = {k for k, v in weight_map.items() if v == shard.name}
        present = set(shard_keys(shard))
        if listed != present:
            missing, extra = sorted(listed - present)[:5], sorted(present - listed)[:5]
            raise CheckpointError(f"{shard.name} does not match {INDEX_NAME}: missing {missing}, not indexed {extra}")


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def check_shard_size(size: str | int) -> str | int:
    """`--max-shard-size` as `save_pretrained(max_shard_size=...)` reads it: huggingface_hub's sharding parses it
    ('5GB', '500MB': decimal units, TB to KB). Refused: what it cannot parse, and a limit under 2 bytes (zero or
    negative), seen as two 1-byte tensors that would not share a shard."""
    probe = {name: torch.empty(1, dtype=torch.uint8, device="meta") for name in ("a", "b")}
    try:
        unusable = split_torch_state_dict_into_shards(probe, max_shard_size=size).is_sharded
    except (ValueError, TypeError):
        unusable = True
    if unusable:
        raise CheckpointError(f"cannot read the shard size {size!r}; write it like '5GB' or '500MB'")
    return size


@contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output`; on success it replaces `output`, on any failure it is removed."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CheckpointError(f"output folder {output} is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield work
        # mkdtemp makes a private folder; the result gets the permissions of anything else the user writes.
        os.chmod(work, 0o777 & ~umask)
        for path in work.iterdir():
            os.chmod(path, 0o666 & ~umask)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if output.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
        os.replace(output, retired / output.name)
        os.replace(work, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(work, output)


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------------------------------
# Checks and key transforms


def check_keys(produced: dict[str, tuple], expected: dict[str, tuple], what: str):
    """Compare produced and expected `{name: (shape, dtype)}`; shapes must match, dtypes are the caller's choice."""
    missing = sorted(set(expected) - set(produced))
    unexpected = sorted(set(produced) - set(expected))
    misshaped = sorted(
        f"{k}: {tuple(produced[k][0])} instead of {tuple(expected[k][0])}"
        for k in set(produced) & set(expected)
        if tuple(produced[k][0]) != tuple(expected[k][0])
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def meta_model(config: TwoTowerConfig) -> TwoTowerForDiffusionLM:
    with torch.device("meta"):
        return TwoTowerForDiffusionLM(config)


def saved_tensor_shapes(config: TwoTowerConfig) -> dict[str, tuple]:
    """`{name: (shape, dtype)}` of what `save_pretrained` writes for `config`: the model's state dict through the
    same reverted loading rules, on the meta device."""
    model = meta_model(config)
    saved = revert_weight_conversion(model, model.state_dict())
    return {name: (tensor.shape, tensor.dtype) for name, tensor in saved.items()}


def nemotron_h_tensor_shapes(config: TwoTowerConfig) -> dict[str, tuple]:
    """`{name: (shape, dtype)}` of a plain Nemotron-H checkpoint of the backbone `config` describes, as NVIDIA's
    Nemotron-3-Nano release stores one: `backbone.*` (transformers' `NemotronHForCausalLM` reads it as `model.*`), one
    tensor per expert, `lm_head.weight`; on the meta device."""
    fields = NemotronHConfig.__dataclass_fields__
    with torch.device("meta"):
        model = NemotronHForCausalLM(NemotronHConfig(**{k: v for k, v in config.to_dict().items() if k in fields}))
    saved = revert_weight_conversion(model, model.state_dict())
    backbone = f"{BACKBONE_PREFIXES[0]}."
    return {re.sub(r"^model\.", backbone, name): (tensor.shape, tensor.dtype) for name, tensor in saved.items()}


def write_model_files(work: Path, config: TwoTowerConfig, source: Path, card: str, dtype: torch.dtype | None):
    """Everything but the weights: what `save_pretrained` writes (the package's code, `config.json` with `auto_map`,
    `generation_config.json`), the source's tokenizer files, and a model card."""
    model = meta_model(config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    add_auto_model(config)
    custom_object_save(model, work, config=config)  # the modeling code and its relative imports, `auto_map`
    config.save_pretrained(work)  # also copies configuration_twotower.py and adds AutoConfig to `auto_map`
    model.generation_config.save_pretrained(work)
    copy_tokenizer_files(source, work)
    (work / "README.md").write_text(card)


def stored_spec(handle, name: str) -> tuple[list[int], torch.dtype]:
    """A stored tensor's shape and dtype, its data left unread (the dtype from an empty slice; a scalar is read)."""
    piece = handle.get_slice(name)
    shape = piece.get_shape()
    return shape, (piece[:0] if shape else piece[...]).dtype


def convert_tensors(
    input_dir: Path,
    work: Path,
    rename: Callable[[str], list[str]],
    expected: dict,
    dtype: torch.dtype | None,
    max_shard_size: str | int,
    what: str,
    new_tensors: dict[str, torch.Tensor] | None = None,
):
    """Write into `work` every source tensor under the names `rename` gives it (a `ValueError` from `rename` names a
    tensor it cannot place; no name drops it), cast to `dtype`, plus `new_tensors` (in `dtype`, else the source's
    floating dtype). `rename` sees the release's names: experts stored stacked are read one expert at a time under the
    release's per-expert names (`layout_twotower.release_pieces`), so every converter reads both expert layouts.

    Streaming: the output is planned from the source's headers (names, shapes, dtypes), checked against `expected`,
    split into shards as `save_pretrained` splits a state dict, then written one output shard at a time, each tensor
    read by name from its source shard. Memory holds one output shard, never the model."""
    limit = check_shard_size(max_shard_size)
    shards = list_shards(input_dir)
    check_index_matches_shards(input_dir, shards)
    planned: dict[str, torch.Tensor] = {}  # output name -> a meta tensor of its shape and dtype
    sources: dict[str, tuple[Path, str, int | None]] = {}  # output name -> (source shard, source name, expert index)
    created: dict[str, torch.Tensor] = {}  # output name -> one of `new_tensors`, cast

    def plan(name: str, shape, out_dtype: torch.dtype, where: str = ""):
        if name in planned:
            raise CheckpointError(f"{where}tensor {name} was produced twice")
        planned[name] = torch.empty(shape, dtype=out_dtype, device="meta")

    floating = None  # the source's floating dtype, for `new_tensors`
    for shard in shards:
        with open_shard(shard) as handle:
            for name in handle.keys():
                shape, stored = stored_spec(handle, name)
                floating = floating or (stored if stored.is_floating_point else None)
                for piece, index in release_pieces(name, shape):
                    try:
                        out_names = rename(piece)
                    except ValueError as error:
                        raise CheckpointError(f"{shard.name}: {error}") from error
                    piece_shape = shape if index is None else shape[1:]
                    for out_name in out_names:
                        plan(out_name, piece_shape, output_dtype(out_name, stored, dtype), f"{shard.name}: {name} -> ")
                        sources[out_name] = (shard, name, index)
    for name, tensor in (new_tensors or {}).items():
        created[name] = tensor.to(dtype or floating or torch.float32)
        plan(name, tensor.shape, created[name].dtype)
    check_keys({name: (t.shape, t.dtype) for name, t in planned.items()}, expected, what)

    split = split_torch_state_dict_into_shards(planned, filename_pattern=WEIGHTS_PATTERN, max_shard_size=limit)
    for filename, names in tqdm(split.filename_to_tensors.items(), desc="writing", unit="shard", leave=False):
        save_file(read_planned(names, planned, sources, created), work / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (work / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def read_planned(names: list[str], planned: dict, sources: dict, created: dict) -> dict[str, torch.Tensor]:
    """One output shard's tensors, in their planned dtypes, each source shard opened once (a stacked source is read
    one expert's slice at a time). Every tensor is a copy: none shares memory with the memory-mapped source or with
    another (a source tensor may have two names)."""
    tensors = {name: created[name].clone() for name in names if name in created}
    by_shard: dict[Path, list[str]] = {}
    for name in names:
        if name in sources:
            by_shard.setdefault(sources[name][0], []).append(name)
    for shard, out_names in by_shard.items():
        with open_shard(shard) as handle:
            for name in out_names:
                _, source, index = sources[name]
                tensor = handle.get_tensor(source) if index is None else handle.get_slice(source)[index]
                tensors[name] = tensor.to(planned[name].dtype, copy=True)
    return tensors


# ---------------------------------------------------------------------------------------------------------------------
# Command lines


def add_output_arguments(parser: argparse.ArgumentParser):
    """The options every conversion shares: where to write, in which dtype, in shards of which size."""
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto keeps the source dtypes")
    parser.add_argument("--max-shard-size", default=MAX_SHARD_SIZE, help="largest output shard, e.g. 5GB or 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run_conversion(convert: Callable[[], Path]) -> int:
    """Run a conversion for a command line: 0 and the output folder, or 1 and the one-line reason."""
    try:
        output = convert()
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0
