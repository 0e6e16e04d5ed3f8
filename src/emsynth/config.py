"""Typed configs: pydantic models loaded from YAML in `configs/`, overridable from the CLI.

Unknown keys are an error naming the key; overrides are `dotted.key=value` strings whose
values are parsed as YAML (so `train.lr=1e-3`, `model.channels=[16,32]` work).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from emsynth.errors import EmsynthError, input_error


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


C = TypeVar("C", bound=StrictModel)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Set `a.b.c=value` overrides into a nested dict (value parsed as YAML)."""
    for item in overrides or []:
        if "=" not in item:
            raise EmsynthError(f"override {item!r} is not key=value. Fix: write e.g. train.steps=100")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise EmsynthError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown config key {loc!r}. Fix: remove it or check its spelling"
    return f"{where}: config key {loc!r}: {first['msg']}. Fix: correct its value"


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load `cls` from a YAML file (or defaults when `path` is None), then apply overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise input_error(path, "config file not found", "pass an existing YAML file from configs/")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise input_error(path, f"not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise input_error(path, "top level must be a mapping", "write key: value pairs")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise EmsynthError(format_validation_error(e, where)) from None


def dump_config(cfg: StrictModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
