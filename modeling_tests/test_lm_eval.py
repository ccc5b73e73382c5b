"""The lm-evaluation-harness model `twotower` (src/transformers_twotower/lm_eval_twotower.py), offline, on the demo.

Log-likelihoods are checked against transformers' own Nemotron-H holding the context tower, row by row and unpadded;
generation against `model.generate` with the same settings; and the local task (fixtures/eval_task: next-line
completion and multiple choice on held-out stdlib code) runs through `lm_eval.simple_evaluate` and lm-eval's own
command line.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


lm_eval = pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
from lm_eval.api.instance import Instance  # noqa: E402

from transformers_twotower.layout_twotower import context_tower_as_nemotron_h  # noqa: E402
from transformers_twotower.lm_eval_twotower import TwoTowerLM  # noqa: E402
from transformers_twotower.loading_twotower import DEMO_MODEL  # noqa: E402


TASK_DIR = Path(__file__).parent / "fixtures" / "eval_task"
ROWS = [json.loads(line) for line in (TASK_DIR / "code_task.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stock(demo):
    return context_tower_as_nemotron_h(demo[0])


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def stock_log_probs(stock, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) under transformers' Nemotron-H, one unpadded row."""
    with torch.no_grad():
        logits = stock(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The whole row's tokens and the context's, as lm-eval forms them: the context's trailing spaces move to the
    continuation, and an empty context is BOS."""
    if not context:
        return [tokenizer.bos_token_id] + tokenizer.encode(continuation, add_special_tokens=False), [1]
    kept = context.rstrip()
    return tokenizer.encode(context + continuation), tokenizer.encode(kept)


def test_loglikelihood_equals_the_backbone_row_by_row(demo, stock):
    """Batched (ragged rows, left-padded, sorted longest first) against each row alone in the stock model."""
    model, tokenizer = demo
    lm = TwoTowerLM(model, tokenizer=tokenizer, batch_size=4)
    pairs = [(row["prompt"], choice) for row in ROWS[:3] for choice in row["choices"]] + [("", "import heapq")]
    context = ROWS[3]["prompt"].rstrip()  # and a continuation the backbone picks greedily
    ids = torch.tensor([tokenizer.encode(context)])
    greedy_text = tokenizer.decode(stock.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1] :])
    pairs.append((context, greedy_text))
    results = lm.loglikelihood(requests("loglikelihood", pairs))
    assert len(results) == len(pairs) and results[-1][1] and not all(greedy for _, greedy in results)
    for (context, continuation), (score, greedy) in zip(pairs, results):
        whole, head = encode_pair(tokenizer, context, continuation)
        assert score == pytest.approx(stock_log_probs(stock, whole)[len(head) - 1 :].sum().item(), abs=1e-3)
        with torch.no_grad():
            argmax = stock(torch.tensor([whole])).logits[0, len(head) - 1 : -1].argmax(-1)
        assert greedy == bool((argmax == torch.tensor(whole[len(head) :])).all())


def test_loglikelihood_rolling_is_the_sum_of_the_token_log_probs(demo, stock):
    model, tokenizer = demo
    texts = [ROWS[0]["prompt"] + ROWS[0]["target"], ROWS[5]["prompt"]]
    lm = TwoTowerLM(model, tokenizer=tokenizer, batch_size=2)
    results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,) for text in texts]))
    for text, score in zip(texts, results):
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
        assert score == pytest.approx(stock_log_probs(stock, ids).sum().item(), abs=1e-3)
    # with windows shorter than the text: disjoint windows, each after the tokens before it, still sum the same
    short = TwoTowerLM(model, tokenizer=tokenizer, batch_size=2, max_length=16)
    windowed = short.loglikelihood_rolling(requests("loglikelihood_rolling", [(texts[0],)]))[0]
    ids = [tokenizer.bos_token_id] + tokenizer.encode(texts[0], add_special_tokens=False)
    # the window predicting text tokens [s, e), e = min(s + 16, n), reads the 16 tokens before e and one more
    n, expected = len(ids) - 1, 0.0
    for s in range(0, n, 16):
        e = min(s + 16, n)
        expected += stock_log_probs(stock, ids[max(0, e - 16) : e + 1])[-(e - s) :].sum().item()
    assert len(ids) > 33 and windowed != pytest.approx(results[0], abs=1e-2)  # the windows cut the context
    assert windowed == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("mode", ["mask_diffusion", "ar"])
def test_generate_until_equals_generate_and_stops_at_until(demo, mode):
    model, tokenizer = demo
    lm = TwoTowerLM(model, tokenizer=tokenizer, batch_size=3, generation_mode=mode, confidence_threshold=0.8)
    contexts = [row["prompt"] for row in ROWS[:3]]
    task = {"until": ["\n"], "max_gen_toks": 20, "do_sample": False}
    texts = lm.generate_until(requests("generate_until", [(context, task) for context in contexts]))
    free = lm.generate_until(requests("generate_until", [(contexts[0], {"max_gen_toks": 20, "do_sample": False})]))
    batch = tokenizer(contexts, return_tensors="pt", padding=True)
    expected = model.generate(**batch, generation_mode=mode, confidence_threshold=0.8, max_new_tokens=20,
                              stop_strings=["\n"], tokenizer=tokenizer, do_sample=False)  # fmt: skip
    for text, row in zip(texts, expected[:, batch["input_ids"].shape[1] :]):
        assert text == tokenizer.decode(row, skip_special_tokens=True).split("\n")[0]
        assert "\n" not in text
    assert free[0].startswith(texts[0])
    stop = free[0][len(free[0]) // 2 :][:2]  # a string the free run reaches halfway: `until` cuts it there
    cut = lm.generate_until(requests("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 20})]))
    assert cut[0] == free[0].split(stop)[0] and len(cut[0]) < len(free[0])
    info = lm.get_model_info()["twotower_generation"]
    assert info["generation_mode"] == mode and info["nfe"] > 0 and info["generated_tokens"] > 0
    if mode == "ar":
        assert info["tokens_per_forward"] == 1.0


def test_unknown_model_args_are_refused_by_name(demo):
    model, tokenizer = demo
    with pytest.raises(ValueError, match="confidense_threshold"):
        TwoTowerLM(model, tokenizer=tokenizer, confidense_threshold=0.8)


def stock_choice_accuracy(stock, tokenizer, rows) -> float:
    """The multiple-choice accuracy the stock model's log-likelihoods give on these rows."""
    correct = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            whole, head = encode_pair(tokenizer, row["prompt"], choice)
            scores.append(stock_log_probs(stock, whole)[len(head) - 1 :].sum().item())
        correct += max(range(len(scores)), key=scores.__getitem__) == row["gold"]
    return correct / len(rows)


def test_the_local_task_runs_through_simple_evaluate(demo, stock, monkeypatch):
    """The harness's scores equal the ones computed here: accuracy from the stock model's log-likelihoods of the four
    choices (one of these six rows is right), and each generated answer is `model.generate`'s text cut at the
    newline (compared text by text: the demo's exact match is 0, which alone could not fail)."""
    model, tokenizer = demo
    monkeypatch.chdir(TASK_DIR)  # the task's data_files are relative
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="twotower",
        model_args=f"pretrained={DEMO_MODEL},generation_mode=mask_diffusion,confidence_threshold=0.8,batch_size=4",
        tasks=["code_next_line", "code_choice"],
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        limit=6,
        log_samples=True,
    )
    rows = ROWS[:6]
    accuracy = stock_choice_accuracy(stock, tokenizer, rows)
    assert results["results"]["code_choice"]["acc,none"] == pytest.approx(accuracy) and accuracy > 0
    batch = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True)
    out = model.generate(**batch, confidence_threshold=0.8, max_new_tokens=24, stop_strings=["\n"],
                         tokenizer=tokenizer, do_sample=False)  # fmt: skip
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [text.split("\n")[0] for text in texts]
    harness = {sample["doc_id"]: sample["resps"][0][0] for sample in results["samples"]["code_next_line"]}
    assert [harness[i] for i in range(len(rows))] == answers and any(answers)
    exact = sum(answer == row["target"] for answer, row in zip(answers, rows)) / len(rows)
    assert results["results"]["code_next_line"]["exact_match,none"] == pytest.approx(exact)
    assert results["config"]["twotower_generation"]["nfe"] > 0


