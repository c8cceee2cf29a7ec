"""The command line: build settings, call the core, map DigitwatchError to an exit code."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from digitwatch import settings as settings_mod
from digitwatch.errors import DigitwatchError, ExitCode, MissingExtra, OutputError

app = typer.Typer(
    name="digitwatch",
    help="A folder that reads handwritten digits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="TOML file with settings (CLI > DIGITWATCH_* env > file).", dir_okay=False
    ),
]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="Weights file (.safetensors with its .json metadata beside it).")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="MNIST folder in torchvision's layout "),
]
DownloadOpt = Annotated[
    bool | None,
    typer.Option("--download/--no-download", help="Download MNIST when it is absent."),
]


def _fail(err: DigitwatchError) -> typer.Exit:
    typer.echo(f"digitwatch: error: {err}", err=True)
    return typer.Exit(int(err.exit_code))


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body; expected failures become one line and their exit code."""
    try:
        return fn()
    except DigitwatchError as e:
        raise _fail(e) from None


def _settings(config: Path | None, **cli: Any) -> settings_mod.Settings:
    return settings_mod.load(cli, config_file=config)


def _require_train_extra(command: str) -> None:
    """`train` and `evaluate` need torch; the service and `predict` never import it."""
    missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"{command} needs {' and '.join(missing)}: pip install 'digitwatch[train]'"
        )


@app.command()
def train(
    out: Annotated[
        Path | None, typer.Option(help="Where to write the weights (.safetensors) and .json.")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="TOML recipe (train/recipe.toml); options override it.")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(help="mlp or cnn (train/recipe-cnn.toml is the CNN's recipe)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training split.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (one-cycle).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for weights, split and order.")] = None,
    val_size: Annotated[
        int | None, typer.Option(help="Training images held out for validation.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Train on only the first N images (quick checks).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all cores).")] = None,
    extra_labels: Annotated[
        Path | None,
        typer.Option(help="A review queue's labels.csv: its corrected images join the training."),
    ] = None,
    weights: WeightsOpt = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train the MLP (or the CNN) on MNIST and write weights with their metadata."""
    _guard(lambda: _require_train_extra("train"))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from digitwatch.training import EpochReport, load_recipe, train_and_save

    def body() -> None:
        s = _settings(config, data_dir=data_dir, download=download, weights=weights)
        extra = None
        if extra_labels is not None:
            from digitwatch import corrections
            from digitwatch.classify import load_weights

            extra = corrections.load(extra_labels, s.weights)
            left = ", ".join(f"{n} {why}" for why, n in extra.left_out.items()) or "none"
            typer.echo(
                f"{len(extra.labels)} corrected images from {extra_labels} (left out: {left})"
            )
            before = load_weights(s.weights).meta.get("mnist_test_accuracy")
        overrides = {
            "arch": arch,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "val_size": val_size,
            "train_limit": limit,
            "threads": threads,
        }
        cfg = load_recipe(recipe, {k: v for k, v in overrides.items() if v is not None})
        target = out or s.weights
        with Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]}"),
            TimeElapsedColumn(),
            transient=False,
        ) as progress:
            task: list[Any] = []

            def on_batch(step: int, steps: int, loss: float) -> None:
                if not task or progress.tasks[task[-1]].finished:
                    task.append(
                        progress.add_task(
                            "",
                            total=steps,
                            epoch=len(task) + 1,
                            epochs=cfg.epochs,
                            loss=loss,
                            val="…",
                        )
                    )
                progress.update(task[-1], completed=step, loss=loss)

            def on_epoch(r: EpochReport) -> None:
                progress.update(task[-1], loss=r.train_loss, val=f"{r.val_accuracy:.4f}")

            result, meta = train_and_save(
                cfg,
                s.data_dir,
                target,
                download=s.download,
                on_batch=on_batch,
                on_epoch=on_epoch,
                extra=extra,
            )
        typer.echo(
            f"test accuracy {meta['mnist_test_accuracy']:.4f} after {result.seconds:.0f} s; "
            f"wrote {target} and {target.with_suffix('.json').name}"
        )
        if extra is not None:
            shown = "unknown" if before is None else f"{before:.4f}"
            typer.echo(
                f"MNIST test accuracy: {shown} with {s.weights.name} before, "
                f"{meta['mnist_test_accuracy']:.4f} now"
            )

    _guard(body)


@app.command()
def evaluate(
    weights: WeightsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    sheet: Annotated[
        Path | None, typer.Option(help="Write a PNG contact sheet of the misclassified digits.")
    ] = None,
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline/--no-pipeline",
            help="Also score the test digits as PNG files through decode+preprocess.",
        ),
    ] = False,
    uncertain_below: Annotated[
        float | None, typer.Option(help="Confidence under this counts as flagged uncertain.")
    ] = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Score weights on the 10,000 MNIST test images."""
    _guard(lambda: _require_train_extra("evaluate"))
    from digitwatch.evaluate import evaluate as run_evaluation

    def body() -> None:
        s = _settings(
            config,
            weights=weights,
            data_dir=data_dir,
            download=download,
            uncertain_below=uncertain_below,
        )
        ev = run_evaluation(
            s.weights,
            s.data_dir,
            download=s.download,
            through_pipeline=pipeline,
            sheet_path=sheet,
            uncertain_below=s.uncertain_below,
        )
        if as_json:
            typer.echo(json.dumps(ev.to_dict()))
            return
        typer.echo(f"weights   {ev.weights}\nmodel     {ev.model}")
        typer.echo(f"accuracy  {ev.accuracy:.4f}  ({ev.errors} of 10000 wrong)")
        flags = "uncertain (confidence < {:g}): {:.1%} of wrong answers, {:.2%} of right ones"
        typer.echo(
            "          " + flags.format(ev.uncertain_below, ev.wrong_flagged, ev.right_flagged)
        )
        if ev.pipeline_accuracy is not None:
            typer.echo(f"pipeline  {ev.pipeline_accuracy:.4f}  (test digits as PNG files)")
            typer.echo(
                "          "
                + flags.format(
                    ev.uncertain_below, ev.pipeline_wrong_flagged, ev.pipeline_right_flagged
                )
            )
        typer.echo("\nper class  " + "  ".join(f"{c}:{a:.3f}" for c, a in enumerate(ev.per_class)))
        typer.echo("\nconfusion (rows: true, columns: predicted)")
        typer.echo("      " + "".join(f"{c:>6}" for c in range(10)))
        for c, row in enumerate(ev.confusion):
            typer.echo(f"{c:>6}" + "".join(f"{n:>6}" for n in row))
        if ev.sheet:
            typer.echo(f"\nmisclassified digits: {ev.sheet}")

    _guard(body)


