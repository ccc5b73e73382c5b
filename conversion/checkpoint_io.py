"""What the conversion scripts share: streaming safetensors I/O, and the one folder layout they write.

- `list_shards` / `read_tensors`: read a checkpoint shard by shard (safetensors only; nothing is ever unpickled),
  with errors that name the file at fault.
- `ShardWriter`: write tensors into shards of a bounded size, then name them and write the index.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.core_model_loading import revert_weight_conversion
from transformers.dynamic_module_utils import custom_object_save

from transformers_twotower import TwoTowerConfig, TwoTowerForDiffusionLM


INDEX_NAME = "model.safetensors.index.json"
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


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or any(k in name for k in KEEP_FP32):
        return tensor
    return tensor.to(dtype)


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


def read_tensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one shard, one at a time (memory-mapped), with a tqdm bar for the shard."""
    try:
        with safe_open(shard, framework="pt") as handle:
            for name in tqdm(handle.keys(), desc=shard.name, unit="tensor", leave=False):
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{shard.name}: corrupt or truncated safetensors file ({error})") from error


def shard_keys(shard: Path) -> list[str]:
    try:
        with safe_open(shard, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{shard.name}: corrupt or truncated safetensors file ({error})") from error


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


def parse_size(size: str | int) -> int:
    """'5GB' -> bytes (decimal units, like transformers' `max_shard_size`)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise CheckpointError(f"cannot read the shard size {size!r}; write it like '5GB' or '500MB'")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(match.group(1)) * scale[unit])


class ShardWriter:
    """Collects tensors and writes a shard whenever the next tensor would take it past `max_shard_bytes`."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        if name in self.shapes:
            raise CheckpointError(f"tensor {name} was produced twice")
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_shard_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size
        self.shapes[name] = (tensor.shape, tensor.dtype)

    def flush(self):
        if not self.buffer:
            return
        path = self.folder / f"shard-{len(self.written):05d}.partial"
        save_file(self.buffer, path, metadata={"format": "pt"})
        self.written.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self):
        """Name the shards `model-0000i-of-0000n.safetensors` (or `model.safetensors`) and write the index."""
        self.flush()
        count = len(self.written)
        if count == 1:
            self.written[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


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


def write_model_files(work: Path, config: TwoTowerConfig, source: Path, card: str, dtype: torch.dtype | None):
    """Everything but the weights: what `save_pretrained` writes (the package's code, `config.json` with `auto_map`,
    `generation_config.json`), the source's tokenizer files, and a model card."""
    model = meta_model(config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    custom_object_save(model, work, config=config)  # the modeling code and its relative imports, `auto_map`
    config.save_pretrained(work)  # also copies configuration_twotower.py and adds AutoConfig to `auto_map`
    model.generation_config.save_pretrained(work)
    copy_tokenizer_files(source, work)
    (work / "README.md").write_text(card)


def convert_tensors(
    input_dir: Path,
    work: Path,
    rename,
    expected: dict,
    dtype: torch.dtype | None,
    max_shard_size: str | int,
    what: str,
    new_tensors: dict[str, torch.Tensor] | None = None,
):
    """Stream every source tensor through `rename` (a name -> its output names) into shards in `work`, cast to
    `dtype`, add `new_tensors` (in `dtype`, else the source's floating dtype), and check the result against
    `expected` before naming the shards."""
    shards = list_shards(input_dir)
    check_index_matches_shards(input_dir, shards)
    writer = ShardWriter(work, parse_size(max_shard_size))
    source_dtype = None
    for shard in shards:
        for name, tensor in read_tensors(shard):
            source_dtype = source_dtype or (tensor.dtype if tensor.is_floating_point() else None)
            for out_name in rename(name):
                writer.add(out_name, cast(out_name, tensor, dtype).clone())  # clone: no two names share memory
    for name, tensor in (new_tensors or {}).items():
        writer.add(name, tensor.to(dtype or source_dtype or torch.float32))
    check_keys(writer.shapes, expected, what)
    writer.finish()


# ---------------------------------------------------------------------------------------------------------------------
# Command lines


def add_output_arguments(parser: argparse.ArgumentParser):
    """The options every conversion shares: where to write, in which dtype, in shards of which size."""
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto keeps the source dtypes")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
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
