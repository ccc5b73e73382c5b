"""Checkpoints: save_pretrained / from_pretrained, the conversion scripts (release <-> package, Nemotron-H ->
TwoTower), trust_remote_code loading, and the conversions' errors. Every folder has one layout, the release's."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import RELEASE_FIXTURE, clean_ids, tiny_model, word_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file


sys.path.insert(0, str(Path(__file__).parent.parent / "conversion"))

from checkpoint_io import CheckpointError  # noqa: E402
from convert_nemotron_h_to_twotower import convert_nemotron_h_to_twotower  # noqa: E402
from convert_nvidia_twotower import convert_package_to_release, convert_release_to_package, main  # noqa: E402

from transformers_twotower import TwoTowerForDiffusionLM  # noqa: E402
from transformers_twotower.defaults_twotower import GENERATION_MODES  # noqa: E402
from transformers_twotower.layout_twotower import context_tower_as_nemotron_h  # noqa: E402


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def snapshot(folder: Path):
    """What a folder holds (names and bytes), to check that a failed run left it as it was."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def release_copy(tmp_path_factory) -> Path:
    """The release fixture plus a tokenizer (to check that tokenizer files travel)."""
    folder = tmp_path_factory.mktemp("release") / "twotower_tiny_a"
    shutil.copytree(RELEASE_FIXTURE, folder)
    word_tokenizer(512).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(release_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "model"
    assert main(["--input", str(release_copy), "--output", str(out), "--max-shard-size", "500KB"]) == 0
    return out


@pytest.fixture(scope="module")
def saved(release_copy, tmp_path_factory) -> Path:
    """The release loaded by the package and written by `save_pretrained`, with its tokenizer: a Hub-ready folder."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("saved") / "model"
    TwoTowerForDiffusionLM.from_pretrained(release_copy).save_pretrained(folder, max_shard_size="500KB")
    AutoTokenizer.from_pretrained(release_copy).save_pretrained(folder)
    return folder


PACKAGE_CODE = {
    "backbone_twotower.py",
    "card_twotower.py",
    "configuration_twotower.py",
    "context_twotower.py",
    "decoding_twotower.py",
    "defaults_twotower.py",
    "denoiser_twotower.py",
    "generation_arguments_twotower.py",
    "generation_config_twotower.py",
    "generation_loops_twotower.py",
    "generation_rows_twotower.py",
    "generation_twotower.py",
    "layout_twotower.py",
    "metrics_twotower.py",
    "modeling_twotower.py",
    "sampling_twotower.py",
    "training_twotower.py",
}


def tensor_shapes(folder: Path) -> dict[str, tuple]:
    return {name: tuple(tensor.shape) for name, tensor in all_tensors(folder).items()}


# --- save_pretrained / from_pretrained ------------------------------------------------------------------------------


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    # Saved in the release's layout: one tensor per expert, time conditioning at the top level.
    assert "denoiser_tower.layers.2.mixer.experts.3.up_proj.weight" in names
    assert "scale_shift_tables.7" in names and "t_block.1.weight" in names and "context_lm_head.weight" in names
    loaded, info = TwoTowerForDiffusionLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    loaded.eval()
    assert not any(p.requires_grad for p in loaded.context_tower.parameters())
    ids = clean_ids(model, 2, 6)
    block = torch.tensor([[3, 3, 5, 3], [3, 9, 3, 3]])
    t = torch.tensor([0.75, 0.75])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.denoise_step(block, loaded.prefill(ids), t),
        model.denoise_step(block, model.prefill(ids), t),
        rtol=0,
        atol=0,
    )


# --- release -> package -----------------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_release_layout_and_the_code(saved):
    """`save_pretrained` writes the release's tensor names (one per expert), the package's code and `auto_map`."""
    assert tensor_shapes(saved) == tensor_shapes(RELEASE_FIXTURE)
    assert {p.name for p in saved.glob("*.py")} == PACKAGE_CODE
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_twotower.TwoTowerConfig",
        "AutoModel": "modeling_twotower.TwoTowerForDiffusionLM",
        "AutoModelForCausalLM": "modeling_twotower.TwoTowerForDiffusionLM",
    }


def test_converted_folder_is_what_save_pretrained_writes(converted, saved):
    """A user cannot tell a converted folder from a saved one: same tensors (names, shapes), code, configs."""
    assert tensor_shapes(converted) == tensor_shapes(saved)
    assert {p.name for p in converted.glob("*.py")} == PACKAGE_CODE
    for name in PACKAGE_CODE:
        assert (converted / name).read_bytes() == (saved / name).read_bytes(), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((converted / name).read_text()) == json.loads((saved / name).read_text()), name


def test_converted_folder_layout(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert len(list(converted.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "twotower" and config["architectures"] == ["TwoTowerForDiffusionLM"]
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["block_size"], generation["steps_per_block"], generation["confidence_threshold"]) == (
        16,
        16,
        0.8,
    )
    card = (converted / "README.md").read_text()
    assert card.startswith("---\n") and "license:" in card and "pipeline_tag: text-generation" in card
    tensors = all_tensors(converted)
    assert tensors["context_tower.layers.1.mixer.experts.7.up_proj.weight"].shape == (32, 64)  # one per expert
    assert tensors["context_tower.layers.1.mixer.experts.7.up_proj.weight"].dtype == torch.bfloat16  # auto keeps bf16
    assert tensors["context_tower.layers.1.mixer.gate.e_score_correction_bias"].dtype == torch.float32


def test_save_pretrained_writes_a_hub_model_card_and_keeps_one_written_before(saved, converted, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "twotower" in card.data.tags and card.data.base_model is None  # nothing known about a plain save
    assert "trust_remote_code=True" in card.text and "| `confidence_threshold` | 0.8 |" in card.text
    assert all(f"- `{mode}`" in card.text for mode in GENERATION_MODES)
    # The conversion's card (its base model and license) is the same function's, and a later save keeps it.
    release = ModelCard.load(converted / "README.md")
    assert (
        release.data.base_model == "nvidia/Nemotron-Labs-TwoTower-30B-A3B-Base-BF16"
        and release.data.license == "other"
    )
    folder = tmp_path / "resaved"
    shutil.copytree(converted, folder)
    TwoTowerForDiffusionLM.from_pretrained(folder).save_pretrained(folder)
    assert ModelCard.load(folder / "README.md").data.base_model == release.data.base_model


def test_release_to_package_to_release_is_bit_identical(converted, tmp_path):
    back = convert_package_to_release(converted, tmp_path / "back")
    original, restored = all_tensors(RELEASE_FIXTURE), all_tensors(back)
    assert set(original) == set(restored)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name].view(torch.uint8), tensor.view(torch.uint8)), name
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["hybrid_override_pattern"] == "MEM*EMEM*E"
    assert config["time_step_limit"] == [0.0, float("inf")]


def test_dtype_option(release_copy, tmp_path):
    out = convert_release_to_package(release_copy, tmp_path / "fp32", dtype="float32")
    tensors = all_tensors(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    reference = all_tensors(RELEASE_FIXTURE)
    assert torch.equal(tensors["lm_head.weight"], reference["lm_head.weight"].float())


REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.path = [p for p in sys.path if not (p and __import__("os").path.isdir(__import__("os").path.join(p, "transformers_twotower")))]
    assert importlib.util.find_spec("transformers_twotower") is None, "the package must not be importable here"
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

    folder, fixture = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "TwoTowerConfig"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert "transformers_twotower" not in sys.modules and "transformers_modules" in type(model).__module__

    expected = json.load(open(fixture + "/expected.json"))
    tensors = load_file(fixture + "/expected.safetensors")
    prompt = torch.tensor([expected["prompts"]["main"]])
    diff = (model(prompt).logits - tensors["context_forward/main/logits"]).abs().max().item()
    assert diff < expected["suggested_tolerance"]["logits_atol"], diff
    run = expected["diffusion"]["main/b4_s4_thr0.9_n12"]
    out = model.generate_mask_diffusion(prompt, **run["kwargs"])
    assert out[0].tolist() == run["output_ids"]

    # AutoModel returns the whole model (auto_map names it, as the package's registration does).
    plain = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert type(plain) is type(model) and torch.equal(plain(prompt).logits, model(prompt).logits)

    # The model card's tokenizer line, exactly as the card writes it.
    line = next(l for l in open(folder + "/README.md").read().splitlines() if l.startswith("tokenizer = AutoTokenizer"))
    scope = {"AutoTokenizer": AutoTokenizer, "path": folder}
    exec(line, scope)
    tokenizer = scope["tokenizer"]
    assert tokenizer.padding_side == "left"
    special = ["<pad>", "<s>", "</s>", "<mask>"]
    text = " ".join(special[i] if i < 4 else f"w{i}" for i in expected["prompts"]["main"])
    assert tokenizer(text, add_special_tokens=False).input_ids == expected["prompts"]["main"]
    generator = pipeline("text-generation", model=folder, trust_remote_code=True, dtype=torch.float32)
    kwargs = dict(max_new_tokens=12, block_size=4, steps_per_block=4, confidence_threshold=0.9, eos_token_id=None)
    piped = generator(text, return_full_text=False, add_special_tokens=False, **kwargs)[0]["generated_text"]
    generated = model.generate(prompt, **kwargs)[0, prompt.shape[1]:]
    assert generated.tolist() == run["generated_ids"], "the pipeline's default mode is mask diffusion"
    assert piped.split() == tokenizer.decode(generated).split(), (piped, tokenizer.decode(generated))
    print("remote code OK")
    """
)


