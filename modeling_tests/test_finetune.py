"""Fine-tuning the denoiser: the Trainer script, PEFT adapters, Accelerate device maps, two processes under DDP."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GENERATE, clean_ids, clean_rows, tiny_model, word_tokenizer, words

from transformers_twotower import TwoTowerForDiffusionLM, modeling_twotower, two_tower_device_map


HERE = Path(__file__).parent
ROOT = HERE.parent
spec = importlib.util.spec_from_file_location("finetune_denoiser", ROOT / "examples/finetune_denoiser.py")
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)


@pytest.fixture
def saved_model(tmp_path):
    model = tiny_model(seed=1)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return model, folder


# --- Trainer ------------------------------------------------------------------------------------------------------


def test_finetune_script(saved_model, tmp_path):
    model, folder = saved_model
    lines = [words(row) for row in clean_rows(model, [10] * 4)]
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(lines * 4) + "\n")
    out = tmp_path / "out"
    trainer = finetune.main(
        ["--model", str(folder), "--data", str(data), "--output", str(out), "--seq-len", "16",
         "--max-steps", "12", "--batch-size", "4", "--lr", "3e-3", "--cpu"]
    )  # fmt: skip
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    tuned = TwoTowerForDiffusionLM.from_pretrained(out)
    for name, tensor in model.context_tower.state_dict().items():
        assert torch.equal(tuned.context_tower.state_dict()[name], tensor), name
    assert not torch.equal(tuned.lm_head.weight, model.lm_head.weight)
    assert (out / "tokenizer.json").exists()


def test_distillation_rows_are_prompt_and_the_ar_towers_greedy_continuation(saved_model):
    model, _ = saved_model
    prompts = clean_ids(model, 5, 8, seed=2)
    dataset = finetune.distillation_dataset(model, prompts, new_tokens=6, batch_size=2)
    ar = model.generate(prompts, generation_mode="ar", max_new_tokens=6, eos_token_id=None)
    assert torch.equal(torch.tensor(dataset["input_ids"]), ar)  # the teacher is the model's own AR tower
    labels = torch.tensor(dataset["labels"])
    assert (labels[:, :8] == -100).all() and torch.equal(labels[:, 8:], ar[:, 8:])  # only the continuation is learnt
    with pytest.raises(ValueError, match="--prompt-len \\(6\\) must be a multiple of the model's block_size \\(4\\)"):
        finetune.distillation_dataset(model, prompts[:, :6], new_tokens=6, batch_size=2)


def test_agreement_with_ar_is_measured_against_generate(saved_model):
    model, _ = saved_model
    prompts = clean_ids(model, 3, 8, seed=3)
    report = finetune.agreement_with_ar(model, prompts, new_tokens=8, batch_size=2, threshold=0.3)
    options = dict(max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True)
    ar = model.generate(prompts, generation_mode="ar", **options).sequences[:, 8:]
    diffusion = model.generate(prompts, generation_mode="mask_diffusion", confidence_threshold=0.3, **options)
    agreement = (diffusion.sequences[:, 8:] == ar).float().mean().item()
    assert report == {
        "prompts": 3,
        "tokens_per_forward": round(24 / int(diffusion.nfe.sum()), 4),
        "agreement_with_ar": round(agreement, 4),
    }


@pytest.mark.parametrize("lora", [False, True], ids=["denoiser", "lora"])
def test_distill_script(saved_model, tmp_path, lora):
    """`--distill` end to end, with the Trainer and with PEFT: a report before and after, on held-out prompts that
    were not trained on, and only the denoiser (or its adapters) changed."""
    model, folder = saved_model
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(words(row) for row in clean_rows(model, [20] * 8)))
    out = tmp_path / "out"
    flags = ["--model", str(folder), "--data", str(data), "--output", str(out), "--distill", "--prompt-len", "8",
             "--new-tokens", "8", "--eval-prompts", "3", "--max-steps", "4", "--batch-size", "2", "--lr", "3e-3",
             "--cpu", "--threshold", "0.3"]  # fmt: skip
    trainer = finetune.main(flags + (["--lora-r", "4"] if lora else []))
    report = json.loads((out / "distill_report.json").read_text())
    windows = finetune.token_windows(word_tokenizer(model.config.vocab_size), str(data), 8)
    assert report["train_prompts"] == len(windows) - 3  # the last 3 windows are held out
    assert report["before"] == finetune.agreement_with_ar(model, windows[-3:], 8, 32, threshold=0.3)
    assert set(report["after"]) == {"prompts", "tokens_per_forward", "agreement_with_ar"}
    assert len([log for log in trainer.state.log_history if "loss" in log]) == 4


def test_fsdp_switch(saved_model, tmp_path):
    """`--fsdp` asks Accelerate for FSDP2 with every block of both towers a unit; on the CPU it refuses, naming why
    (Accelerate would silently run DDP there), instead of training unsharded."""
    config = finetune.fsdp_arguments()
    assert config["fsdp"] is True and config["fsdp_config"]["fsdp_version"] == 2
    model, _ = saved_model
    wrapped = set(config["fsdp_config"]["transformer_layer_cls_to_wrap"])
    assert wrapped == {type(layer).__name__ for layer in [*model.context_tower.layers, *model.denoiser_tower.layers]}
    with pytest.raises(SystemExit, match="--fsdp needs GPUs.*MULTI_CPU"):
        finetune.main(["--model", "m", "--data", "d.txt", "--output", str(tmp_path), "--fsdp", "--cpu"])


def test_jsonl_data_and_packing(tmp_path):
    tokenizer = word_tokenizer(64)
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"body": "w5 w6 w7"}\n{"body": "w8 w9"}\n' * 3)
    dataset = finetune.build_dataset(tokenizer, str(data), seq_len=8, block_size=4, text_field="body")
    assert dataset.column_names == ["input_ids", "labels"] and len(dataset) == 3
    assert dataset[0]["input_ids"] == [1, 5, 6, 7, 2, 1, 8, 9]
    with pytest.raises(ValueError, match="no field 'text'"):
        finetune.build_dataset(tokenizer, str(data), seq_len=8, block_size=4)


def test_bad_training_input():
    with pytest.raises(ValueError, match="fewer than one training sequence"):
        finetune.pack_for_diffusion([[1, 5, 2], [1, 6, 2]], seq_len=16, block_size=16)
    with pytest.raises(ValueError, match="multiple of the model's block_size"):
        finetune.pack_for_diffusion([[5] * 100], seq_len=18, block_size=16)
    model = tiny_model()
    ids = clean_ids(model, 2, 5)
    with pytest.raises(ValueError, match="`labels` must have the shape"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="`noise_mask` must have the shape"):
        model(ids, labels=ids, noise_mask=torch.ones(2, 3, dtype=torch.bool))


# --- PEFT ---------------------------------------------------------------------------------------------------------


def test_lora_trains_the_adapter_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(seed=1), LoraConfig(r=4))
    model.train()
    ids = clean_ids(model, 2, 5)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in name and "denoiser_tower" in name for name in with_grad)


def test_lora_on_experts_recipe():
    """Experts are 3-D parameters, not Linear modules: LoRA reaches them through `target_parameters`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=[], target_parameters=["denoiser_tower.layers.2.mixer.experts.up_proj"])
    model = get_peft_model(tiny_model(seed=1), config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("denoiser_tower.layers.2.mixer.experts" in name for name in trainable)
    ids = clean_ids(model, 2, 5)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_on_the_context_tower_is_called_out(monkeypatch):
    from peft import LoraConfig, get_peft_model

    messages = []
    monkeypatch.setattr(modeling_twotower.logger, "warning", lambda message, *a: messages.append(message))
    model = get_peft_model(tiny_model(seed=1), LoraConfig(r=2, target_modules=["q_proj"]))
    model.train()
    assert messages and "context_tower.layers.1.mixer.q_proj" in messages[0]


# --- Accelerate ---------------------------------------------------------------------------------------------------


def test_two_tower_device_map(saved_model, tmp_path):
    model, folder = saved_model
    device_map = two_tower_device_map("cpu", "disk")
    split = TwoTowerForDiffusionLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "offload")
    assert split.hf_device_map == device_map
    ids = clean_ids(model, 2, 5)
    assert torch.equal(split.generate(ids, **GENERATE), model.generate(ids, **GENERATE))


