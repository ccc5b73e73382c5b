"""Streaming safetensors I/O shared by the conversion scripts.

- `list_shards` / `read_tensors`: read a checkpoint shard by shard (safetensors only; nothing is ever unpickled),
  with errors that name the file at fault.
- `ShardWriter`: write tensors into shards of a bounded size, then name them and write the index.
- `atomic_output_dir`: build the result in a temporary folder beside the target and move it into place only when
  everything succeeded, so an interrupted or failed run leaves the target as it was.
- `check_keys`: every target tensor produced, nothing unexpected, every shape right.
- `StackExperts` / `SplitExperts`: the release's one-tensor-per-expert layout <-> the stacked layout the model uses.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm


INDEX_NAME = "model.safetensors.index.json"
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


def copy_package_code(target: Path) -> list[str]:
    """The package's modules next to the weights, so the folder loads with `trust_remote_code=True`."""
    import transformers_twotower

    package = Path(transformers_twotower.__file__).parent
    copied = []
    for path in sorted(package.glob("*_twotower.py")):  # the model's modules; not __init__ or the command line
        shutil.copy2(path, target / path.name)
        copied.append(path.name)
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


class StackExperts:
    """`...mixer.experts.{e}.{up,down}_proj.weight` (one per expert) -> `...mixer.experts.{up,down}_proj` (stacked).

    Experts of one layer may be spread over several shards: a group is emitted once all its experts were seen.
    """

    pattern = re.compile(r"^(?P<prefix>.+\.mixer\.experts)\.(?P<index>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.pending: dict[str, dict[int, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        match = self.pattern.match(name)
        if match is None:
            return [(name, tensor)]
        target = f"{match['prefix']}.{match['proj']}"
        index = int(match["index"])
        group = self.pending.setdefault(target, {})
        if index >= self.num_experts or index in group:
            raise CheckpointError(f"unexpected expert tensor {name} (the config has {self.num_experts} experts)")
        group[index] = tensor
        if len(group) < self.num_experts:
            return []
        del self.pending[target]
        return [(target, torch.stack([group[i] for i in range(self.num_experts)]))]

    def check_complete(self):
        if self.pending:
            incomplete = {k: sorted(set(range(self.num_experts)) - set(v))[:5] for k, v in self.pending.items()}
            raise CheckpointError(f"expert tensors missing from the checkpoint: {incomplete}")


class SplitExperts:
    """The inverse of `StackExperts`."""

    pattern = re.compile(r"^(?P<prefix>.+\.mixer\.experts)\.(?P<proj>up_proj|down_proj)$")

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        match = self.pattern.match(name)
        if match is None:
            return [(name, tensor)]
        return [(f"{match['prefix']}.{e}.{match['proj']}.weight", expert.clone()) for e, expert in enumerate(tensor)]

    def check_complete(self):
        pass
