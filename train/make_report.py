"""Write train/REPORT.md and train/errors.png from the shipped weights and MNIST.

    .venv/bin/python train/make_report.py --data-dir ../shared/data/mnist [--seeds 1 2]
    .venv/bin/python train/make_report.py --data-dir ../shared/data/mnist --arch cnn

`--arch cnn` writes train/REPORT-cnn.md from weights/mnist-cnn.* and train/recipe-cnn.toml
(no contact sheet).

Every figure in the report comes from the weights' metadata (written by `digitwatch
train`) or from `digitwatch.evaluate`, run here. `--seeds` also reruns the recipe with
other seeds and reports the spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

from digitwatch.classify import metadata_path
from digitwatch.evaluate import evaluate
from digitwatch.settings import Settings
from digitwatch.training import load_recipe, train_and_save

HERE = Path(__file__).resolve().parent
MODELS = {  # weights, recipe, report, contact sheet of the errors
    "mlp": ("mnist-mlp.safetensors", "recipe.toml", "REPORT.md", "errors.png"),
    "cnn": ("mnist-cnn.safetensors", "recipe-cnn.toml", "REPORT-cnn.md", None),
}


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _network(arch: dict[str, object]) -> str:
    if arch["name"] == "cnn":
        return (
            f"A CNN: conv blocks of {arch['channels']} channels (3x3 conv, "
            f"ReLU, 2x2 max-pool rounding up), one hidden layer of {arch['hidden']} "
            f"({arch['dropout']} dropout after it)"
        )
    return f"784-128-64-10 ReLU MLP ({arch['dropout']} dropout after the first layer)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="*", default=[])
    ap.add_argument("--arch", choices=sorted(MODELS), default="mlp")
    args = ap.parse_args()
    weights_name, recipe_name, report_name, sheet_name = MODELS[args.arch]
    WEIGHTS = HERE.parent / "weights" / weights_name

    meta = json.loads(metadata_path(WEIGHTS).read_text())
    uncertain_below = Settings().uncertain_below
    ev = evaluate(
        WEIGHTS,
        args.data_dir,
        download=False,
        through_pipeline=True,
        sheet_path=HERE / sheet_name if sheet_name else None,
        uncertain_below=uncertain_below,
    )
    reruns = []
    for seed in args.seeds:
        cfg = load_recipe(HERE / recipe_name, {"seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            result, m = train_and_save(
                cfg, args.data_dir, Path(tmp) / "w.safetensors", download=False
            )
        reruns.append((seed, m["mnist_test_accuracy"], result.seconds))

    t = meta["training"]
    members = int(meta["architecture"].get("members", 1))
    temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    ensemble = (
        f"An ensemble of {members} such networks, seeds {t['seed']} to {t['seed'] + members - 1} "
        "(one validation split for all); the answer is the mean of their softmax over "
        f"logits divided by a temperature of {temperature:g}, fit on the validation split "
        "by negative log-likelihood."
        if members > 1
        else f"Logits are divided by a temperature of {temperature:g} fit on the validation split."
    )
    lines = [
        f"# Training report: weights/{weights_name}",
        "",
        "Made by `python train/make_report.py --data-dir ../shared/data/mnist"
        + (f" --arch {args.arch}" if args.arch != "mlp" else "")
        + (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds else "")
        + "` from the shipped weights' metadata and a fresh evaluation.",
        "",
        "## Recipe",
        "",
        "```sh",
        f"digitwatch train --recipe train/{recipe_name} --data-dir ../shared/data/mnist \\",
        f"    --out weights/{weights_name}",
        "```",
        "",
        f"{_network(meta['architecture'])}, Adam with a one-cycle schedule peaking at "
        f"{t['lr']}, CrossEntropyLoss, "
        f"batch {t['batch_size']}, {t['epochs']} epochs, seed {t['seed']}. Batched random "
        f"affine augmentation on the tensors: rotation ±{t['rotate_deg']}°, scale "
        f"±{t['scale']:.0%}, shear ±{t['shear']}, shift ±{t['shift']:.0%}, and a smooth "
        f"elastic displacement of strength {t.get('elastic_alpha', 0)}. Every image is first "
        "deskewed by `digitwatch.preprocess.deskew`, the pipeline's last step. "
        f"Each epoch {t.get('continental_1', 0):.0%} of the training 1s get a continental "
        "flag (30% of those a foot too) and "
        f"{t.get('crossed_7', 0):.0%} of the 7s a crossbar, drawn with the digit's own pen "
        "width and deskewed after (`digitwatch.training.continental_ones`). "
        f"{ensemble} "
        f"{t['val_size']} training images are held out for validation; the test set chooses "
        "nothing, and the score below is the final epoch's model.",
        "",
        "## Result",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| MNIST test accuracy (10,000 images) | **{ev.accuracy:.2%}** ({ev.errors} wrong) |",
        f"| the same digits as PNG files through decode + preprocess | "
        f"{ev.pipeline_accuracy:.2%} |",
        f"| flagged `uncertain` at the default `--uncertain-below {uncertain_below:g}`, "
        f"MNIST test | {ev.wrong_flagged:.1%} of the wrong answers, {ev.right_flagged:.2%} "
        "of the right ones |",
        f"| the same through the pipeline | {ev.pipeline_wrong_flagged or 0:.1%} of the wrong "
        f"answers, {ev.pipeline_right_flagged or 0:.2%} of the right ones |",
        f"| final validation accuracy | {t['final_val_accuracy']:.2%} |",
        f"| training time | {t['seconds']:.0f} s with {t['torch_threads']} torch threads "
        "on a machine shared with other jobs (a rerun with the same thread count "
        "reproduces these weights bit for bit) |",
        f"| machine | {_cpu()}, torch {meta['torch_version']} |",
        f"| weights sha256 | `{meta['sha256'][:16]}…` |",
        "",
        "Per-class accuracy:",
        "",
        "| " + " | ".join(str(c) for c in range(10)) + " |",
        "|" + " --- |" * 10,
        "| " + " | ".join(f"{a:.2%}" for a in ev.per_class) + " |",
        "",
    ]
    if reruns:
        lines += [
            "Reruns of the same recipe with other seeds (the spread is the honest "
            "reproducibility figure; the same seed and thread count reproduce the weights "
            "bit for bit):",
            "",
            "| seed | test accuracy | seconds |",
            "| --- | --- | --- |",
            f"| {t['seed']} (shipped) | {meta['mnist_test_accuracy']:.2%} | {t['seconds']:.0f} |",
        ]
        lines += [f"| {s} | {a:.2%} | {sec:.0f} |" for s, a, sec in reruns]
        lines.append("")
    lines += [
        "How the recipe was chosen, and the seed spread: [EXPERIMENTS.md](EXPERIMENTS.md). "
        "How `--uncertain-below` was chosen: [docs/calibration.md](../docs/calibration.md).",
        "",
    ]
    if sheet_name:
        lines += [
            "## Misclassified test digits",
            "",
            f"Each labelled `true->predicted` ([{sheet_name}]({sheet_name})):",
            "",
            f"![misclassified digits]({sheet_name})",
            "",
        ]
    (HERE / report_name).write_text("\n".join(lines))
    print(json.dumps(dataclasses.asdict(ev) | {"reruns": reruns}, indent=1)[:2000])


if __name__ == "__main__":
    main()