@pytest.mark.slow
def test_a_saved_folder_loads_anywhere_with_trust_remote_code(saved, tmp_path):
    """What `save_pretrained` writes (and so what the conversion writes) runs where this package is not installed, in
    a fresh interpreter: AutoConfig, AutoModelForCausalLM, AutoModel, the card's tokenizer line (no question asked:
    stdin is closed, and no warning), pipeline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_CHECK, str(saved), str(RELEASE_FIXTURE)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "remote code OK" in result.stdout, output[-6000:]
    for unwanted in ("Do you wish to run the custom code", "to instantiate a model of type"):
        assert unwanted not in output, output[-6000:]


# --- Nemotron-H -> TwoTower -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nemotron_h(tmp_path_factory):
    torch.manual_seed(0)
    model = context_tower_as_nemotron_h(tiny_model()).eval()  # a plain Nemotron-H with the release's dt clamp
    folder = tmp_path_factory.mktemp("nemotron_h") / "backbone"
    model.save_pretrained(folder)
    return model, folder


def test_nemotron_h_to_twotower(nemotron_h, tmp_path):
    backbone, folder = nemotron_h
    out = convert_nemotron_h_to_twotower(folder, tmp_path / "twotower", mask_token_id=3, block_size=4)
    model = TwoTowerForDiffusionLM.from_pretrained(out).eval()
    assert (model.config.mask_token_id, model.config.block_size) == (3, 4)
    model.save_pretrained(tmp_path / "saved")
    assert tensor_shapes(out) == tensor_shapes(tmp_path / "saved"), "the folder save_pretrained would write"
    assert {p.name for p in out.glob("*.py")} == PACKAGE_CODE
    ids = clean_ids(model, 2, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, backbone(ids).logits.float()), "the context tower is the backbone"
        # The untrained denoiser starts as the backbone: Mock-AR predicts the backbone's next token, and t is inert.
        cache = model.prefill(ids)
        mock_ar = model.denoise_step(ids[:, -1:], cache, None, behind=True)[:, -1]
        torch.testing.assert_close(mock_ar, cache.next_token_logits, rtol=1e-5, atol=1e-5)
        block = torch.tensor([[3, 5, 3, 3], [3, 3, 3, 9]])
        for t in (0.25, 1.0):
            conditioned = model.denoise_step(block, cache, torch.full((2,), t))
            torch.testing.assert_close(conditioned, model.denoise_step(block, cache, None), rtol=0, atol=0)
    # The time conditioning can learn: t_block's gradient is not zero.
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.denoiser_tower.adaln.t_block[1].weight.grad.abs().sum() > 0


# --- one layout on disk ----------------------------------------------------------------------------------------------

EXPERT = re.compile(r"^(?P<experts>.+\.mixer\.experts)\.(?P<index>\d+)\.(?P<projection>up_proj|down_proj)\.weight$")


def write_stacked(source: Path, target: Path) -> Path:
    """A copy of a folder with its experts stacked along a first dimension (`...mixer.experts.up_proj`, the model's
    own layout), as `save_pretrained` wrote them for a model not loaded from the release before the layout was fixed,
    and as the bundled demo held them."""
    shutil.copytree(source, target)
    for shard in target.glob("model*.safetensors"):
        tensors, experts = {}, {}
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                match = EXPERT.match(name)
                if match is None:
                    tensors[name] = f.get_tensor(name)
                else:
                    key = f"{match['experts']}.{match['projection']}"
                    experts.setdefault(key, {})[int(match["index"])] = f.get_tensor(name)
        for key, pieces in experts.items():
            tensors[key] = torch.stack([pieces[i] for i in range(len(pieces))])
        save_file(tensors, shard, metadata={"format": "pt"})
    assert not (target / "model.safetensors.index.json").exists(), "the tiny folders are one shard"
    return target


def release_state(model) -> dict[str, torch.Tensor]:
    """The tensors of `model` under the release's names, as `save_pretrained` writes them."""
    from transformers.core_model_loading import revert_weight_conversion

    return {k: v.detach().contiguous() for k, v in revert_weight_conversion(model, model.state_dict()).items()}


