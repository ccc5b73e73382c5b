"""Several processes: TwoTower split by tensor parallelism, expert parallelism and both (`parallel_twotower`), under
torchrun with 2 and 4 CPU processes (gloo), computes what one process computes, and saves what it loaded.

One torchrun per process count loads the saved tiny model once per plan (`parallel_worker.py`). The reference is one
process, eager: compiled generation equals eager in one process (test_static_decoding), so both are held to it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from parallel_worker import record
from safetensors.torch import load_file

from transformers_twotower.defaults_twotower import GENERATION_MODES
from transformers_twotower.parallel_twotower import DENSE_TP_MODULES, PLANS, distributed_config


HERE = Path(__file__).parent
# Experts, the embeddings and both heads: what each plan splits (the tiny model has 2 MoE layers per tower).
EXPERT_WEIGHTS = {f"{tower}.layers.{i}.mixer.experts.{p}" for tower in ("context_tower", "denoiser_tower")
                  for i in (2, 7) for p in ("up_proj", "down_proj")}  # fmt: skip
DENSE_WEIGHTS = {"lm_head.weight", "context_tower.lm_head.weight", "context_tower.embeddings.weight",
                 "denoiser_tower.embeddings.weight"}  # fmt: skip
SHARDED = {"tp": EXPERT_WEIGHTS | DENSE_WEIGHTS, "ep": EXPERT_WEIGHTS, "tp+ep": EXPERT_WEIGHTS | DENSE_WEIGHTS}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parallel") / "model"
    tiny_model(seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_process(saved) -> dict:
    return record(str(saved), "none", str(saved.parent / "saved-none"), compiled_too=False)


def run_plans(saved: Path, processes: int) -> dict:
    out = saved.parent / f"{processes}-processes" / "records.pt"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
         "--master-port", str(29540 + processes), "parallel_worker.py", str(saved), str(out), *PLANS],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def test_the_plans_name_both_towers_and_the_configs_refuse_what_cannot_split():
    """The plans as transformers merges them on the model (no processes needed): both towers' experts under tensor
    and expert parallelism, the embeddings and both heads by vocabulary under tensor parallelism (what `"ep"` keeps
    whole); each plan's sizes; a plan or an expert count that cannot split is refused by name."""
    model = tiny_model()
    for tower in ("context_tower", "denoiser_tower"):
        experts = f"{tower}.layers.*.mixer.experts"
        assert (model.tp_plan[f"{experts}.up_proj"], model.tp_plan[f"{experts}.down_proj"]) == ("colwise", "rowwise")
        assert model.ep_plan[experts] == "ep_dispatch_experts"
        assert model.tp_plan[f"{tower}.embeddings"] == "embedding_rowwise"
    assert {plan: model.tp_plan[plan] for plan in DENSE_TP_MODULES if "lm_head" in plan} == {
        "lm_head": "colwise_gather_output", "context_tower.lm_head": "colwise_gather_output"}  # fmt: skip
    assert set(DENSE_TP_MODULES) == {name for name in model.tp_plan if ".experts" not in name}
    for plan, config in ((plan, distributed_config(plan, size=4, config=model.config)) for plan in PLANS):
        assert (config.tp_size, config.ep_size) == ((4, 1) if plan == "tp" else (4, 4)), plan
    with pytest.raises(ValueError, match="plan"):
        distributed_config("pp", size=2)
    with pytest.raises(ValueError, match="8 processes .* 4"):  # the tiny model has 4 routed experts
        distributed_config("ep", size=8, config=model.config)
    assert distributed_config("tp", size=8, config=model.config).tp_size == 8


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_tensor_and_expert_parallel_equal_one_process(saved, one_process, processes):
    """Under each plan: loading reports nothing missing or unexpected and splits what the plan names; the training
    loss, the denoiser's logits and its gradients equal one process's to fp32 rounding; greedy generation of a ragged
    left-padded batch with an early EOS gives the same tokens and NFE in every mode, eager and compiled; and
    `save_pretrained` of the sharded model writes the loaded checkpoint back bit for bit."""
    assert one_process["loading"] == {}
    experts = [g for name, g in one_process["gradients"].items() if "experts" in name]
    assert experts and all(g.abs().max() > 0 for g in experts), "the experts must receive gradient to compare it"
    records = run_plans(saved, processes)
    reference = load_file(saved / "model.safetensors")
    assert set(records) == set(PLANS)
    for plan, got in records.items():
        assert got["loading"] == {}, (plan, got["loading"])
        assert set(got["sharded"]) == SHARDED[plan], plan
        torch.testing.assert_close(got["loss"], one_process["loss"], rtol=0, atol=1e-6, msg=plan)
        torch.testing.assert_close(got["logits"], one_process["logits"], rtol=0, atol=1e-5, msg=plan)
        assert got["gradients"].keys() == one_process["gradients"].keys()
        for name, grad in got["gradients"].items():
            torch.testing.assert_close(grad, one_process["gradients"][name], rtol=0, atol=1e-6, msg=f"{plan} {name}")
        assert set(got["generations"]) == {(mode, c) for mode in GENERATION_MODES for c in (False, True)}
        for (mode, compiled), (sequences, nfe) in got["generations"].items():
            want_sequences, want_nfe = one_process["generations"][mode, False]
            assert torch.equal(sequences, want_sequences), (plan, mode, compiled)
            assert torch.equal(nfe, want_nfe), (plan, mode, compiled)
        written = load_file(saved.parent / f"{processes}-processes" / f"saved-{plan}" / "model.safetensors")
        assert written.keys() == reference.keys()
        for name, tensor in reference.items():
            assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), (plan, name)
