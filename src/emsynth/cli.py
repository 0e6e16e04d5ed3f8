"""The `emsynth` command line: one sub-command group per pipeline stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from emsynth import __version__
from emsynth.data.cli import app as data_app
from emsynth.errors import EmsynthError
from emsynth.export.cli import app as export_app
from emsynth.gan.cli import app as gan_app
from emsynth.membranes.cli import app as membranes_app
from emsynth.options import DeviceOpt
from emsynth.report.cli import app as study_app
from emsynth.segment.cli import app as segment_app

app = typer.Typer(
    help="emsynth: EM image synthesis from masks and its segmentation study.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")
app.add_typer(gan_app, name="gan")
app.add_typer(membranes_app, name="membranes")
app.add_typer(segment_app, name="segment")
app.add_typer(study_app, name="study")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"emsynth {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """emsynth: EM image synthesis from masks and its segmentation study."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's outputs.")] = Path(
        "outputs/demo"
    ),
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for data, initialisation and augmentation.")
    ] = 0,
) -> None:
    """Run the pipeline on built-in phantom EM data (no downloads, CPU, a few minutes)."""
    from emsynth.demo import run_demo

    run_demo(out, seed=seed)


@app.command()
def doctor(
    device: DeviceOpt = "auto",
    benchmark: Annotated[
        bool, typer.Option("--benchmark/--no-benchmark",
                           help="Time one U-Net training step in fp32 and bf16 (a few seconds).")
    ] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Also write the report here.")
    ] = None,
) -> None:
    """Show versions, device, CPU kind, threads, the precision `auto` picks and why, and the
    measured fp32/bf16 speed ratio on this machine."""
    import json

    from emsynth.engine.doctor import doctor_report
    from emsynth.io import atomic_write_text

    report = doctor_report(device, benchmark=benchmark)
    console = Console()
    versions = report["versions"]
    lines = [
        ("emsynth", versions.get("emsynth")),
        ("torch / MONAI", f"{versions.get('torch')} / {versions.get('monai')}"),
        ("python", f"{versions.get('python')} on {report['platform']}"),
        ("device", report["device"] + (f" ({report['gpu']})" if report["gpu"] else "")),
        ("CPU", report["cpu"]),
        ("CPU capability", (f"{report['cpu_capability']}, "
         f"{'native' if report['cpu_bf16_native'] else 'no native'} bf16 (oneDNN)")),
        ("threads", (f"{report['threads']} (cores this process may use: "
         f"{report['usable_cores']})")),
        ("precision auto", f"{report['auto_precision']}: {report['auto_reason']}"),
    ]
    if benchmark:
        lines.append(("U-Net step", (f"fp32 {report['unet_fp32_img_s']:.1f} img/s, bf16 "
                      f"{report['unet_bf16_img_s']:.1f} img/s: bf16 is "
                      f"{report['bf16_speedup']:.2f}x fp32 (batch 1 of 128 px, U-Net 16-128)")))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        console.print(f"{name:<{width}}  {value}", highlight=False, soft_wrap=True)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report, indent=2) + "\n")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except EmsynthError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
