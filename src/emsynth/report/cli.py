"""`emsynth study ...`: run the augmentation study and write its report (the study's CLI lives
with the report, the layer above the study, because `study run` ends by writing the report).

Heavy imports (torch, MONAI, matplotlib) happen inside the commands so `emsynth --help` stays
fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="The augmentation study: do GAN images improve U-Net mitochondria segmentation?",
    no_args_is_help=True,
)


def _wide_unless_terminal(console: Console) -> Console:
    """A log file gets a wide console, so that a table's rows stay on one line each."""
    return console if console.is_terminal else Console(width=200)


def _print_report(study_dir: Path, console: Console) -> None:
    from emsynth.report import build_report, headline

    results, html_path, md_path = build_report(study_dir)
    console = _wide_unless_terminal(console)
    console.print(headline(results))
    from emsynth.report.answer import answer

    for line in answer(results):
        console.print(f"- {line}", highlight=False)
    if results.missing:
        console.print(f"[yellow]{results.missing} cells not done yet: the tables hold what "
                      "is finished[/]")
    console.print(f"report: {html_path}  (and {md_path.name}, figures/)", highlight=False)


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="Study YAML, e.g. configs/study/demo.yaml.")],
    study_dir: Annotated[
        Path | None,
        typer.Option("--study-dir", "-o",
                     help="Study folder (cells, study.json, report); default runs/study/<config "
                     "name>."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a config key, repeatable: seeds=[0,1]."),
    ] = None,
    test_data: Annotated[
        Path | None,
        typer.Option("--test-data", help="Score on this volume (any reader layout) instead of "
                     "the data's test block."),
    ] = None,
    test_layout: Annotated[
        str, typer.Option("--test-layout", help="Layout of --test-data (auto, slices, vnc, ...).")
    ] = "auto",
    test_mask_dir: Annotated[
        str | None,
        typer.Option("--test-mask-dir", help="Mask folder of --test-data, e.g. masks_epfl."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume/--no-resume",
                     help="Skip finished cells and continue interrupted ones (default), or "
                     "redo every cell of this config."),
    ] = True,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write the report at the end.")
    ] = True,
    workers: Annotated[
        int,
        typer.Option("--workers", "-j", min=1,
                     help="Processes that share the cells (each with cores/N torch threads "
                     "unless num_threads is set); helpers log to STUDY_DIR/logs/."),
    ] = 1,
    kinds: Annotated[
        str | None,
        typer.Option("--kinds", help="Run only these kinds of cell, comma-separated: "
                     "membrane-model, gan-model, gan, segment, eval (e.g. the GANs first, on a "
                     "GPU machine; the rest later). Cells wait for inputs of other kinds."),
    ] = None,
    reuse: Annotated[
        list[Path] | None,
        typer.Option("--reuse", help="Another study folder, or an export of one (`emsynth "
                     "study export`): its finished cells with the same key (same settings and "
                     "inputs) are copied instead of run; an exported cell whose models a cell "
                     "still to run needs runs again. Repeatable."),
    ] = None,
    worker_of: Annotated[int, typer.Option("--worker-of", hidden=True)] = 1,
) -> None:
    """Run every cell of the study that is not finished yet, then write the report.

    Cells (GAN + synthesis per regime and seed, or one GAN per regime shared by its seeds with
    share_gan; a segmenter and a test evaluation per condition) are cached under the study folder by the hash of their config and inputs:
    rerunning the same command skips finished cells, and after a crash or Ctrl-C continues
    the interrupted one from its last checkpoint. With --workers N, N processes take cells in
    parallel (a cell runs in one process; cells wait for their inputs); two studies or two
    commands may also share one folder.
    """
    from emsynth.config import load_config
    from emsynth.study.config import StudyConfig
    from emsynth.study.runner import run_study, wide_console

    console = wide_console()
    extra = list(overrides or [])
    if test_data is not None:
        extra += [f"test.source={json.dumps(str(test_data))}",
                  f"test.layout={json.dumps(test_layout)}",
                  f"test.mask_dir={json.dumps(test_mask_dir)}", "test.phantom=null"]
    cfg = load_config(StudyConfig, config, extra)
    folder = study_dir or Path("runs") / "study" / config.stem
    only = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None
    if workers > 1:
        from emsynth.study.workers import run_with_workers

        run_with_workers(cfg, config, extra, folder, workers, resume, console, only, reuse)
    else:
        run_study(cfg, folder, resume=resume, console=console, workers=worker_of, kinds=only,
                  reuse=reuse)
    if report:
        _print_report(folder, Console())


