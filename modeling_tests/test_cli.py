"""The command line: `python -m transformers_twotower generate ...` and `... bench`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    for device, message in (("foo", "'foo' is not a device torch knows"), ("mps", "no MPS device")):
        with pytest.raises(SystemExit, match=message):
            main(["generate", "w5", "--model", str(model_dir), "--device", device])
    assert main(["generate", "w5 w6 w7", "--model", str(model_dir), "--max-length", "3"]) == 2
    error = capsys.readouterr().err
    assert (
        "`max_length` (3) counts the prompt, which already has 3 tokens" in error
        and "max_new_tokens`" not in error.split("set")[0]
    )


@pytest.mark.parametrize("flag", ["--block-size", "--steps", "--max-new-tokens", "--max-length"])
def test_a_bad_count_is_one_line_naming_its_flag(model_dir, capsys, flag):
    with pytest.raises(SystemExit):
        main(["generate", "w5", "--model", str(model_dir), flag, "0"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be an integer >= 1, got 0" in error


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_broken_checkpoint_is_one_line(model_dir, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit) as raised:
        main(["generate", "w5", "--model", str(folder)])
    message = str(raised.value)
    assert message.startswith(f"error: cannot load the model in {folder}: ") and "\n" not in message


def test_bench_synthetic_small(capsys, monkeypatch):
    """The GPU benchmark's path at a small width on the CPU: the four steps timed eager and compiled, what each must
    read counted by hand (an AR step at batch 1 selects exactly top-k experts per MoE layer), floors and speedups."""
    assert main(["bench", "--synthetic", "--scale", "small", "--layers", "6", "--experts", "8", "--batch-sizes", "1",
                 "--device", "cpu", "--prompt-length", "32", "--repeats", "1", "--variants", "eager", "--no-store"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "synthetic small: 6 layers, 8 experts" in out and "implied diffusion/AR (eager)" in out

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_steps

    model = bench_steps.synthetic_model(6, 8, "small", "cpu", torch.float32)
    result = bench_steps.measure(model, [1], ["eager"], prompt_length=32, repeats=1, bandwidth=1e9)["batch_1"]
    ar, extend = result["ar_step"], result["extend_block"]
    top_k = model.config.num_experts_per_tok
    assert ar["distinct_experts_per_moe_layer"] == top_k
    assert top_k < extend["distinct_experts_per_moe_layer"] <= 8
    tower = model.context_tower
    expert = tower.layers[1].mixer.experts
    per_expert = (expert.up_proj[0].numel() + expert.down_proj[0].numel()) * 4
    moe_layers = sum(layer.block_type == "moe" for layer in tower.layers)
    dense = sum(p.numel() for n, p in tower.named_parameters() if ".experts." not in n and "embeddings" not in n) * 4
    assert ar["weight_bytes"] == dense + model.config.hidden_size * 4 + moe_layers * top_k * per_expert
    assert ar["floor_ms"] == round(ar["bytes"] / 1e9 * 1e3, 4) and ar["eager_ms"] > 0


def test_bench_expert_parallel_arithmetic(capsys, monkeypatch):
    """`--ep-size`: the busiest GPU reads its share of the selected experts (contiguous ranges of experts, as
    `grouped_gemm` shards them) plus everything replicated; tensor parallelism a `1 / N` slice of every selected
    expert and of the head. On a hand-made step, then end to end at a small width (bytes only, nothing timed)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_steps

    # 8 experts of 10 bytes; the step selected 0, 1, 2, 5 in one MoE layer and 3, 6, 7 in the other; head 50 bytes.
    step = {"bytes": 1000 + 50 + 70, "_head": 50, "_selected": [([0, 1, 2, 5], 10, 8), ([3, 6, 7], 10, 8)]}
    busiest = {n: bench_steps.expert_parallel_bytes(step, n)["busiest_rank_bytes"] for n in (1, 2, 4, 8)}
    # 2 GPUs hold 0-3 | 4-7: 3 and 2 experts on the busiest; 4 GPUs hold pairs: 2 and 2; 8 GPUs: 1 and 1.
    assert busiest == {1: 1120, 2: 1050 + 50, 4: 1050 + 40, 8: 1050 + 20}
    assert bench_steps.tensor_parallel_bytes(step, 2) == 1000 + (70 + 50) // 2
    with pytest.raises(SystemExit, match="does not divide"):
        bench_steps.expert_parallel_bytes(step, 3)

    assert main(["bench", "--synthetic", "--scale", "small", "--layers", "6", "--experts", "8", "--batch-sizes", "1",
                 "--device", "cpu", "--prompt-length", "32", "--variants", "--ep-size", "2", "8", "--no-store"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "one expert set shared by the MoE layers (bytes only)" in out and "expert parallelism, by bytes" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in {"1", "2", "8"}]
    assert [row[0] for row in rows[:3]] == ["1", "2", "8"], out


def test_bench_demo_runs(tmp_path, capsys):
    """The demo benchmark end to end on two prompts (it counts the context tower's tokens through a hook on its
    forward; an earlier form patched a method the one decoding path removed, and failed)."""
    output = tmp_path / "demo.json"
    assert main(["bench", "--prompts", "2", "--repeats", "1", "--batch-sizes", "1", "--thresholds", "0.8",
                 "--output", str(output)]) == 0  # fmt: skip
    rows = {(row["scenario"], row["mode"]): row for row in json.loads(output.read_text())}
    ar, diffusion = rows["plain", "ar"], rows["plain", "mask_diffusion"]
    # AR's context tower reads every generated token but each prompt's last; diffusion each block but the last, once.
    generated = ar["generated_tokens"]
    assert ar["context_tokens_per_token"] == round((generated - ar["prompts"]) / generated, 3)
    assert 0 < diffusion["context_tokens_per_token"] < ar["context_tokens_per_token"]


@pytest.mark.slow  # two lengths compiled, four fresh processes for the peaks
def test_bench_training_synthetic_eager_and_compiled(tmp_path):
    """`bench_training.py --synthetic` (the GPU run's models, at a small width on the CPU) with `--compile`: each
    length's row holds both steps eager and compiled, their ratios, and each eager step's peak memory."""
    out = tmp_path / "training.json"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks/bench_training.py"),
               "--synthetic", "--scale", "small", "--layers", "6", "--lengths", "32", "64", "--tokens", "64",
               "--repeats", "1", "--compile", "--compile-backend", "aot_eager", "--output", str(out)]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["seq_len"], row["batch_size"]) for row in rows] == [(32, 2), (64, 1)]
    for row in rows:
        # The seconds are rounded to milliseconds, the ratios from the unrounded ones.
        assert row["ratio"] == pytest.approx(row["twotower_seconds"] / row["ar_seconds"], rel=0.05)
        assert row["ratio_compiled"] == pytest.approx(row["twotower_compiled_seconds"] / row["ar_compiled_seconds"],
                                                      rel=0.05)  # fmt: skip
        assert min(row["twotower_compiled_seconds"], row["ar_compiled_seconds"]) > 0
        assert min(row["twotower_peak_mb"], row["ar_peak_mb"]) >= 0  # a small step may fit in what is resident