@pytest.mark.slow
def test_lm_eval_command_line_knows_twotower(tmp_path):
    """`twotower lm_eval ...` is lm-eval's own command line with the model registered, run as the docs write it but
    without `--device`: on this machine without CUDA it picks the CPU (lm-eval's own default is `cuda:0`)."""
    command = [sys.executable, "-m", "transformers_twotower", "lm_eval", "--model", "twotower",
               "--model_args", f"pretrained={DEMO_MODEL},generation_mode=ar", "--tasks", "code_choice",
               "--include_path", str(TASK_DIR), "--limit", "4", "--output_path", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=TASK_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(tmp_path.rglob("results_*.json"))
    assert written and "code_choice" in json.loads(written[0].read_text())["results"]


@pytest.mark.parametrize("machine", ["cpu", "cuda"])
def test_lm_eval_gets_the_machines_device_unless_one_is_named(machine, monkeypatch):
    import transformers_twotower.__main__ as cli

    monkeypatch.setattr(cli, "machine_device", lambda: machine)
    tasks = ["--model", "twotower", "--tasks", "code_choice"]
    assert cli.with_machine_device(tasks) == [*tasks, "--device", machine]
    for named in (["--device", "cpu"], ["--device=cuda:1"], ["--model_args", "pretrained=x,device=cpu"],
                  ["--model_args=pretrained=x,device=mps"]):  # fmt: skip
        assert cli.with_machine_device([*tasks, *named]) == [*tasks, *named]
    assert cli.with_machine_device([*tasks, "--model_args", "device_map=auto"])[-1] == machine
    assert cli.with_machine_device(["run", *tasks]) == ["run", *tasks, "--device", machine]
    for other in ([], ["run"], ["ls", "tasks"], ["validate", "--tasks", "x"], [*tasks, "--help"]):
        assert cli.with_machine_device(other) == other, other  # lm-eval's other commands take no --device


def test_the_comparison_command_writes_its_table(demo, stock, tmp_path, monkeypatch):
    """`twotower eval`: each mode on the same tasks; AR is 100% of itself; the multiple-choice score, an exact AR
    log-likelihood, is the stock model's in every mode (one of the five rows is right); the table and the JSON are
    written."""
    from transformers_twotower.__main__ import main

    monkeypatch.chdir(TASK_DIR)
    output = tmp_path / "compare.json"
    argv = ["eval", "--tasks", "code_next_line", "code_choice", "--modes", "ar", "mask_diffusion", "--thresholds",
            "0.5", "0.9", "--include-path", str(TASK_DIR), "--limit", "5", "--batch-size", "4", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(output.read_text())
    runs = {(run["mode"], run["threshold"]): run for run in result["runs"]}
    assert set(runs) == {("ar", None), ("mask_diffusion", 0.5), ("mask_diffusion", 0.9)}
    ar = runs["ar", None]
    assert ar["score_vs_ar_percent"] == 100.0
    assert ar["throughput_vs_ar"] == 1.0 and ar["tokens_per_forward"] == 1.0
    accuracy = stock_choice_accuracy(stock, demo[1], ROWS[:5])
    assert accuracy > 0 and [run["scores"]["code_choice"] for run in result["runs"]] == [pytest.approx(accuracy)] * 3
    assert all(run["nfe"] > 0 and run["tokens_per_second"] > 0 for run in result["runs"])
    assert result["model"] == "demo" and "/" not in result["model"]
