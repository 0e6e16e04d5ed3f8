"""Gather a study folder's results into tables: scores per regime x condition x seed, their
summaries over seeds, paired differences, and per-cell provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emsynth.errors import input_error
from emsynth.report.stats import Summary, holm_tested, paired_difference, summarize
from emsynth.study.layout import (
    CELLS_DIR,
    DONE,
    FORMAT,
    MIXED,
    REAL,
    RECORD,
    RESULT,
    STUDY_JSON,
    SYNTHETIC,
)

METRICS = ("iou", "dice")
METRIC_NAMES = {"iou": "foreground IoU", "dice": "foreground Dice"}
#: Paired differences shown, as (minuend, subtrahend): b - a first, then c - a.
DIFFERENCES = ((MIXED, REAL), (SYNTHETIC, REAL))


@dataclass(frozen=True)
class Comparison:
    """One paired comparison the report makes: condition `b` minus `a` at a regime, with the
    Holm-adjusted p over every comparison of the report (None without a p: fewer than 2
    seeds)."""

    regime: str
    b: str
    a: str
    difference: Summary
    p_holm: float | None


@dataclass
class CellInfo:
    name: str
    kind: str
    labels: dict[str, Any]
    done: bool
    record: dict[str, Any] | None
    result: dict[str, Any] | None


@dataclass
class StudyResults:
    study_dir: Path
    index: dict[str, Any]
    cells: list[CellInfo]
    regimes: list[str]
    conditions: list[str]
    seeds: list[int]
    #: scores[metric][(regime, condition)][seed]: test scores
    scores: dict[str, dict[tuple[str, str], dict[int, float]]] = field(default_factory=dict)
    #: validation[(regime, condition)][seed]: the segmenter's validation IoU at its chosen
    #: threshold (what recipes are chosen on; conditions keyed as in `scores`)
    validation: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    pixels: dict[str, int] = field(default_factory=dict)

    @property
    def regime_settings(self) -> dict[str, dict[str, Any]]:
        """{regime name: its settings as the study index records them}."""
        return {r["name"]: r for r in self.index.get("regimes", [])}

    def trains(self, regime: str, condition: str) -> bool:
        """Whether the design trains `condition` at `regime` (regimes[].conditions; a
        real-only control does not train the others)."""
        conditions = self.regime_settings.get(regime, {}).get("conditions")
        return conditions is None or condition in conditions

    def steps_control(self, regime: str) -> str | None:
        """The real-only control of `regime`: a regime whose only condition is real, on the
        same data (same slices, crop and a data_seed or all slices) with more steps; None if
        the study has none. A gain it matches comes from steps, not synthetic images."""
        regimes = self.regime_settings
        here = regimes.get(regime, {})
        if not data_seeded(here):
            return None
        same = ("slices", "crop", "data_seed")
        for name, info in regimes.items():
            if name != regime and info.get("conditions") == [REAL] \
                    and all(info.get(k) == here.get(k) for k in same) \
                    and (info.get("steps") or 0) > (here.get("steps") or 0):
                return name
        return None

    @property
    def controls(self) -> dict[str, str]:
        """{control regime: the regime it controls} (see steps_control)."""
        return {c: r for r in self.regimes if (c := self.steps_control(r)) is not None}

    def summary(self, metric: str, regime: str, condition: str) -> Summary:
        return summarize(list(self.scores[metric].get((regime, condition), {}).values()))

    def difference(self, metric: str, regime: str, b: str, a: str) -> Summary:
        table = self.scores[metric]
        return paired_difference(table.get((regime, a), {}), table.get((regime, b), {}))

    @property
    def differences(self) -> list[tuple[str, str]]:
        return [(b, a) for b, a in DIFFERENCES if b in self.conditions and a in self.conditions]

    @property
    def variants(self) -> list[tuple[str, str]]:
        """(regime, condition) of the ablation's variants, e.g. ("1slice", "real+synthetic
        [remodel/add 0.25]"), in regime order."""
        keys = {key for table in self.scores.values() for key in table if " [" in key[1]}
        return [(r, c) for r in self.regimes for c in sorted(c for rr, c in keys if rr == r)]

    def comparisons(self, metric: str = "iou") -> dict[tuple[str, str, str], Comparison]:
        """Every paired comparison the report tests, keyed (regime, b, a): the main grid's
        differences at each regime, then each ablation variant against real-only (the
        ablation's main-recipe row is the main grid's comparison, counted once). p-values are
        Holm-adjusted across all of them that have one."""
        keys = [(r, b, a) for r in self.regimes for b, a in self.differences]
        keys += [(r, c, REAL) for r, c in self.variants if REAL in self.conditions]
        differences = {k: self.difference(metric, k[0], k[1], k[2]) for k in keys}
        adjusted = holm_tested([d.p for d in differences.values()])
        return {k: Comparison(*k, d, p)
                for (k, d), p in zip(differences.items(), adjusted, strict=True)}

    @property
    def missing(self) -> int:
        return sum(not c.done for c in self.cells)

    def cell(self, kind: str, **labels: Any) -> CellInfo | None:
        for info in self.cells:
            if info.kind == kind and all(info.labels.get(k) == v for k, v in labels.items()):
                return info
        return None


def data_seeded(regime: dict) -> bool:
    """Whether a regime's data is the same for every seed (so two regimes with equal settings
    train on equal data): a data_seed, or all slices."""
    return regime.get("data_seed") is not None or regime.get("slices") == "all"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_results(study_dir: str | Path) -> StudyResults:
    """Read study.json and every planned cell's record and result."""
    study_dir = Path(study_dir)
    index = _read_json(study_dir / STUDY_JSON)
    if index is None or index.get("format") != FORMAT:
        raise input_error(study_dir, f"no readable {STUDY_JSON} of an emsynth study",
                          "pass the folder of `emsynth study run` (its --study-dir)")
    infos = []
    for entry in index["cells"]:
        folder = study_dir / CELLS_DIR / entry["name"]
        marker = _read_json(folder / DONE)
        done = marker is not None and marker.get("key") == entry["key"]
        infos.append(CellInfo(entry["name"], entry["kind"], entry["labels"], done,
                              _read_json(folder / RECORD),
                              _read_json(folder / RESULT) if done else None))
    cfg = index["config"]
    results = StudyResults(
        study_dir=study_dir, index=index, cells=infos,
        regimes=[r["name"] for r in cfg["regimes"]], conditions=list(cfg["conditions"]),
        seeds=list(cfg["seeds"]), scores={m: {} for m in METRICS},
    )
    for regime in index["regimes"]:
        values = [v["pixels"] for v in regime["per_seed"].values()]
        results.pixels[regime["name"]] = round(sum(values) / len(values))
    for info in infos:
        if info.kind not in ("eval", "segment") or info.result is None:
            continue
        condition = info.labels["condition"]
        if info.labels.get("variant"):  # an ablation variant: kept apart from the main grid
            condition = f"{condition} [{info.labels['variant']}]"
        where, seed = (info.labels["regime"], condition), int(info.labels["seed"])
        if info.kind == "segment":
            iou = (info.result.get("validation") or {}).get("fg_iou")
            if iou is not None:
                results.validation.setdefault(where, {})[seed] = float(iou)
            continue
        for metric in METRICS:
            results.scores[metric].setdefault(where, {})[seed] = float(info.result[metric])
    return results
