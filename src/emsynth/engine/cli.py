"""The training options every stage's `train` command shares, for typer.

Usage in a stage CLI (the stage config embeds `engine: EngineConfig`)::

    from emsynth.engine.cli import TrainOptions, train_options
    from emsynth.engine.trainer import train

    @app.command("train")
    @train_options(default_config="configs/segment/cpu.yaml", default_run_dir="runs/segment")
    def train_cmd(opts: TrainOptions, data: Path = typer.Option(..., help="Slice folder.")):
        \"\"\"Train the mitochondria U-Net.\"\"\"   # becomes the command's --help text
        cfg = opts.load(SegmentConfig)          # YAML, then --set, then the flags below
        train(SegmentTask(cfg, data), cfg.engine, opts.run_dir, resume=opts.resume)

The decorator adds these options to the command (keeping the command's own parameters) and
hands the parsed values to the parameter annotated `TrainOptions`:

  --config/-c PATH       YAML config (default: `default_config`)
  --set/-s KEY=VALUE     override any config key, repeatable (`--set model.channels=[8,16]`)
  --run-dir/-o PATH      output folder for checkpoints, logs, run.json (default: `default_run_dir`)
  --resume/--no-resume   continue from the run folder's latest checkpoint (default) or start over
  --steps N, --max-time DURATION ("90s", "20m", "1h"), --seed N, --deterministic,
  --device auto|cpu|cuda, --precision auto|bf16|fp32: shortcuts for `--set engine.<key>=...`

Precedence: config file < --set < the shortcut flags.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from emsynth.config import StrictModel, load_config

C = TypeVar("C", bound=StrictModel)


@dataclass
class TrainOptions:
    """Parsed shared training options (see the module docstring)."""

    run_dir: Path
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    resume: bool = True
    steps: int | None = None
    max_time: str | None = None
    seed: int | None = None
    deterministic: bool | None = None
    device: str | None = None
    precision: str | None = None

    def engine_overrides(self, engine_field: str = "engine") -> list[str]:
        """The shortcut flags as `engine.<key>=value` overrides (only those given)."""
        given = {
            "steps": self.steps, "max_time": self.max_time, "seed": self.seed,
            "deterministic": self.deterministic, "device": self.device,
            "precision": self.precision,
        }
        return [f"{engine_field}.{key}={_yaml_scalar(value)}"
                for key, value in given.items() if value is not None]

    def load(self, cls: type[C], engine_field: str = "engine") -> C:
        """The stage config: YAML file, then --set overrides, then the shortcut flags."""
        return load_config(cls, self.config,
                           [*self.overrides, *self.engine_overrides(engine_field)])


def stop_line(result: dict[str, Any]) -> str:
    """How a training command reports the end of `train`: why it stopped, where, how long."""
    return (f"stopped: {result['stop_reason']} at step {result['step']} "
            f"({result['elapsed_s']:.0f} s)")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _option_parameters(default_config: str | None, default_run_dir: str | None) -> list:
    keyword = inspect.Parameter.KEYWORD_ONLY
    run_dir_default: Any = Path(default_run_dir) if default_run_dir else ...

    def option(name: str, annotation: Any, default: Any, *decls: str, **info: Any):
        return inspect.Parameter(
            name, keyword, default=default,
            annotation=Annotated[annotation, typer.Option(*decls, **info)],
        )

    return [
        option("config", Path | None, Path(default_config) if default_config else None,
               "--config", "-c", help="YAML config file.", dir_okay=False),
        option("set_", list[str] | None, None, "--set", "-s", metavar="KEY=VALUE",
               help="Override a config key (repeatable), e.g. --set engine.seed=3."),
        option("run_dir", Path, run_dir_default, "--run-dir", "-o", file_okay=False,
               help="Run folder: checkpoints, metrics.csv, TensorBoard logs, run.json."),
        option("resume", bool, True, "--resume/--no-resume",
               help="Continue from the run folder's latest checkpoint, or start over."),
        option("steps", int | None, None, "--steps", min=0, help="Training steps."),
        option("max_time", str | None, None, "--max-time",
               help='Wall-clock budget: seconds or "90s", "20m", "1h".'),
        option("seed", int | None, None, "--seed", min=0, help="Random seed."),
        option("deterministic", bool | None, None, "--deterministic/--no-deterministic",
               help="Bitwise repeatable training (slower)."),
        option("device", str | None, None, "--device", help="auto, cpu or cuda."),
        option("precision", str | None, None, "--precision",
               help="auto (bf16 only where the hardware has it native), bf16 or fp32."),
    ]


def train_options(
    *, default_config: str | None = None, default_run_dir: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so it takes the shared training options (module docstring);
    the command's parameter annotated `TrainOptions` receives them."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = inspect.signature(command).parameters
        target = [name for name in own if hints.get(name) is TrainOptions]
        if len(target) != 1:
            raise TypeError(f"{command.__name__} needs exactly one parameter of type TrainOptions")
        kept = [p.replace(annotation=hints.get(p.name, p.annotation))
                for name, p in own.items() if name != target[0]]
        added = _option_parameters(default_config, default_run_dir)
        clash = {p.name for p in kept} & {p.name for p in added}
        if clash:
            raise TypeError(f"{command.__name__}: parameters {sorted(clash)} clash with the "
                            "shared training options")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            opts = TrainOptions(
                run_dir=kwargs.pop("run_dir"), config=kwargs.pop("config"),
                overrides=list(kwargs.pop("set_") or []), resume=kwargs.pop("resume"),
                steps=kwargs.pop("steps"), max_time=kwargs.pop("max_time"),
                seed=kwargs.pop("seed"), deterministic=kwargs.pop("deterministic"),
                device=kwargs.pop("device"), precision=kwargs.pop("precision"),
            )
            return command(**kwargs, **{target[0]: opts})

        del wrapper.__wrapped__  # typer must see the new signature, not the command's
        parameters = [*kept, *added]
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
