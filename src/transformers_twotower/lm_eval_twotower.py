"""An lm-evaluation-harness model for TwoTower, registered as `twotower` (the `[eval]` extra: lm-eval 0.4).

    twotower lm_eval --model twotower --model_args pretrained=DIR,generation_mode=mask_diffusion,\
confidence_threshold=0.8,block_size=16,dtype=bfloat16 --tasks gsm8k

or, in Python, `import transformers_twotower.lm_eval_twotower` and then `lm_eval.simple_evaluate(model="twotower",
...)`. lm-eval 0.4 finds models only in its own registry (it has no plugin entry points), so the bare `lm_eval`
command knows `twotower` only once this module is imported: `twotower lm_eval` imports it and then runs lm-eval's
own command line with the arguments given.

- `generate_until` runs `model.generate` in the generation mode of `model_args`, batched with left padding, the
  task's `until` strings stopping each row inside a block (stop strings), `max_gen_toks` as `max_new_tokens`, and the
  task's greedy or sampling arguments. The text is cut before the first `until` string, as lm-eval's HF model cuts
  it. Denoiser forwards (NFE) and tokens per forward are added to the results' `config` (`twotower_generation`).
- `loglikelihood` and `loglikelihood_rolling` are exact: the frozen context tower is the AR backbone, and its
  next-token log-probabilities score the continuation, batched longest first.

Every other model argument is a `TwoTowerGenerationConfig` field (`steps_per_block`, `keep_eos_block`, ...).
"""

import time

import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from transformers import AutoTokenizer

from .defaults_twotower import MODEL_GENERATION_DEFAULTS
from .loading_twotower import load, machine_device
from .modeling_twotower import TwoTowerForDiffusionLM


