"""Loading a TwoTower folder for the command lines and the evaluation harness, with one-line errors that name what
is missing: the model and tokenizer (`load`), the device (`check_device`, and `machine_device` when none is given),
the dtype names the commands accept."""

from pathlib import Path


DEMO_MODEL = Path(__file__).parent / "demo"
DTYPES = ("auto", "float32", "bfloat16")


def machine_device() -> str:
    """The device to run on when none is given: CUDA where torch sees a GPU, else Apple's MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(device: str):
    """A one-line error for a device this machine does not have (or torch does not know)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SystemExit(f"error: --device {device!r} is not a device torch knows (e.g. cpu, cuda, cuda:1, mps)")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise SystemExit(f"error: --device {device}, but this machine has no {kind.upper()} device torch can use")


def load(model_dir: str | Path, device: str, dtype: str):
    """Tokenizer and model from a folder, with errors that say what is missing."""
    import torch
    from transformers import AutoTokenizer

    from .modeling_twotower import TwoTowerForDiffusionLM

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: no TwoTower model in {folder} (no config.json); pass --model DIR")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise SystemExit(f"error: {folder} has no tokenizer files")
    check_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # this package is the code
        model = TwoTowerForDiffusionLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    except Exception as error:  # a missing or broken file: one line that names the folder and the cause
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"error: cannot load the model in {folder}: {cause}") from None
    return tokenizer, model


__all__ = ["DEMO_MODEL", "DTYPES", "check_device", "load", "machine_device"]
