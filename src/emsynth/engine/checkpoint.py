"""Checkpoints (full training state, for resume) and weight files (safetensors, for inference).

A checkpoint is a `torch.save` of a dict holding only tensors and plain values (numbers,
strings, lists, dicts), so it loads with `torch.load(weights_only=True)`: a file that would
need arbitrary unpickling (and could run code while loading) is refused. Every file is written
atomically, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from emsynth.errors import EmsynthError, input_error
from emsynth.io import atomic_path, plain

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers.

    Tasks should call this in `validate` and `log_images`, which the engine runs outside the
    data-parallel step (on rank 0 only for images)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `run_dir`, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale_temp_files(run_dir: str | Path) -> None:
    """Delete half-written temporary checkpoints left by a process killed while saving."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.glob(".step_*.tmp"):
            path.unlink(missing_ok=True)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) onto the CPU; refuse anything else."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise input_error(
            path,
            "refusing to load this checkpoint: it holds objects other than tensors and plain "
            f"values, whose unpickling could run code ({first_line[:160]})",
            "only resume from checkpoints written by emsynth; delete this file or pass "
            "--no-resume",
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise input_error(
            path,
            f"not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:160]})",
            "delete the damaged file (the previous checkpoint is used) or pass --no-resume",
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise input_error(
            path,
            "not an emsynth training checkpoint (missing format marker)",
            "only resume from checkpoints written by emsynth, or pass --no-resume",
        )
    return state


# --- random number generator states as plain values (weights_only accepts them) -------------


def capture_rng_state(batch_rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    """Every RNG that can influence training: torch CPU and the training GPU's, numpy (global
    and the batch generator), random."""
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "python": [py_version, list(py_internal), py_gauss],
        "numpy_global": _numpy_legacy_state(),
        "batch": plain(batch_rng.bit_generator.state),
    }
    return state


def restore_rng_state(
    state: dict[str, Any], batch_rng: np.random.Generator, device: torch.device
) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_global"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    batch_rng.bit_generator.state = state["batch"]


def _numpy_legacy_state() -> list[Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def save_weights(
    path: str | Path, modules: Mapping[str, nn.Module], metadata: Mapping[str, Any] | None = None
) -> None:
    """Write the modules' weights (and JSON-able `metadata`, e.g. the model config) to a
    safetensors file: tensors are named `<module>.<parameter>`; no code can hide in it."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, tensor in unwrap(module).state_dict().items():
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous().clone()
    header = {
        "emsynth_modules": json.dumps(sorted(modules)),
        "emsynth_metadata": json.dumps(dict(metadata or {})),
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)


def load_weights(
    path: str | Path,
    modules: Mapping[str, nn.Module] | None = None,
    device: str = "cpu",
    plain_module: str | None = None,
    fix: str = "build the model with the config stored in the file's metadata",
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a file written by `save_weights`: ({module: state_dict}, metadata).

    When `modules` is given, their weights are loaded in place (strictly: names and shapes
    must match, else a one-line EmsynthError naming the file and `fix`).
    `plain_module`: a safetensors file without emsynth's module list (a segmenter exported
    before there was one weights format: plain parameter names, string metadata) is read as
    the weights of this one module, its header as the metadata."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "weights file not found", "pass a .safetensors file written by emsynth")
    try:
        with safetensors.safe_open(str(path), framework="pt", device=device) as handle:
            header = handle.metadata() or {}
            keys = handle.keys()
            flat = {key: handle.get_tensor(key) for key in keys}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise input_error(
            path, f"not a readable safetensors file ({str(err).splitlines()[0][:160]})",
            "pass a .safetensors file written by emsynth",
        ) from None
    if "emsynth_modules" in header:
        names = json.loads(header["emsynth_modules"])
        metadata = json.loads(header.get("emsynth_metadata", "{}"))
    elif plain_module is not None:
        names, metadata = [plain_module], dict(header)
        flat = {f"{plain_module}.{key}": tensor for key, tensor in flat.items()}
    else:
        raise input_error(path, "not an emsynth weights file (no module list in its header)",
                          "export weights with emsynth")
    state_dicts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    # Longest names first, so that a module "g" never claims the tensors of a module "g.ema".
    for key, tensor in flat.items():
        owner = next(n for n in sorted(names, key=len, reverse=True) if key.startswith(n + "."))
        state_dicts[owner][key[len(owner) + 1 :]] = tensor
    for name, module in (modules or {}).items():
        if name not in state_dicts:
            raise input_error(path, f"has no weights for module {name!r} (it holds {names})",
                              "pass the weights file of the matching model")
        try:
            unwrap(module).load_state_dict(state_dicts[name])
        except RuntimeError as err:
            raise input_error(
                path, f"weights do not fit module {name!r} ({_first_mismatch(err)})", fix,
            ) from None
    return state_dicts, metadata


def _first_mismatch(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0])[:200] if lines else "state dict mismatch"


def require_plain(value: Any, where: str) -> None:
    """Raise if `value` holds something weights_only loading would refuse (a task bug)."""
    if isinstance(value, dict):
        for key, item in value.items():
            require_plain(key, where)
            require_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            require_plain(item, f"{where}[{index}]")
    elif not isinstance(value, (torch.Tensor, str, int, float, bool, type(None), torch.dtype,
                                torch.device, torch.Size)):
        raise EmsynthError(
            f"checkpoint state {where} is a {type(value).__name__}, which a safe (weights_only) "
            "load cannot restore. Fix: return only tensors, numbers, strings, lists and dicts"
        )