@register_model("twotower")
class TwoTowerLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | TwoTowerForDiffusionLM,
        tokenizer=None,
        generation_mode: str = MODEL_GENERATION_DEFAULTS["generation_mode"],
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        **generation_fields,
    ):
        super().__init__()
        if isinstance(pretrained, str):
            # As the command lines load a folder; on the machine's device unless one is given.
            loaded, self.model = load(pretrained, device or machine_device(), dtype)
            self.tokenizer = tokenizer or loaded
        else:
            self.model = pretrained.eval()
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(pretrained.name_or_path)
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the twotower model; give a number")
        self.batch_size = int(batch_size)
        self.max_length = max_length or self.model.config.max_position_embeddings
        self.scored = {}  # (tokens, continuation length) -> (log-likelihood, greedy): the same in every mode
        self.use(generation_mode, **generation_fields)

    def use(self, generation_mode: str, **generation_fields):
        """Generate in this mode from now on, with these `TwoTowerGenerationConfig` fields, and count generation
        costs from zero. Log-likelihoods already computed are kept: they come from the context tower in every
        mode (`twotower eval` runs each mode on one model this way)."""
        unknown = set(generation_fields) - set(self.model.generation_config.to_dict())
        if unknown:
            raise ValueError(f"model_args {sorted(unknown)} are neither twotower arguments nor generation fields")
        self.generation = {"generation_mode": generation_mode, **generation_fields}
        self.nfe = self.generated_tokens = 0
        self.generation_seconds = 0.0
        return self

    # --- tokens ---------------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # an empty context is scored after BOS, as the model was trained
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def device(self):
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- log-likelihoods ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, rows: list[list[int]], lengths: list[int]) -> list[tuple[float, bool]]:
        """For each token row, the log-probability of its last `length` tokens given the rest, under the context
        tower, and whether each of them is the greedy choice. Rows are left-padded into one batch."""
        batch = self.tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt").to(self.device)
        width = max(lengths)  # only the last `width` positions are scored: the head runs on those alone
        logits = self.model(**batch, logits_to_keep=width + 1).logits[:, :-1]  # fp32; position i predicts i + 1
        targets = batch["input_ids"][:, -width:]
        picked = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        scored = torch.arange(width, device=self.device) >= width - torch.tensor(lengths, device=self.device)[:, None]
        greedy = (logits.argmax(-1) == targets) | ~scored
        return list(zip((picked * scored).sum(-1).tolist(), greedy.all(-1).tolist()))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        def key(request):  # truncated on the left to the model's length, as lm-eval's HF model does
            _, context, continuation = request
            return tuple((context + continuation)[-(self.max_length + 1) :]), len(continuation)

        keys = [key(request) for request in requests]
        todo = sorted({k for k in keys if k not in self.scored}, key=lambda k: (-len(k[0]), k[0]))  # longest first
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            self.scored.update(zip(chunk, self._score([list(t) for t, _ in chunk], [n for _, n in chunk])))
        for request, k in zip(requests, keys):
            if request[0] is not None:  # rolling windows have no request of their own
                self.cache_hook.add_partial("loglikelihood", request[0], self.scored[k])
        return [self.scored[k] for k in keys]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood: disjoint windows of at most `max_length` tokens, each after BOS and the
        tokens before it (lm-eval's rolling windows)."""
        texts = [text for (text,) in [request.args for request in requests]]
        windows = [
            [
                utils.make_disjoint_window(window)
                for window in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            for text in texts
        ]
        # Every window of every text in one pass, batched and remembered as the other log-likelihoods are.
        scores = iter(self._loglikelihood_tokens([(None, *window) for text in windows for window in text]))
        results = [sum(next(scores)[0] for _ in text) for text in windows]
        for text, total in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # --- generation -----------------------------------------------------------------------------------------------

    def generation_kwargs(self, task_kwargs: dict) -> tuple[dict, list[str]]:
        """`model.generate` arguments for a task's `gen_kwargs`, and its `until` strings."""
        task_kwargs = dict(normalize_gen_kwargs(task_kwargs))  # lm-eval's reading: aliases, greedy as temperature 0
        until = [stop for stop in task_kwargs.pop("until") if stop]
        max_new_tokens = task_kwargs.pop("max_gen_toks")
        if not task_kwargs["do_sample"]:
            task_kwargs.pop("temperature", None)
        kwargs = {**self.generation, **task_kwargs, "max_new_tokens": max_new_tokens}
        if until:
            kwargs.update(stop_strings=until, tokenizer=self.tokenizer)
        return kwargs, until

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        collator = Collator(
            [(context, task_kwargs, self.tok_encode(context)) for context, task_kwargs in [r.args for r in requests]],
            sort_fn=lambda args: (-len(args[2]), args[0]),  # each context tokenized once
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs, rows = zip(*chunk)
            kwargs, until = self.generation_kwargs(all_kwargs[0])
            keep = max(self.max_length - kwargs["max_new_tokens"], 1)  # the prompt's end, as lm-eval's HF model
            rows = [row[-keep:] for row in rows]
            inputs = self.tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt").to(self.device)
            began = time.perf_counter()
            out = self.model.generate(**inputs, **kwargs, return_dict_in_generate=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.generation_seconds += time.perf_counter() - began
            generated = out.sequences[:, inputs["input_ids"].shape[1] :]
            for context, tokens in zip(contexts, generated):
                text = postprocess_generated_text(self.tok_decode(tokens.tolist()), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            self.nfe += int(out.nfe.sum())
            self.generated_tokens += int(out.num_generated.sum())
        return collator.get_original(results)

    def get_model_info(self) -> dict:
        """Added to the results' `config` after the run: the mode and what generation cost."""
        per_forward = self.generated_tokens / self.nfe if self.nfe else None
        return {
            "twotower_generation": {
                **self.generation,
                "nfe": self.nfe,
                "generated_tokens": self.generated_tokens,
                "tokens_per_forward": per_forward,
                "generation_seconds": self.generation_seconds,
                "tokens_per_second": self.generated_tokens / self.generation_seconds
                if self.generation_seconds
                else None,
            }
        }


__all__ = ["TwoTowerLM"]
