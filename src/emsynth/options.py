"""Command-line options that several stages share, defined once (typer `Annotated` types).

Values are checked where they are used (`engine.device.resolve_device` / `choose_precision`,
`data.readers.read_volume`), so every command gives the same one-line error for a bad value.
"""

from __future__ import annotations

from typing import Annotated

import typer

LayoutOpt = Annotated[
    str,
    typer.Option("--layout", help="Dataset layout: auto (detect), vnc, epfl-tiff, slices, isbi, "
                 "generic or ome-zarr."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (cuda when PyTorch sees a GPU, else cpu), cpu or "
                      "cuda."),
]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", help="auto (bf16 only where the hardware computes it natively: "
                 "bf16 GPUs, CPUs with AVX512-BF16/AMX; else fp32), bf16 or fp32. "
                 "`emsynth doctor` shows what auto picks here."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="torch CPU threads (default: every core this process "
                 "may use)."),
]


def parse_zyx(text: str, option: str, example: str) -> tuple[int, int, int]:
    """"z,y,x" of an option such as --block or --chunks: three positive integers, else a
    one-line error naming the option and an example."""
    from emsynth.errors import input_error

    try:
        sizes = tuple(int(token) for token in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise input_error(option, f"{text!r} is not three positive integers z,y,x",
                          f"e.g. {option} {example}")
    return sizes  # type: ignore[return-value]
