"""`emsynth study export`: a light copy of a study folder, small enough to commit, so a study
can span machines or sessions that do not keep the run folder.

The copy holds study.json, study.yaml and, for every finished cell of the plan, its record,
result and done marker; with `previews`, also the image previews the report draws (the
real-data ones and those of the study's first seed's cells: binary, so off for a copy that is
committed; a report of the continued study then draws those figures for the regimes it ran).
Models, synthetic images and training runs stay behind, and each record says so
(`"artifacts": false`). `emsynth study run --reuse EXPORT` then takes the exported cells as
finished and re-runs only those whose models or images a cell still to run reads
(`runner.settle_exported`): with a deterministic cell (same CPU kind, versions and seed) the
re-run gives the same result; elsewhere it is a fresh draw of the same recipe, which the record
of the cells trained from it tells (their `git`/`compute` provenance).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from emsynth.errors import input_error
from emsynth.io import atomic_write_text
from emsynth.study.layout import (
    ARTIFACTS,
    CELLS_DIR,
    DONE,
    FORMAT,
    PREVIEWS_DIR,
    RECORD,
    RESULT,
    STUDY_JSON,
    STUDY_YAML,
)


@dataclass
class ExportSummary:
    cells: int       # finished cells exported
    planned: int     # cells of the study's plan
    bytes: int       # size of the export


def _read_index(study_dir: Path) -> dict:
    try:
        index = json.loads((study_dir / STUDY_JSON).read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise input_error(study_dir, f"no readable {STUDY_JSON} of an emsynth study",
                          "pass the folder of `emsynth study run` (its --study-dir)")
    return index


def _finished(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / DONE).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def export_study(study_dir: str | Path, out: str | Path,
                 previews: bool = False) -> ExportSummary:
    """Write the light copy of `study_dir` to `out` (replacing an earlier export there as a
    whole: it is built beside it and renamed into place)."""
    study_dir, out = Path(study_dir), Path(out)
    index = _read_index(study_dir)
    if out.resolve() == study_dir.resolve():
        raise input_error(out, "is the study folder itself", "export to another folder")
    first_seed = index["config"]["seeds"][0]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in (STUDY_JSON, STUDY_YAML):
        if (study_dir / name).is_file():
            shutil.copy2(study_dir / name, staging / name)
    if previews and (study_dir / PREVIEWS_DIR).is_dir():
        shutil.copytree(study_dir / PREVIEWS_DIR, staging / PREVIEWS_DIR)
    exported = 0
    for entry in index["cells"]:
        source = study_dir / CELLS_DIR / entry["name"]
        if not _finished(source, entry["key"]):
            continue
        target = staging / CELLS_DIR / entry["name"]
        target.mkdir(parents=True)
        record = json.loads((source / RECORD).read_text())
        record[ARTIFACTS] = False
        record["exported_from"] = str(source)
        atomic_write_text(target / RECORD, json.dumps(record, indent=2) + "\n")
        shutil.copy2(source / RESULT, target / RESULT)
        if previews and entry["labels"].get("seed") == first_seed:  # what the report draws
            for preview in source.glob("preview*.npz"):
                shutil.copy2(preview, target / preview.name)
        shutil.copy2(source / DONE, target / DONE)
        exported += 1
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    previous = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return ExportSummary(exported, len(index["cells"]), size)
