"""transformers' conventions, checked the way `ModelTesterMixin` / `GenerationTesterMixin` check a model, on the tiny
release fixture. Where transformers' behaviour is the reference, the reference is a stock `NemotronHForCausalLM`
holding the context tower (the original backbone)."""

import logging

import pytest
import torch
from conftest import (
    EXPECTED_PROMPTS,
    GENERATE,
    clean_ids,
    left_pad,
    load_release,
    tiny_model,
)
from transformers import GenerationConfig, NemotronHForCausalLM
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

from transformers_twotower import TwoTowerForDiffusionLM, TwoTowerGenerationConfig
from transformers_twotower.defaults_twotower import GENERATION_MODES
from transformers_twotower.layout_twotower import context_tower_as_nemotron_h


PROMPT = torch.tensor([EXPECTED_PROMPTS["main"]])  # 12 tokens, BOS first


@pytest.fixture(scope="module")
def stock(release_model) -> NemotronHForCausalLM:
    return context_tower_as_nemotron_h(release_model)


# --- checkpoints ------------------------------------------------------------------------------------------------------


def test_save_and_reload_reports_nothing_missing_and_computes_the_same(release_model, tmp_path):
    release_model.save_pretrained(tmp_path)
    loaded, info = TwoTowerForDiffusionLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    loaded.eval()
    torch.testing.assert_close(loaded(PROMPT).logits, release_model(PROMPT).logits, rtol=0, atol=0)
    for mode in GENERATION_MODES:
        assert torch.equal(
            loaded.generate(PROMPT, generation_mode=mode, **GENERATE),
            release_model.generate(PROMPT, **GENERATE, generation_mode=mode),
        )