def test_bench_synthetic_generate_small(capsys, monkeypatch):
    """The end-to-end benchmark's path at a small width on the CPU: whole generate calls, AR against mask diffusion at
    forced rates. A threshold no confidence reaches leaves the commit floor: 16 tokens in 8, 5 and 3 steps."""
    assert main(["bench", "--synthetic", "--generate", "--scale", "small", "--layers", "6", "--experts", "8",
                 "--batch-sizes", "1", "2", "--device", "cpu", "--prompt-length", "16", "--new-tokens", "32",
                 "--repeats", "1", "--variants", "eager", "--no-store"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "whole generate calls, 32 new tokens after 16" in out and "batch_2 eager: ar" in out

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_steps

    model = bench_steps.synthetic_model(6, 8, "small", "cpu", torch.float32)
    result = bench_steps.measure_generate(model, [2], ["eager"], prompt_length=16, new_tokens=32, repeats=1)
    row = result["batch_2"]["eager"]
    assert row["tokens_per_forward"] == {"diffusion_2": 2.0, "diffusion_3": 3.2, "diffusion_5": 5.33}
    assert set(row["diffusion_over_ar"]) == {"diffusion_2", "diffusion_3", "diffusion_5"}
    assert all(value > 0 for value in row["tokens_per_second"].values())
    steps = {"ar_step": {"eager_ms": 1.0}, "denoise_masked": {"eager_ms": 2.0}, "denoise_half": {"eager_ms": 2.0},
             "extend_block": {"eager_ms": 4.0}}  # fmt: skip
    # 16 AR steps (16 ms) against 16 / k denoiser steps of 2 ms and one 4 ms extension.
    assert bench_steps.predicted_speedups(steps, "eager", {"k2": 2.0, "k4": 4.0}) == {"k2": 0.8, "k4": 1.33}


@pytest.mark.slow
def test_demo_model_runs_from_the_module_entry_point():
    """The demo holds weights, configs and a tokenizer only; it loads through the package, not as remote code. As a
    terminal shows the two streams together, transformers' notices come before the streamed text, never inside it."""
    assert (DEMO_MODEL / "config.json").is_file() and (DEMO_MODEL / "train_log.json").is_file()
    assert not list(DEMO_MODEL.glob("*.py")) and "auto_map" not in json.loads((DEMO_MODEL / "config.json").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "transformers_twotower", "generate", "def fibonacci(n):", "--max-new-tokens", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    streamed = result.stdout[result.stdout.index("def fibonacci(n):") : result.stdout.index("\n--- mask_diffusion")]
    assert "[transformers]" not in streamed and "--- mask_diffusion: 16 tokens" in result.stdout


def test_the_pipeline_and_the_command_line_continue_a_prompt_alike(capsys):
    """Both put BOS first (the demo tokenizer adds it) and use the demo's generation config."""
    from transformers import pipeline

    assert main(["generate", "def fibonacci(n):", "--max-new-tokens", "16"]) == 0
    streamed = capsys.readouterr().out.split("\n--- ")[0].removesuffix("\n")  # the streamer ends with a newline
    generator = pipeline("text-generation", model=str(DEMO_MODEL), trust_remote_code=True)
    assert generator.tokenizer("def fibonacci(n):").input_ids[0] == generator.tokenizer.bos_token_id
    assert generator("def fibonacci(n):", max_new_tokens=16)[0]["generated_text"] == streamed


@pytest.mark.slow
def test_the_demo_tokenizer_loads_without_remote_code_questions(tmp_path):
    """A plain fast tokenizer: `AutoTokenizer` loads it where this package is not even imported, asking nothing."""
    code = (
        "from transformers import AutoTokenizer; import sys; "
        f"t = AutoTokenizer.from_pretrained({str(DEMO_MODEL)!r}); "
        "assert 'transformers_twotower' not in sys.modules; print(t('def f():').input_ids)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[1, 489, 291, 874]"


def test_unset_options_are_the_models_generation_config(model_dir, tmp_path, capsys):
    """Options not given on the command line come from the folder's `generation_config.json` (here Mock-AR, 5 new
    tokens), not from TwoTower's defaults; options given win over it."""
    from transformers_twotower import TwoTowerGenerationConfig

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    TwoTowerGenerationConfig(generation_mode="mock_ar", max_new_tokens=5, eos_token_id=None).save_pretrained(folder)
    assert main(["generate", "w37 w412", "--model", str(folder)]) == 0
    assert "--- mock_ar: 5 tokens, NFE 5" in capsys.readouterr().out
    assert main(["generate", "w37 w412", "--model", str(folder), "--mode", "ar", "--max-new-tokens", "3"]) == 0
    assert "--- ar: 3 tokens, NFE 3" in capsys.readouterr().out
