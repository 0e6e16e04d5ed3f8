"""`emsynth data ...`: inspect, show, generate and fetch EM datasets."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect, show, generate (phantom) and fetch EM datasets.", no_args_is_help=True)