@pytest.mark.parametrize("dtype", ["auto", torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_routers_correction_bias_in_fp32(dtype):
    """The fixture is stored in bf16, the MoE routers' correction bias in fp32, as Nemotron-H keeps it: loaded with
    `dtype="auto"` or cast to half precision by `from_pretrained`, every weight is in half precision but the biases
    of both towers' routers (buffers), which stay fp32 and bit for bit the stored values."""
    model = load_release(dtype=dtype)
    state = model.state_dict()
    biases = {name for name in state if name.endswith(".gate.e_score_correction_bias")}
    assert {name.split(".")[0] for name in biases} == {"context_tower", "denoiser_tower"}
    assert model.dtype == (torch.bfloat16 if dtype == "auto" else dtype)
    assert {name for name, tensor in state.items() if tensor.dtype == torch.float32} == biases
    stored = load_release().state_dict()  # fp32: the stored fp32 biases as they are
    for name in biases:
        assert torch.equal(state[name], stored[name]), name


def test_resize_token_embeddings_resizes_both_towers_and_both_heads(tmp_path):
    model = load_release()
    matrices = {
        "denoiser embeddings": lambda m: m.denoiser_tower.embeddings.weight,
        "denoiser head": lambda m: m.lm_head.weight,
        "context embeddings": lambda m: m.context_tower.embeddings.weight,
        "context head": lambda m: m.context_tower.lm_head.weight,
    }
    before = {name: get(model).detach().clone() for name, get in matrices.items()}
    model.resize_token_embeddings(520)
    assert model.config.vocab_size == 520
    for name, get in matrices.items():
        after = get(model)
        assert after.shape == (520, model.config.hidden_size), name
        assert torch.equal(after[:512], before[name]), f"{name}: the old rows are kept"
        # transformers' mean resizing: new rows drawn around the old rows' mean with a vanishing covariance.
        torch.testing.assert_close(after[512:], before[name].mean(0).expand(8, -1), rtol=0, atol=1e-3, msg=name)
    assert not any(p.requires_grad for p in model.context_tower.parameters()), "the context tower stays frozen"

    prompt = torch.tensor([[1, 515, 37, 519]])  # new ids in the prompt reach both towers
    for mode in GENERATION_MODES:
        out = model.generate(prompt, generation_mode=mode, **GENERATE)
        assert out.shape == (1, 12) and bool((out < 520).all())
    model.save_pretrained(tmp_path)
    reloaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == 520
    torch.testing.assert_close(reloaded(prompt).logits, model(prompt).logits, rtol=0, atol=0)
    assert torch.equal(reloaded.generate(prompt, **GENERATE), model.generate(prompt, **GENERATE))


def test_tie_word_embeddings_ties_each_head_to_its_own_tower(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.denoiser_tower.embeddings.weight
    assert model.context_tower.lm_head.weight is model.context_tower.embeddings.weight
    model.save_pretrained(tmp_path)
    reloaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.denoiser_tower.embeddings.weight
    assert reloaded.context_tower.lm_head.weight is reloaded.context_tower.embeddings.weight
    ids = clean_ids(model, 2, 6)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.resize_token_embeddings(70)
    assert model.lm_head.weight is model.denoiser_tower.embeddings.weight
    assert model.context_tower.lm_head.weight is model.context_tower.embeddings.weight
    untied = tiny_model()  # the default, as in the release
    assert untied.lm_head.weight is not untied.denoiser_tower.embeddings.weight


# --- generation config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["model config", "keywords"])
def test_generation_config_round_trip(release_model, tmp_path, source):
    """A saved `generation_config.json` reloads with every TwoTower field, through the plain class too: one made from
    the model's config (its block size and mask id filled in), one from keywords alone (the fields not given stay
    unset, for `generate` to take from the model); a threshold above 1 (one token per step) is kept."""
    if source == "model config":
        config = TwoTowerGenerationConfig.from_model_config(release_model.config)
        config.steps_per_block, config.confidence_threshold, config.generation_mode = 8, 0.7, "mock_ar"
        from_model = (16, 3, False)
    else:
        config = TwoTowerGenerationConfig(generation_mode="mock_ar", steps_per_block=8, confidence_threshold=1.01)
        from_model = (None, None, None)
    config.save_pretrained(tmp_path)
    for cls in (GenerationConfig, TwoTowerGenerationConfig):
        loaded = cls.from_pretrained(tmp_path)
        assert isinstance(loaded, cls)
        given = (loaded.generation_mode, loaded.steps_per_block, loaded.confidence_threshold)
        assert given == ("mock_ar", 8, config.confidence_threshold), cls.__name__
        assert (loaded.block_size, loaded.mask_token_id, loaded.keep_eos_block) == from_model, cls.__name__


def test_a_plain_generation_config_is_merged_with_the_model_defaults(release_model, stock):
    """transformers' rule: what the caller sets wins, everything else comes from the model's generation config."""
    expected = release_model.generate(PROMPT)  # the model's defaults: mask diffusion, block 16, threshold 0.8
    assert torch.equal(release_model.generate(PROMPT, generation_config=GenerationConfig(do_sample=False)), expected)
    assert torch.equal(release_model.generate(PROMPT, generation_config=TwoTowerGenerationConfig()), expected)

    # The model's EOS is kept when the caller's config does not set one, as a stock model keeps its own.
    free = release_model.generate(PROMPT, generation_mode="ar", max_new_tokens=16, eos_token_id=None)[0, 12:].tolist()
    eos = free[6]
    release_model.generation_config.eos_token_id = stock.generation_config.eos_token_id = eos
    try:
        ours = release_model.generate(
            PROMPT, generation_config=GenerationConfig(max_new_tokens=16, generation_mode="ar")
        )
        theirs = stock.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=16, pad_token_id=0))
    finally:
        release_model.generation_config.eos_token_id = stock.generation_config.eos_token_id = 2
    assert ours[0, 12:].tolist() == free[: free.index(eos) + 1]
    assert torch.equal(ours, theirs)


def test_max_length_and_max_new_tokens_as_transformers_reads_them(release_model, stock):
    ar = dict(generation_mode="ar", eos_token_id=None)
    stock_kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = release_model.generate(PROMPT, max_length=20, **ar)
    assert ours.shape == (1, 20) and torch.equal(ours, stock.generate(PROMPT, max_length=20, **stock_kwargs))
    both = release_model.generate(PROMPT, max_length=30, max_new_tokens=5, **ar)  # max_new_tokens wins
    assert both.shape == (1, 17) and torch.equal(
        both, stock.generate(PROMPT, max_length=30, max_new_tokens=5, **stock_kwargs)
    )
    assert release_model.generate(PROMPT, max_length=20, **GENERATE | {"max_new_tokens": None}).shape == (1, 20)
    with pytest.raises(ValueError, match="`max_length` \\(5\\) counts the prompt"):
        release_model.generate(PROMPT, max_length=5)


def test_eos_token_id_as_a_list(release_model, stock):
    """A row ends at the first token of the list it generates, in every mode; in AR mode exactly as a stock model."""
    for mode in GENERATION_MODES:
        kwargs = dict(generation_mode=mode, max_new_tokens=12, block_size=4, steps_per_block=4)
        free = release_model.generate(PROMPT, **kwargs, eos_token_id=None)[0, 12:].tolist()
        eos = [free[7], free[4]]
        first = min(i for i, token in enumerate(free) if token in eos)
        ours = release_model.generate(PROMPT, **kwargs, eos_token_id=eos)
        assert ours[0, 12:].tolist() == free[: first + 1], mode
        if mode == "ar":
            theirs = stock.generate(PROMPT, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
            assert torch.equal(ours, theirs)


# --- batches ----------------------------------------------------------------------------------------------------------


def test_a_padded_batch_without_its_mask_infers_left_padding(release_model):
    """As transformers does: the pad id occurs in the inputs and differs from EOS, so the mask is inferred."""
    ids, mask = left_pad([EXPECTED_PROMPTS["len2"], EXPECTED_PROMPTS["main"]])
    for mode in GENERATION_MODES:
        with_mask = release_model.generate(ids, attention_mask=mask, generation_mode=mode, **GENERATE)
        assert torch.equal(release_model.generate(ids, generation_mode=mode, **GENERATE), with_mask), mode
        alone = release_model.generate(torch.tensor([EXPECTED_PROMPTS["len2"]]), generation_mode=mode, **GENERATE)
        assert with_mask[0, -8:].tolist() == alone[0, -8:].tolist(), mode


def test_pad_equal_to_eos_cannot_be_inferred_and_warns_as_transformers_does(release_model, caplog):
    ids, _ = left_pad([EXPECTED_PROMPTS["len2"], EXPECTED_PROMPTS["main"]], pad_id=2)
    with caplog.at_level(logging.WARNING):
        release_model.generate(ids, pad_token_id=2, max_new_tokens=4, block_size=4, eos_token_id=2)
    assert "cannot be inferred from input because pad token is same as eos token" in caplog.text


def test_beams_and_several_sequences_per_prompt_are_refused_clearly(release_model):
    with pytest.raises(ValueError, match="`num_beams` must be 1"):
        release_model.generate(PROMPT, num_beams=2)
    with pytest.raises(ValueError, match="`num_return_sequences`"):
        release_model.generate(PROMPT, num_return_sequences=2)


# --- forward ----------------------------------------------------------------------------------------------------------


def test_return_dict_false_returns_the_tuple(release_model, stock):
    logits = release_model(PROMPT).logits
    (tupled,) = release_model(PROMPT, return_dict=False)
    torch.testing.assert_close(tupled, logits, rtol=0, atol=0)
    torch.testing.assert_close(tupled, stock(PROMPT, return_dict=False)[0].float(), rtol=1e-4, atol=1e-4)
    noise = torch.arange(12)[None] % 3 == 0
    as_dict = release_model(PROMPT, labels=PROMPT, noise_mask=noise)
    loss, training_logits = release_model(PROMPT, labels=PROMPT, noise_mask=noise, return_dict=False)
    assert torch.equal(loss, as_dict.loss) and torch.equal(training_logits, as_dict.logits)


def test_output_hidden_states_are_those_of_the_tower_that_made_the_logits(release_model, stock):
    ours = release_model(PROMPT, output_hidden_states=True).hidden_states
    theirs = stock(PROMPT, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == release_model.config.num_hidden_layers + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    noise = torch.arange(12)[None] % 3 == 0
    training = release_model(PROMPT, labels=PROMPT, noise_mask=noise, output_hidden_states=True).hidden_states
    assert len(training) == release_model.config.num_hidden_layers + 1
    noisy = PROMPT.masked_fill(noise, 3)
    torch.testing.assert_close(training[0], release_model.denoiser_tower.embeddings(noisy), rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_attentions"):  # the diffusion loss records no attentions
        release_model(PROMPT, labels=PROMPT, output_attentions=True)


# --- training conveniences --------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = None
    results = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            assert model.denoiser_tower.layers[0].gradient_checkpointing
        calls = []
        model.denoiser_tower.layers[0].mixer.in_proj.register_forward_hook(lambda *_: calls.append(1))
        ids = clean_ids(model, 2, 8) if ids is None else ids
        noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.5
        loss = model(ids, labels=ids, noise_mask=noise).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1), "the backward pass recomputes checkpointed layers"
        results.append(
            (
                loss.detach(),
                model.denoiser_tower.adaln.t_embedder.mlp[0].weight.grad.clone(),
                model.lm_head.weight.grad.clone(),
            )
        )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_peft_adapter_save_reload_and_merge(tmp_path):
    """The default LoRA targets are the denoiser's; the adapter reloads and merges into the same generations."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_model(seed=1)
    ids = clean_ids(model, 2, 5)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".denoiser_tower.layers." in name and ".lora_" in name for name in trainable)
    targeted = {name.split(".mixer.")[1].split(".")[0] for name in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj"}

    adapted.eval()
    expected = {mode: adapted.generate(input_ids=ids, generation_mode=mode, **GENERATE) for mode in GENERATION_MODES}
    base = tiny_model(seed=1).generate(ids, **GENERATE)
    assert not torch.equal(expected["mask_diffusion"], base), "the adapter must change something"

    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(seed=1), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, TwoTowerForDiffusionLM)
    for mode in GENERATION_MODES:
        assert torch.equal(reloaded.generate(input_ids=ids, generation_mode=mode, **GENERATE), expected[mode])
        assert torch.equal(merged.generate(ids, generation_mode=mode, **GENERATE), expected[mode])


@pytest.mark.parametrize("cpu_share", [3, 2])  # a third / half of the model on the CPU, the rest offloaded to disk
def test_device_map_with_disk_offload_generates_the_same(tmp_path, cpu_share):
    model, folder = tiny_model(seed=1), tmp_path / "model"
    model.save_pretrained(folder)
    ids = clean_ids(model, 2, 5)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = TwoTowerForDiffusionLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": size // cpu_share}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in offloaded.hf_device_map.values()
    # `_no_split_modules` keeps every layer whole.
    assert all(key.count(".") <= 2 for key in offloaded.hf_device_map), offloaded.hf_device_map
    for mode in GENERATION_MODES:
        assert torch.equal(
            offloaded.generate(ids, generation_mode=mode, **GENERATE),
            model.generate(ids, generation_mode=mode, **GENERATE),
        )


def test_torch_compile_gives_the_same_loss_gradients_and_denoiser_steps():
    """`torch.compile(model)` on the training forward, and the denoiser tower compiled for `denoise_step`. The
    context tower's block loop and the view memo stay eager (`torch.compiler.disable`). `aot_eager` traces and
    differentiates exactly what inductor would compile, at a fraction of the compile time; the benchmark
    (benchmarks/bench_compile.py) measures inductor."""
    ids = clean_ids(tiny_model(), 2, 8)
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    results = []
    for compiled in (False, True):
        model = tiny_model().train()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        loss = run(ids, labels=ids, noise_mask=noise).loss
        loss.backward()
        results.append(
            (loss.detach(), model.lm_head.weight.grad, model.denoiser_tower.layers[0].mixer.in_proj.weight.grad)
        )
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("training_context" in reason for reason in breaks), f"graph breaks: {dict(breaks)}"

    # The noise drawn inside, at two lengths (the second one symbolic to the compiled model), as `Trainer` calls it.
    model = tiny_model().train()
    compiled = torch.compile(model, backend="aot_eager")
    for length in (8, 12):
        ids = clean_ids(model, 2, length, seed=length)
        losses = []
        for run in (model, compiled):
            torch.manual_seed(length)
            losses.append(run(ids, labels=ids).loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)

    model = tiny_model()
    cache, block, t = model.prefill(ids), torch.tensor([[3, 17, 3, 3], [3, 3, 3, 9]]), torch.tensor([0.75, 0.5])
    eager = model.denoise_step(block, cache, t)
    model.denoiser_tower.compile(backend="aot_eager")
    torch.testing.assert_close(model.denoise_step(block, cache, t), eager, rtol=1e-5, atol=1e-5)


# --- what transformers' common model tests found ---------------------------------------------------------------------


def test_from_pretrained_with_a_state_dict_and_no_folder():
    model = tiny_model(seed=0)
    loaded = TwoTowerForDiffusionLM.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_forward_refuses_tensor_keywords_by_name_and_accepts_nemotron_h_ones():
    model = tiny_model(seed=0)
    ids = clean_ids(model, 2, 8)
    with pytest.raises(ValueError, match="shift_labels"):
        model(ids, shift_labels=ids)
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=3, use_cache=True).logits, full[:, -3:])
    torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])


def test_log_likelihood_is_the_stock_models():
    model = tiny_model(seed=0)
    stock = context_tower_as_nemotron_h(model)
    ids = clean_ids(model, 2, 9)
    expected = -torch.nn.functional.cross_entropy(
        stock(ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    ).view(2, 8)
    torch.testing.assert_close(model.log_likelihood(ids), expected, rtol=1e-5, atol=1e-5)
    # Left padding counts nothing, and does not change the text's likelihood.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], dim=1)
    mask = (torch.arange(12) >= 3).long()[None]
    scores = model.log_likelihood(padded, attention_mask=mask)
    assert torch.equal(scores[0, :3], torch.zeros(3))
    torch.testing.assert_close(scores[0, 3:], expected[0], rtol=1e-4, atol=1e-4)


def test_both_heads_have_a_tensor_parallel_plan():
    model = tiny_model(seed=0)
    heads = {name for name, module in model.named_modules() if name.endswith("lm_head")}
    assert heads == {"lm_head", "context_tower.lm_head"} and heads <= set(model._tp_plan)


def test_attentions_and_router_logits_are_the_stock_models():
    model = tiny_model(seed=0)
    stock = context_tower_as_nemotron_h(model)
    model.set_attn_implementation("eager")
    stock.set_attn_implementation("eager")
    ids = clean_ids(model, 2, 8)
    ours = model(ids, output_attentions=True, output_router_logits=True)
    theirs = stock(ids, output_attentions=True, output_router_logits=True)
    assert (
        len(ours.attentions) == len(theirs.attentions) > 0 and len(ours.router_logits) == len(theirs.router_logits) > 0
    )
    for a, b in [*zip(ours.attentions, theirs.attentions), *zip(ours.router_logits, theirs.router_logits)]:
        torch.testing.assert_close(a, b)
    assert model(ids).attentions is None and model(ids).router_logits is None
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, labels=ids, output_attentions=True)


def test_router_logits_follow_the_config_flag_and_an_argument_wins():
    """`config.output_router_logits` turns them on as in transformers' MoE models (the stock Nemotron-H beside it);
    an explicit argument wins. With `labels` they are the denoiser's routers', as a hook on each router sees them."""
    model = tiny_model(seed=0)
    stock = context_tower_as_nemotron_h(model)
    ids = clean_ids(model, 2, 8)
    model.config.output_router_logits = stock.config.output_router_logits = True
    ours, theirs = model(ids).router_logits, stock(ids).router_logits
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert model(ids, output_router_logits=False).router_logits is None

    seen = []
    routers = [m for m in model.denoiser_tower.modules() if isinstance(m, NemotronHTopkRouter)]
    hooks = [router.register_forward_hook(lambda module, args, out: seen.append(out[0])) for router in routers]
    try:
        trained = model(ids, labels=ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(trained.router_logits) == len(seen) == len(routers) > 0
    for a, b in zip(trained.router_logits, seen):
        assert torch.equal(a, b)
    assert model(ids, labels=ids, output_router_logits=False).router_logits is None

    model.config.output_router_logits = False
    assert model(ids).router_logits is None and model(ids, labels=ids).router_logits is None
    assert len(model(ids, output_router_logits=True).router_logits) == len(ours)

    # The config's attention flag applies without labels; training still runs (only an explicit argument is refused).
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    assert model(ids).attentions and model(ids, labels=ids).loss is not None