@app.command("report")
def report_cmd(
    study_dir: Annotated[Path, typer.Argument(help="Folder of a study (its --study-dir).")],
) -> None:
    """Write the study's report (HTML and Markdown) and print the headline table.

    report.html (self-contained, figures embedded) and report.md land in the study folder with
    figures/*.png: a plain-language answer (where synthetic images help or hurt, with the recipe
    chosen on validation, and whether the targets are met), test IoU and Dice per regime and condition as mean ± 95% CI over seeds, the
    paired differences (real+synthetic − real, synthetic − real), plots, image grids and the
    provenance of every cell. Works on a study still running (it reports what is finished).
    """
    _print_report(study_dir, Console())


@app.command("export")
def export_cmd(
    study_dir: Annotated[Path, typer.Argument(help="Folder of a study (its --study-dir).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where the light copy goes; default "
                     "results/study/<study folder name>."),
    ] = None,
    previews: Annotated[
        bool,
        typer.Option("--previews/--no-previews",
                     help="Also copy the image previews the report draws (binary, a few MB)."),
    ] = False,
) -> None:
    """Write a light copy of a study (records and results; no models, images or, unless
    --previews, image previews), small enough to commit, so a study can span sessions whose
    run folders are gone.

    Continue it elsewhere with `emsynth study run CONFIG --reuse EXPORT`: exported cells count
    as finished; one whose models or images a cell still to run reads (a GAN whose regime is
    unfinished) runs again. `emsynth study report EXPORT` reports what it holds.
    """
    from emsynth.study.export import export_study

    target = out or Path("results") / "study" / study_dir.name
    summary = export_study(study_dir, target, previews=previews)
    Console().print(f"exported {summary.cells} of {summary.planned} cells "
                    f"({summary.bytes / 1e6:.1f} MB) to {target}", highlight=False)


@app.command("compare")
def compare_cmd(
    study_a: Annotated[Path, typer.Argument(help="Folder of the baseline study (or its export).")],
    study_b: Annotated[Path, typer.Argument(help="Folder of the study with the other recipe.")],
    metric: Annotated[str, typer.Option("--metric", help="iou or dice (test block).")] = "iou",
) -> None:
    """Compare two studies' recipes: B − A per regime and condition, paired over seeds.

    For two studies of the same data and split that differ in a recipe (e.g. the segmenters'
    noise, the synthetic images' pixel noise): each cell of B pairs with A's cell of the same
    regime, condition and seed, so the difference isolates the recipe. Mean ± 95% CI of each,
    the paired difference with its CI, p and Holm-adjusted p over the rows. Regimes whose
    seeds drew other data in the two studies are left out.
    """
    from rich.table import Table

    from emsynth.errors import EmsynthError
    from emsynth.report import load_results
    from emsynth.report.collect import METRICS
    from emsynth.report.compare import compare_studies
    from emsynth.report.stats import p_text

    if metric not in METRICS:
        raise EmsynthError(f"--metric {metric!r} is not a test metric. Fix: pass one of "
                           f"{', '.join(METRICS)}")
    a, b = load_results(study_a), load_results(study_b)
    rows, skipped = compare_studies(a, b, metric)
    table = Table(title=f"test {metric}: {study_b} − {study_a}, paired over seeds")
    for column in ("regime", "condition", "A", "B", "B − A [95% CI]", "p", "Holm p"):
        table.add_column(column)
    for row in rows:
        d = row.difference
        interval = "" if d.low is None else f" [{d.low:+.3f}, {d.high:+.3f}]"
        table.add_row(row.regime, row.condition, row.a.text(), row.b.text(),
                      f"{d.mean:+.3f}{interval}", p_text(d.p), p_text(row.p_holm))
    console = _wide_unless_terminal(Console())
    console.print(table)
    if not rows:
        console.print("no regime and condition scored in both studies", highlight=False)
    for regime in skipped:
        console.print(f"left out {regime}: its seeds drew other data in the two studies",
                      highlight=False)