Format = Literal["table", "json", "jsonl", "csv"]


def _write_stdout(text: str) -> None:
    """Write and flush, or raise OutputError: a closed pipe, `>&-` or /dev/full."""
    if sys.stdout is None:  # started with descriptor 1 closed
        raise OutputError("cannot write the results: standard output is closed")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        # Python flushes stdout again at exit and would print a traceback for the same
        # error: point descriptor 1 at /dev/null so that last flush succeeds, discarded.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        raise OutputError(f"cannot write the results: {e.strerror or e}") from None


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and folders of images.")],
    output_format: Annotated[
        str, typer.Option("--format", help="table, json, jsonl or csv.")
    ] = "table",
    debug_dir: Annotated[
        Path | None, typer.Option(help="Write the 28x28 image the model saw for each input.")
    ] = None,
    recursive: Annotated[bool | None, typer.Option(help="Descend into subfolders.")] = None,
    weights: WeightsOpt = None,
    uncertain_below: Annotated[
        float | None, typer.Option(help="Confidence under this sets uncertain: true.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Classify image files now and print one record per input."""
    from digitwatch.predict import predict_paths, render

    if output_format not in ("table", "json", "jsonl", "csv"):
        typer.echo("digitwatch: error: --format must be table, json, jsonl or csv", err=True)
        raise typer.Exit(int(ExitCode.USAGE))

    def body() -> int:
        s = _settings(config, weights=weights, uncertain_below=uncertain_below, recursive=recursive)
        results = predict_paths(paths, s, debug_dir=debug_dir)
        _write_stdout(render(results, output_format))
        failed = any(r.record.status == "error" for r in results)
        return int(ExitCode.INPUT_FAILED if failed else ExitCode.OK)

    code = _guard(body)
    raise typer.Exit(code)


@app.command()
def run(
    inbox: Annotated[Path | None, typer.Option(help="Folder to watch.")] = None,
    outbox: Annotated[
        Path | None, typer.Option(help="Folder for results (not inside inbox).")
    ] = None,
    weights: WeightsOpt = None,
    poll: Annotated[
        float | None, typer.Option(help="Poll every SECONDS instead of inotify (NFS/SMB).")
    ] = None,
    recursive: Annotated[
        bool | None, typer.Option("--recursive/--no-recursive", help="Watch subfolders too.")
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(help="Also never take names matching this glob (repeatable).", metavar="GLOB"),
    ] = None,
    quiet_period: Annotated[
        float | None,
        typer.Option(help="Seconds size and mtime must hold still when a close is not seen."),
    ] = None,
    rescan_interval: Annotated[
        float | None, typer.Option(help="Seconds between full rescans of the inbox.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Most files per batch.")] = None,
    max_delay_ms: Annotated[
        float | None, typer.Option(help="Longest wait to fill a batch, in ms.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decode/preprocess worker processes (1: inline).")
    ] = None,
    fsync: Annotated[
        bool | None, typer.Option("--fsync/--no-fsync", help="One sync per batch before archiving.")
    ] = None,
    on_success: Annotated[
        str | None, typer.Option(help="keep (move to processed) or delete the input.")
    ] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Largest image, in pixels.")] = None,
    max_file_mb: Annotated[float | None, typer.Option(help="Largest file, in MB.")] = None,
    max_decode_mb: Annotated[
        float | None, typer.Option(help="Memory all decodes in flight may take at once, in MB.")
    ] = None,
    stop_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds SIGTERM waits for batches in the workers before leaving them."),
    ] = None,
    uncertain_below: Annotated[
        float | None, typer.Option(help="Confidence under this sets uncertain: true.")
    ] = None,
    review: Annotated[
        bool | None,
        typer.Option("--review/--no-review", help="Queue uncertain and no-digit answers."),
    ] = None,
    review_dir: Annotated[
        str | None, typer.Option(help="The review queue's folder (default: <outbox>/review).")
    ] = None,
    metrics_file: Annotated[
        str | None,
        typer.Option(help="Write Prometheus metrics to this file every 5 s (textfile collector)."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics at http://:PORT/metrics.")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="auto, console or json.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Validate folders, weights and settings, then exit.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Watch the inbox and answer every image exactly once (the service)."""
    from digitwatch.logs import configure
    from digitwatch.service import serve

    def body() -> int:
        s = _settings(
            config,
            inbox=inbox,
            outbox=outbox,
            weights=weights,
            poll=poll,
            recursive=recursive,
            ignore=tuple(ignore) if ignore else None,
            quiet_period=quiet_period,
            rescan_interval=rescan_interval,
            batch_size=batch_size,
            max_delay_ms=max_delay_ms,
            workers=workers,
            fsync=fsync,
            on_success=on_success,
            max_pixels=max_pixels,
            max_file_mb=max_file_mb,
            max_decode_mb=max_decode_mb,
            stop_timeout=stop_timeout,
            uncertain_below=uncertain_below,
            review=review,
            review_dir=review_dir,
            metrics_file=metrics_file,
            metrics_port=metrics_port,
            log_format=log_format,
            log_level=log_level,
        )
        configure(s.log_format, s.log_level)
        return serve(s, check_only=check)

    raise typer.Exit(_guard(body))


@app.command()
def status(
    inbox: Annotated[Path | None, typer.Option(help="The service's inbox.")] = None,
    outbox: Annotated[Path | None, typer.Option(help="The service's outbox.")] = None,
    recursive: Annotated[
        bool | None, typer.Option("--recursive/--no-recursive", help="Count subfolders too.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show what the service is doing, read from its folders (works while it runs)."""
    from digitwatch.status import collect, render
    from digitwatch.watch import Ignore

    def body() -> None:
        s = _settings(config, inbox=inbox, outbox=outbox, recursive=recursive)
        st = collect(
            s.inbox.resolve(), s.outbox.resolve(), recursive=s.recursive, ignore=Ignore(s.ignore)
        )
        typer.echo(json.dumps(st.to_dict()) if as_json else render(st), nl=as_json)

    _guard(body)


review_app = typer.Typer(
    help="The review queue: answers the service doubts, for a person to decide.",
    no_args_is_help=False,
)
app.add_typer(review_app, name="review")

ReviewOutboxOpt = Annotated[Path | None, typer.Option("--outbox", help="The service's outbox.")]
ReviewDirOpt = Annotated[
    Path | None, typer.Option(help="The queue's folder (default: <outbox>/review).")
]
ItemArg = Annotated[str, typer.Argument(help="The item's ID, as `digitwatch review` lists it.")]


def _review_dir(config: Path | None, outbox: Path | None, review_dir: Path | None) -> Path:
    s = _settings(config, outbox=outbox, review_dir=None if review_dir is None else str(review_dir))
    return s.review_path


@review_app.callback(invoke_without_command=True)
def review(
    ctx: typer.Context,
    outbox: ReviewOutboxOpt = None,
    review_dir: ReviewDirOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per line.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """List the review queue, newest first; `accept`, `correct` or `reject` an item."""
    if ctx.invoked_subcommand is not None:
        return
    from digitwatch import review as queue

    def body() -> None:
        found = queue.items(_review_dir(config, outbox, review_dir))
        if as_json:
            for item in found:
                typer.echo(json.dumps({"id": item.id, **item.record}))
            return
        if not found:
            typer.echo("the review queue is empty")
            return
        typer.echo(f"{'id':<14} {'status':<9} {'digit':>5} {'confidence':>10}  input")
        for item in found:
            r = item.record
            digit = "-" if r.get("digit") is None else str(r["digit"])
            conf = "-" if r.get("confidence") is None else f"{r['confidence']:.3f}"
            typer.echo(f"{item.id:<14} {r['status']:<9} {digit:>5} {conf:>10}  {r['input']}")

    _guard(body)


def _decide(
    config: Path | None,
    outbox: Path | None,
    review_dir: Path | None,
    item_id: str,
    digit: int | None,
    *,
    accept: bool = False,
) -> None:
    from digitwatch import review as queue

    def body() -> None:
        folder = _review_dir(config, outbox, review_dir)
        item, human = queue.decide(folder, item_id, digit, accept=accept)
        shown = "not a digit" if human is None else str(human)
        typer.echo(f"{item_id}: {item.record['input']} recorded as {shown}")

    _guard(body)


@review_app.command("accept")
def review_accept(
    item_id: ItemArg,
    outbox: ReviewOutboxOpt = None,
    review_dir: ReviewDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The model's digit is right."""
    _decide(config, outbox, review_dir, item_id, None, accept=True)


@review_app.command("correct")
def review_correct(
    item_id: ItemArg,
    digit: Annotated[int, typer.Option(min=0, max=9, help="The digit it really is.")],
    outbox: ReviewOutboxOpt = None,
    review_dir: ReviewDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The image shows DIGIT."""
    _decide(config, outbox, review_dir, item_id, digit)


@review_app.command("reject")
def review_reject(
    item_id: ItemArg,
    outbox: ReviewOutboxOpt = None,
    review_dir: ReviewDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The image shows no digit."""
    _decide(config, outbox, review_dir, item_id, None)


@app.command()
def retry(
    patterns: Annotated[
        list[str] | None,
        typer.Argument(help="Only inputs whose name matches one of these globs (default: all)."),
    ] = None,
    inbox: Annotated[Path | None, typer.Option(help="The service's inbox.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Move inputs that got an error record from .digitwatch/failed/ back into the inbox."""
    from digitwatch.retry import retry_failed

    def body() -> None:
        s = _settings(config, inbox=inbox)
        done = retry_failed(s.inbox.resolve(), patterns or [])
        for name in done.moved:
            typer.echo(f"retried {name}")
        for name in done.taken:
            typer.echo(f"left {name} in failed/: the inbox already has that name", err=True)
        typer.echo(f"{len(done.moved)} moved back to the inbox, {len(done.taken)} left")

    _guard(body)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (loopback).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (0: any free one, logged).")] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Secret the review page sends to record decisions (else they are off); "
            "prefer DIGITWATCH_TOKEN, as other users can read a command line."
        ),
    ] = None,
    inbox: Annotated[Path | None, typer.Option(help="The service's inbox (for status).")] = None,
    outbox: Annotated[Path | None, typer.Option(help="The service's outbox.")] = None,
    review_dir: Annotated[
        str | None, typer.Option(help="The review queue's folder (default: <outbox>/review).")
    ] = None,
    weights: WeightsOpt = None,
    uncertain_below: Annotated[
        float | None, typer.Option(help="Confidence under this sets uncertain: true.")
    ] = None,
    max_file_mb: Annotated[float | None, typer.Option(help="Largest request body, in MB.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Largest image, in pixels.")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto, console or json.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the web page, the HTTP API and the review screen."""
    from digitwatch.logs import configure
    from digitwatch.web import serve as run_server

    def body() -> int:
        s = _settings(
            config,
            host=host,
            port=port,
            token=token,
            inbox=inbox,
            outbox=outbox,
            review_dir=review_dir,
            weights=weights,
            uncertain_below=uncertain_below,
            max_file_mb=max_file_mb,
            max_pixels=max_pixels,
            log_format=log_format,
            log_level=log_level,
        )
        configure(s.log_format, s.log_level)
        return run_server(s)

    raise typer.Exit(_guard(body))


def main() -> None:
    app()
