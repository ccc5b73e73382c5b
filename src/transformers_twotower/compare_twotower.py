"""The release's comparison: the same lm-eval tasks in each generation mode, scored against AR.

    twotower eval --tasks gsm8k mmlu --modes ar mask_diffusion [--thresholds 0.8 0.95] [--model DIR]
                  [--include-path DIR] [--limit N] [--batch-size 8] [--device cuda] [--dtype bfloat16]
                  [--output results/compare.json] [--confirm-run-unsafe-code]

Each run loads nothing again: one model and tokenizer, one `TwoTowerLM` switched from mode to mode, which scores
each log-likelihood request once (they come from the context tower in every mode). For
each run the table gives every task's score (its first metric), their mean, that mean as a percentage of AR's (the
release's "98.7% of the AR baseline"), generated tokens per second of generation time, denoiser forwards (NFE) and
tokens per forward. The release's throughput ratio is the diffusion run's tokens/s over AR's. Written to `--output`
as JSON, with a plot beside it (`.png`, when matplotlib is installed) and the table printed as Markdown.
"""

import argparse
import json
from pathlib import Path

import torch

from .defaults_twotower import GENERATION_MODES, MODEL_GENERATION_DEFAULTS
from .loading_twotower import DEMO_MODEL, DTYPES, load


def first_metric(task_results: dict) -> tuple[str, float]:
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):  # "metric,filter"
            return key.split(",")[0], float(value)
    raise ValueError(f"no metric in {task_results}")


def compare(
    model, tokenizer, tasks, modes, thresholds, include_path=None, limit=None, batch_size=1, unsafe=False
) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_twotower import TwoTowerLM

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    runs = [("ar", None)] if "ar" in modes else []
    runs += [(mode, t) for mode in modes if mode != "ar" for t in (thresholds if mode == "mask_diffusion" else [None])]
    lm, rows = TwoTowerLM(model, tokenizer=tokenizer, batch_size=batch_size), []
    for mode, threshold in runs:  # one model: log-likelihood tasks are scored once, by the first run
        lm.use(mode, **({} if threshold is None else {"confidence_threshold": threshold}))
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, confirm_run_unsafe_code=unsafe
        )
        scores = {task: first_metric(results["results"][task]) for task in tasks}
        info = lm.get_model_info()["twotower_generation"]
        rows.append({
            "mode": mode, "threshold": threshold,
            "scores": {task: value for task, (_, value) in scores.items()},
            "metrics": {task: name for task, (name, _) in scores.items()},
            "mean_score": sum(value for _, value in scores.values()) / len(scores),
            "tokens_per_second": info["tokens_per_second"], "nfe": info["nfe"],
            "generated_tokens": info["generated_tokens"], "tokens_per_forward": info["tokens_per_forward"],
        })  # fmt: skip
    ar = next((row for row in rows if row["mode"] == "ar"), None)
    for row in rows:
        if ar is not None:
            row["score_vs_ar_percent"] = 100 * row["mean_score"] / ar["mean_score"] if ar["mean_score"] else None
            ar_speed, speed = ar["tokens_per_second"], row["tokens_per_second"]
            row["throughput_vs_ar"] = speed / ar_speed if ar_speed and speed else None
    return {"tasks": list(tasks), "limit": limit, "runs": rows}


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    head = ["mode", "threshold", *tasks, "mean", "% of AR", "tokens/s", "x AR", "NFE", "tokens/forward"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    number = lambda value, digits=3: "" if value is None else f"{value:.{digits}f}"  # noqa: E731
    for row in result["runs"]:
        cells = [row["mode"], number(row["threshold"], 2), *(number(row["scores"][t]) for t in tasks),
                 number(row["mean_score"]), number(row.get("score_vs_ar_percent"), 1),
                 number(row["tokens_per_second"], 1), number(row.get("throughput_vs_ar"), 2), str(row["nfe"]),
                 number(row["tokens_per_forward"], 2)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(5, 4))
    for row in result["runs"]:
        if row.get("score_vs_ar_percent") is None or row.get("throughput_vs_ar") is None:
            continue
        label = row["mode"] + ("" if row["threshold"] is None else f" {row['threshold']}")
        axis.scatter(row["score_vs_ar_percent"], row["throughput_vs_ar"])
        axis.annotate(label, (row["score_vs_ar_percent"], row["throughput_vs_ar"]))
    axis.set_xlabel("mean score, % of AR")
    axis.set_ylabel("generation throughput, x AR")
    axis.set_title(", ".join(result["tasks"]))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:

    parser = argparse.ArgumentParser(prog="twotower eval", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--modes", nargs="+", choices=GENERATION_MODES, default=["ar", "mask_diffusion"])
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[MODEL_GENERATION_DEFAULTS["confidence_threshold"]]
    )
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--include-path", help="a folder of task YAML files (lm-eval's --include_path)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--output", default="compare.json")
    parser.add_argument("--confirm-run-unsafe-code", action="store_true", help="let code tasks run generated code")
    args = parser.parse_args(argv)
    tokenizer, model = load(args.model, args.device, args.dtype)
    with torch.no_grad():
        result = compare(model, tokenizer, args.tasks, args.modes, args.thresholds, args.include_path, args.limit,
                         args.batch_size, args.confirm_run_unsafe_code)  # fmt: skip
    result.update(model=Path(args.model).name, device=args.device, dtype=str(model.dtype))  # no local paths
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(
        f"wrote {output}" + (f" and {output.with_suffix('.png')}" if plot(result, output.with_suffix(".png")) else "")
    )
    return 0


__all__ = ["compare", "markdown", "main"]