def assert_same_tensors(folder: Path, expected: dict[str, torch.Tensor]):
    written = all_tensors(folder)
    assert written.keys() == expected.keys(), sorted(set(written) ^ set(expected))[:6]
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype, name
        assert torch.equal(written[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_save_pretrained_writes_the_release_layout_whatever_it_read(tmp_path):
    """A model read from stacked experts is written back one tensor per expert, like any other."""
    tiny_model(seed=1).save_pretrained(tmp_path / "split")
    stacked = write_stacked(tmp_path / "split", tmp_path / "stacked")
    TwoTowerForDiffusionLM.from_pretrained(stacked).save_pretrained(tmp_path / "again")
    assert_same_tensors(tmp_path / "again", all_tensors(tmp_path / "split"))


def test_the_bundled_demo_is_stored_in_the_release_layout():
    from transformers_twotower.loading_twotower import DEMO_MODEL

    demo = TwoTowerForDiffusionLM.from_pretrained(DEMO_MODEL)
    assert_same_tensors(Path(DEMO_MODEL), release_state(demo))


@pytest.mark.parametrize("source", ["python", "stacked", "demo", "demo_stacked", "nemotron_h"])
def test_every_folder_the_package_writes_reverses_bit_for_bit(source, nemotron_h, tmp_path):
    """`--reverse` reads either expert layout and writes the release's tensors, bit for bit, which load back into
    the same model: a model built in Python and saved, a stacked folder, the demo, a converted Nemotron-H."""
    from transformers_twotower.loading_twotower import DEMO_MODEL

    if source == "python":
        tiny_model(seed=1).save_pretrained(folder := tmp_path / "saved")
    elif source == "stacked":
        tiny_model(seed=1).save_pretrained(tmp_path / "split")
        folder = write_stacked(tmp_path / "split", tmp_path / "stacked")
    elif source.startswith("demo"):
        folder = Path(DEMO_MODEL) if source == "demo" else write_stacked(Path(DEMO_MODEL), tmp_path / "stacked")
    else:
        folder = convert_nemotron_h_to_twotower(nemotron_h[1], tmp_path / "twotower", mask_token_id=3, block_size=4)
    model = TwoTowerForDiffusionLM.from_pretrained(folder)
    assert main(["--input", str(folder), "--output", str(tmp_path / "release"), "--reverse"]) == 0
    assert_same_tensors(tmp_path / "release", release_state(model))
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["architectures"] == ["NemotronHTwoTowerForCausalLM"]
    reloaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path / "release")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_a_fine_tuned_model_reaches_the_release_layout(tuning, tmp_path):
    """The user's path: a model read from a stacked folder (as the demo was), one training step (all of the denoiser,
    or a LoRA merged afterwards), `save_pretrained`, `--reverse`; the release folder loads with equal logits."""
    tiny_model(seed=2).save_pretrained(tmp_path / "split")
    model = TwoTowerForDiffusionLM.from_pretrained(write_stacked(tmp_path / "split", tmp_path / "stacked"))
    if tuning == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = clean_ids(model, 2, 8)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model = (model.merge_and_unload() if tuning == "lora" else model).eval()
    model.save_pretrained(tmp_path / "tuned")
    assert main(["--input", str(tmp_path / "tuned"), "--output", str(tmp_path / "release"), "--reverse"]) == 0
    assert_same_tensors(tmp_path / "release", release_state(model))
    # The release's config has no block size (the release's is 16); the tiny model's is given back to compare.
    release = TwoTowerForDiffusionLM.from_pretrained(tmp_path / "release", block_size=4).eval()
    block, t = torch.tensor([[3, 3, 5, 3], [3, 9, 3, 3]]), torch.tensor([0.75, 0.5])
    with torch.no_grad():
        assert torch.equal(release(ids).logits, model(ids).logits)
        assert torch.equal(
            release.denoise_step(block, release.prefill(ids), t), model.denoise_step(block, model.prefill(ids), t)
        )
    untuned = TwoTowerForDiffusionLM.from_pretrained(tmp_path / "split").eval()
    with torch.no_grad():
        assert not torch.equal(
            untuned.denoise_step(block, untuned.prefill(ids), t), model.denoise_step(block, model.prefill(ids), t)
        )


# --- the context tower as a plain Nemotron-H ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["split", "stacked"])
def test_the_context_tower_exports_as_a_plain_nemotron_h(layout, tmp_path):
    """`--context-tower` writes a checkpoint transformers' own `NemotronHForCausalLM` loads with nothing missing,
    giving the TwoTower's AR logits and greedy tokens."""
    from transformers import NemotronHForCausalLM

    model = tiny_model(seed=4)
    with torch.no_grad():  # some Mamba dt under transformers' default floor (time_step_min), none under the release's
        model.context_tower.layers[0].mixer.dt_bias.fill_(-9.0)
    model.save_pretrained(tmp_path / "split")
    folder = tmp_path / "split" if layout == "split" else write_stacked(tmp_path / "split", tmp_path / "stacked")
    word_tokenizer(64).save_pretrained(folder)
    assert main(["--input", str(folder), "--output", str(tmp_path / "ar"), "--context-tower"]) == 0
    config = json.loads((tmp_path / "ar" / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["architectures"] == ["NemotronHForCausalLM"]
    assert (tmp_path / "ar" / "tokenizer.json").is_file()
    assert all(name.startswith(("backbone.", "lm_head.")) for name in all_tensors(tmp_path / "ar"))
    stock, info = NemotronHForCausalLM.from_pretrained(tmp_path / "ar", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    NemotronHForCausalLM(stock.config)  # the config also builds a fresh model (its dt initialisation takes a log)
    ids = clean_ids(model, 2, 9)
    with torch.no_grad():  # exact: the same operations; with transformers' floor on dt they differ in the last bits
        assert torch.equal(stock.eval()(ids).logits.float(), model(ids).logits)
    greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = model.generate(ids, generation_mode="ar", max_new_tokens=6, eos_token_id=None)
    assert torch.equal(stock.generate(ids, **greedy), ours)


# --- errors -----------------------------------------------------------------------------------------------------------


def broken_copy(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(RELEASE_FIXTURE, folder, ignore=shutil.ignore_patterns("expected.*"))
    return folder


def break_truncated(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    return "model-00002-of-00002.safetensors"


def break_garbage(folder):
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file at all")
    return "model-00001-of-00002.safetensors"


def break_outside(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "outside the input folder"


def break_pickle(folder):
    for path in folder.glob("model*"):
        path.unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    return "pickle"


def rewrite_shard(folder, edit):
    shard = folder / "model-00002-of-00002.safetensors"
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = edit(tensors)
    save_file(tensors, shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def break_missing(folder):
    def edit(tensors):
        del tensors["lm_head.weight"]
        return tensors

    rewrite_shard(folder, edit)
    return "missing: lm_head.weight"


def break_unexpected(folder):
    rewrite_shard(folder, lambda tensors: {**tensors, "denoiser_tower.extra.weight": torch.zeros(2)})
    return "unexpected: denoiser_tower.extra.weight"


def break_shape(folder):
    rewrite_shard(folder, lambda tensors: {**tensors, "lm_head.weight": torch.zeros(3, 3)})
    return "mis-shaped: lm_head.weight"


def break_missing_expert(folder):
    def edit(tensors):
        name = next(k for k in tensors if ".mixer.experts.3.up_proj.weight" in k)
        del tensors[name]
        return tensors

    rewrite_shard(folder, edit)
    return r"1 missing: \S+\.mixer\.experts\.3\.up_proj\.weight"


def break_index(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["context_tower.phantom.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "does not match"


@pytest.mark.parametrize(
    "breaker",
    [break_truncated, break_garbage, break_outside, break_pickle, break_missing, break_unexpected, break_shape,
     break_missing_expert, break_index],
)  # fmt: skip
@pytest.mark.parametrize("existing_output", [False, True])
def test_bad_checkpoints_are_refused_and_the_output_is_untouched(tmp_path, breaker, existing_output):
    source = broken_copy(tmp_path, "source")
    expected_message = breaker(source)
    output = tmp_path / "out"
    if existing_output:
        output.mkdir()
        (output / "keep.txt").write_text("previous result")
    before = snapshot(output)
    with pytest.raises(CheckpointError, match=expected_message.replace("(", r"\(")):
        convert_release_to_package(source, output, overwrite=existing_output)
    assert snapshot(output) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary folder left behind"


def test_non_empty_output_needs_overwrite(release_copy, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("previous result")
    before = snapshot(output)
    assert main(["--input", str(release_copy), "--output", str(output)]) == 1
    assert "not empty" in capsys.readouterr().err and snapshot(output) == before
    assert main(["--input", str(release_copy), "--output", str(output), "--overwrite"]) == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").exists()


def test_an_interrupted_run_leaves_nothing(release_copy, tmp_path, monkeypatch):
    import checkpoint_io

    written = []

    def interrupt_second_shard(tensors, path, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        save_file(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoint_io, "save_file", interrupt_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_release_to_package(release_copy, tmp_path / "out", max_shard_size="500KB")
    assert written and list(tmp_path.iterdir()) == []


def test_shards_respect_the_size_limit(converted, release_copy, tmp_path):
    """Each output shard stays under --max-shard-size (unless one tensor alone is larger), the index names every
    tensor's shard and counts their bytes; under a large limit the weights are one `model.safetensors`."""
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    shards = sorted(converted.glob("model-*-of-*.safetensors"))
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            sizes = [f.get_slice(k)[...].nbytes for k in f.keys()]
            assert all(index["weight_map"][k] == shard.name for k in f.keys())
        assert sum(sizes) <= 500_000 or len(sizes) == 1, (shard.name, sum(sizes))
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    single = convert_release_to_package(release_copy, tmp_path / "one", max_shard_size="1GB")
    assert not (single / "model.safetensors.index.json").exists() and not list(single.glob("model-*"))
    assert tensor_shapes(single) == tensor_shapes(converted)


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "0KB", "-1MB"])
def test_unreadable_shard_sizes_are_refused(release_copy, tmp_path, capsys, size):
    assert main(["--input", str(release_copy), "--output", str(tmp_path / "out"), f"--max-shard-size={size}"]) == 1
    assert f"cannot read the shard size {size!r}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def code_strings(path: Path) -> list[str]:
    """The string literals of a Python file, f-string parts included, docstrings left out."""
    tree = ast.parse(path.read_text())
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, documented) and node.body and isinstance(node.body[0], ast.Expr)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_release_names_live_in_the_layout_module_only():
    """The release's config names and its stored-only tensor prefixes are written in `layout_twotower.py` alone."""
    from transformers_twotower import layout_twotower as layout

    names = [layout.RELEASE_ARCHITECTURE, layout.RELEASE_AUTO_MAP_MARKER, layout.CONTEXT_HEAD]
    names += [f"{prefix}." for prefix in layout.TIME_CONDITIONING]
    root = Path(__file__).parent.parent
    paths = [*(root / "src" / "transformers_twotower").glob("*.py"), *(root / "conversion").glob("*.py")]
    assert {"modeling_twotower.py", "convert_nvidia_twotower.py"} <= {path.name for path in paths}
    for path in paths:
        if path.name != "layout_twotower.py":
            strings = code_strings(path)
            found = [name for name in names if any(name in string for string in strings)]
            found += [layout.RELEASE_MODEL_TYPE] if layout.RELEASE_MODEL_TYPE in strings else []
            assert not found, (path.name, found)
