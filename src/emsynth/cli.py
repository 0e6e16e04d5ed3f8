"""The `emsynth` command line: one sub-command group per pipeline stage."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from emsynth import __version__
from emsynth.data.cli import app as data_app
from emsynth.errors import EmsynthError

app = typer.Typer(
    help="emsynth: EM image synthesis from masks and its segmentation study.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"emsynth {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """emsynth: EM image synthesis from masks and its segmentation study."""


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except EmsynthError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