# --- several processes ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """DDP over 2 CPU processes (gloo) on the same global batch gives the single-process weights (to 1e-6: only the
    order of the gradient all-reduce differs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    run = lambda *cmd: subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    one = run(sys.executable, "ddp_worker.py", str(tmp_path / "one.pt"), "4")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
              "ddp_worker.py", str(tmp_path / "two.pt"), "4")  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    single, distributed = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    initial = tiny_model(seed=0).state_dict()
    assert max((single[k] - initial[k]).abs().max() for k in single) > 1e-2, "training must move the weights"
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_finetune_script_under_torchrun(saved_model, tmp_path):
    """The example itself on 2 CPU processes (DDP over gloo), as `torchrun` / `accelerate launch` run it."""
    model, folder = saved_model
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(words(row) for row in clean_rows(model, [10] * 16)))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29532",
         str(ROOT / "examples/finetune_denoiser.py"), "--model", str(folder), "--data", str(data), "--output", str(out),
         "--seq-len", "16", "--max-steps", "3", "--batch-size", "2", "--cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = TwoTowerForDiffusionLM.from_pretrained(out)
    assert not torch.equal(tuned.lm_head.weight, model.lm_head.weight)
    assert torch.equal(tuned.context_tower.lm_head.weight, model.context_tower.lm_head.weight)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", ["eager", "compiled"])
def test_fsdp_two_processes_train_like_one_and_save_a_full_checkpoint(tmp_path, blocks):
    """FSDP2 over 2 CPU processes (gloo), both towers sharded, every block eager or compiled, gives the eager
    single-process weights (to 1e-5), and its full checkpoint reloads with `from_pretrained` in the release's
    layout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    run = lambda *cmd: subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    one = run(sys.executable, "fsdp_worker.py", str(tmp_path / "one.pt"), str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
              "fsdp_worker.py", str(tmp_path / "two.pt"), str(tmp_path / "two"), blocks)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    single, sharded = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    initial = tiny_model(seed=0).state_dict()
    assert max((single[k] - initial[k]).abs().max() for k in single) > 1e-2, "training must move the weights"
    assert all(torch.equal(sharded[k], initial[k]) for k in initial if k.startswith("context_tower."))
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=1e-5, msg=name)
    reloaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path / "two")
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, sharded[name], rtol=0, atol=0, msg=name)
