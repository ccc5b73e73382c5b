"""The command line: `python -m transformers_twotower generate ...` and `... bench`."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import RELEASE_FIXTURE, word_tokenizer

from transformers_twotower.__main__ import DEMO_MODEL, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(RELEASE_FIXTURE, folder, ignore=shutil.ignore_patterns("expected.*"))
    word_tokenizer(512).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_generate_streams_and_reports(model_dir, capsys, mode):
    code = main(["generate", "<s> w37 w412 w95", "--model", str(model_dir), "--mode", mode, "--max-new-tokens", "8",
                 "--block-size", "4", "--steps", "4", "--threshold", "0.9"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "w37 w412 w95" in out and f"--- {mode}: 8 tokens, NFE" in out and "tokens/forward" in out


def test_clear_errors(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no TwoTower model"):
        main(["generate", "x", "--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):  # argparse: bad flag value
        main(["generate", "x", "--mode", "diffusion"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["generate", "w5", "--model", str(model_dir), "--threshold", "5"]) == 2
    assert "confidence_threshold" in capsys.readouterr().err


def test_bench_synthetic_small(capsys):
    assert main(["bench", "--synthetic", "--synthetic-scale", "small"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["denoise_step_ms"] > 0 and result["extend_block_ms"] > 0
    assert main(["bench", "--synthetic"]) == 0  # the real size needs CUDA: skipped with a message
    assert "skipped" in capsys.readouterr().out


def test_demo_model_runs_from_the_module_entry_point():
    """The demo holds weights, configs and a tokenizer only; it loads through the package, not as remote code."""
    assert (DEMO_MODEL / "config.json").is_file() and (DEMO_MODEL / "train_log.json").is_file()
    assert not list(DEMO_MODEL.glob("*.py")) and "auto_map" not in json.loads((DEMO_MODEL / "config.json").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "transformers_twotower", "generate", "def fibonacci(n):", "--max-new-tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def fibonacci(n):") and "--- mask_diffusion: 16 tokens" in result.stdout
