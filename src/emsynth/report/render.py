"""The study report: report.html (self-contained: CSS inline, figures embedded as base64 PNG,
readable offline) and report.md (figures as PNG files beside it), built from the same tables;
plus the headline table for the terminal."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from rich.table import Table

from emsynth.engine.progress import format_duration
from emsynth.io import atomic_write_bytes, atomic_write_text
from emsynth.report import answer, plots
from emsynth.report.collect import METRIC_NAMES, Comparison, StudyResults
from emsynth.report.stats import p_text
from emsynth.study.layout import (
    CELLS_DIR,
    MIXED,
    PREVIEW,
    PREVIEWS_DIR,
    REAL,
    REAL_PREVIEW,
    STUDY_YAML,
    canonical_layout,
    layout_preview,
    load_preview,
)

#: The metric whose paired differences get p-values (Dice is shown, not tested).
TESTED_METRIC = "iou"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FIGURES_DIR = "figures"


@dataclass
class TableData:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class FigureData:
    title: str
    file: str  # relative to the study folder
    png: bytes
    caption: str = ""


def _duration(seconds: float | None) -> str:
    return "" if seconds is None else format_duration(seconds)


def _diff_text(summary, digits: int = 3, comparison: Comparison | None = None) -> str:
    """Mean [95% CI] (n), * when the interval excludes 0; with a `comparison`, its paired
    t-test p and Holm-adjusted p."""
    if summary.n == 0:
        return "n/a"
    text = f"{summary.mean:+.{digits}f}"
    if summary.low is None:
        return f"{text} (n={summary.n}, no CI)"
    marker = " *" if summary.excludes_zero else ""
    text = (f"{text} [{summary.low:+.{digits}f}, {summary.high:+.{digits}f}] "
            f"(n={summary.n}){marker}")
    if comparison is not None:
        text += f"; p {p_text(summary.p)}, Holm p {p_text(comparison.p_holm)}"
    return text


def comparisons_note(results: StudyResults) -> str:
    """How many comparisons the report tests and how their p-values are adjusted."""
    comparisons = results.comparisons(TESTED_METRIC)
    tested = sum(c.p_holm is not None for c in comparisons.values())
    main = sum(c.b in results.conditions for c in comparisons.values())
    text = (f"{len(comparisons)} paired comparisons of test {METRIC_NAMES[TESTED_METRIC]} "
            f"({main} in the main table, {len(comparisons) - main} in the ablation); ")
    if not tested:
        text += "none has a p-value (fewer than 2 seeds)."
    else:
        which = f"all {tested}" if tested == len(comparisons) else \
            f"the {tested} with at least 2 seeds"
        text += (f"p-values (two-sided paired t-test over seeds) of {which}, Holm-adjusted "
                 f"across those {tested}.")
    return text + " Dice differences are descriptive (not tested)."


#: A table cell of a condition the design does not train at that regime (a control).
NOT_TRAINED = "—"


def score_table(results: StudyResults, metric: str) -> TableData:
    """Regimes as rows; each condition's mean ± CI half-width, then the paired differences
    (for the tested metric, IoU, with their p and Holm-adjusted p)."""
    header = ["regime", "annotated px", *results.conditions,
              *[f"{b} − {a} (paired)" for b, a in results.differences]]
    comparisons = results.comparisons(metric) if metric == TESTED_METRIC else {}
    rows = []
    for regime in results.regimes:
        row = [regime, f"{results.pixels.get(regime, 0):,}"]
        row += [results.summary(metric, regime, c).text() if results.trains(regime, c)
                else NOT_TRAINED for c in results.conditions]
        row += [_diff_text(results.difference(metric, regime, b, a),
                           comparison=comparisons.get((regime, b, a)))
                if results.trains(regime, b) and results.trains(regime, a) else NOT_TRAINED
                for b, a in results.differences]
        rows.append(row)
    note = (f"Test {METRIC_NAMES[metric]} (whole test volume, foreground class only), mean ± "
            "half-width of the 95% t-interval over seeds; differences: mean [95% CI] of the "
            "per-seed difference, * = the interval excludes 0 (unadjusted).")
    if comparisons:
        note += " " + comparisons_note(results)
    return TableData(f"Test {METRIC_NAMES[metric]}", header, rows, note)


def per_seed_table(results: StudyResults) -> TableData:
    header = ["regime", "condition", *[f"seed {s}" for s in results.seeds]]
    rows = []
    for regime in results.regimes:
        for condition in results.conditions:
            if not results.trains(regime, condition):
                continue
            iou = results.scores["iou"].get((regime, condition), {})
            dice = results.scores["dice"].get((regime, condition), {})
            rows.append([regime, condition, *[
                f"{iou[s]:.3f} / {dice[s]:.3f}" if s in iou else "—" for s in results.seeds]])
    return TableData("Per-seed test scores (IoU / Dice)", header, rows)


def ablation_table(results: StudyResults, metric: str = TESTED_METRIC) -> TableData | None:
    """The mask layout x strategy ablation (segment cells with a `variant` label): each
    variant's mean ± CI and its paired difference from real-only at the same regime, with the
    paired t-test p and the Holm-adjusted p over all the report's comparisons."""
    if not results.variants:
        return None
    comparisons = results.comparisons(metric)
    rows = []
    for regime in results.regimes:
        mine = [c for r, c in results.variants if r == regime]
        if not mine:
            continue
        for condition in [MIXED, *mine]:
            label = condition.split(" [", 1)[1].rstrip("]") if " [" in condition else \
                f"{MIXED} (main recipe)"
            difference = results.difference(metric, regime, condition, REAL)
            comparison = comparisons.get((regime, condition, REAL))
            rows.append([regime, label, results.summary(metric, regime, condition).text(),
                         _diff_text(difference), p_text(difference.p),
                         p_text(comparison.p_holm if comparison else None)])
    note = ("Unadjusted 95% CIs and p-values (two-sided paired t-test over seeds); Holm p: "
            "adjusted over every comparison of this report (main table and ablation), the one "
            "to read with this many. Choose the recipe on validation, not here. "
            + comparisons_note(results))
    return TableData(f"Ablation: mask layout x strategy (test {METRIC_NAMES[metric]})",
                     ["regime", "variant", "mean ± CI", f"variant − {REAL} (paired)", "p",
                      "Holm p"], rows, note)


def _span(values: list) -> str:
    """"600" when every value is the same, "598–600" otherwise, "" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def steps_table(results: StudyResults) -> TableData | None:
    """Training steps of every segmenter, per regime and condition (ablation variants
    included), over seeds: run, planned (the fixed budget), pretraining, real crops seen."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for info in results.cells:
        if info.kind != "segment" or info.result is None:
            continue
        label = info.labels["condition"]
        if info.labels.get("variant"):
            label = f"{label} [{info.labels['variant']}]"
        groups.setdefault((info.labels["regime"], label), []).append(info.result)
    if not groups:
        return None
    rows = []
    for regime in results.regimes:
        for (r, label), found in groups.items():
            if r != regime:
                continue
            stops = sorted({str(f.get("stop_reason", "")) for f in found})
            rows.append([regime, label, str(len(found)), _span([f.get("steps") for f in found]),
                         _span([f.get("steps_planned") for f in found]),
                         _span([f.get("pretrain", {}).get("steps") for f in found]),
                         _span([f.get("real_crops") for f in found]), ", ".join(stops)])
    note = ("Steps each segmenter trained (one value: the same for every seed), its planned "
            "budget, the synthetic-only pretraining (pretrain strategy) and the real crops it "
            "drew; stopped by: steps (the budget) or time (segment.engine.max_time, the "
            "safety net).")
    return TableData("Segmenter training steps", ["regime", "condition", "seeds", "steps",
                                                  "planned", "pretrain steps", "real crops",
                                                  "stopped by"], rows, note)


def recipe_table(results: StudyResults) -> TableData | None:
    """The real+synthetic recipe of each regime chosen on validation IoU (answer.choose), with
    its test difference from real-only: what the answer's sentences are made of."""
    rows = []
    for regime in results.regimes:
        choice = answer.choose(results, regime)
        if choice is None:
            continue
        p_holm = choice.comparison.p_holm if choice.comparison else None
        rows.append([regime, str(choice.candidates), choice.recipe, choice.validation.text(),
                     _diff_text(choice.difference), p_text(p_holm),
                     answer.verdict(choice.difference)])
    if not rows:
        return None
    note = ("The recipe with the best mean validation IoU over seeds among the main recipe and "
            "the ablation's variants at that regime; the test block scores the choice only. "
            "Verdict by the paired 95% CI of the test difference; Holm p over every comparison "
            "of this report.")
    return TableData("Real+synthetic recipe chosen on validation",
                     ["regime", "candidates", "chosen recipe", "validation IoU",
                      f"test IoU − {REAL} (paired)", "Holm p", "verdict"], rows, note)


def gan_table(results: StudyResults) -> TableData | None:
    rows = []
    for info in results.cells:
        if info.kind != "gan" or info.result is None:
            continue
        r, gan = info.result, info.result.get("gan", {})
        shared = "shared by the seeds" if r.get("gan_shared") else "this seed's own"
        rows.append([info.labels["regime"], str(info.labels["seed"]), shared,
                     str(gan.get("step", "")),
                     _duration(gan.get("elapsed_s")), r["mask_source"],
                     f"{r['synthetic_count']} × {r['synthetic_size'][0]}²",
                     f"{r['mito_fraction_real']:.3f} / {r['mito_fraction_synthetic']:.3f}",
                     f"{r['mean_intensity_real']:.0f} / {r['mean_intensity_synthetic']:.0f}"])
    if not rows:
        return None
    header = ["regime", "seed", "GAN", "GAN steps", "GAN train time", "masks", "synthetic images",
              "mito fraction real / synth", "mean grey real / synth"]
    return TableData("GAN and synthesis", header, rows)


def runtime_table(results: StudyResults) -> TableData:
    rows = []
    total = 0.0
    for info in results.cells:
        record = info.record or {}
        duration = record.get("duration_s") if info.done else None
        total += duration or 0.0
        result = info.result or {}
        steps = result.get("steps", result.get("gan", {}).get("step", ""))
        stop = result.get("stop_reason", result.get("gan", {}).get("stop_reason", ""))
        labels = info.labels
        rows.append([info.kind, str(labels.get("regime", "")), str(labels.get("seed", "")),
                     str(labels.get("condition", "")),
                     "done" if info.done else record.get("status", "not run"),
                     _duration(duration), str(steps), str(stop), record.get("ended_at", "")])
    header = ["cell", "regime", "seed", "condition", "status", "run time", "steps", "stopped by",
              "finished at"]
    return TableData(f"Cells and run times (total {_duration(total)})", header, rows)


def provenance_table(results: StudyResults) -> TableData:
    index = results.index
    git = index.get("git") or {}
    commit = git.get("commit") or "unknown (not a git checkout)"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    records = [c.record for c in results.cells if c.record]
    commits = sorted({(r.get("git") or {}).get("commit") or "unknown" for r in records})
    rows = [
        ["study", index["name"]],
        ["status", (f"{index['status']}; {len(results.cells) - results.missing} of "
                    f"{len(results.cells)} cells done")],
        ["data", index["data"]["description"]],
        ["blocks", ", ".join(f"{k} {v[0]}-{v[-1]} ({len(v)} slices)"
                             for k, v in index["data"]["blocks"].items() if v)],
        ["test set", f"{index['test']['description']}: {index['test']['slices']} slices"],
        ["seeds", ", ".join(str(s) for s in results.seeds)],
        ["started / updated", f"{index['started_at']} / {index['updated_at']}"],
        ["git commit (study run)", commit],
        ["git commits of the cells", ", ".join(c[:12] for c in commits) or "none"],
        ["versions", ", ".join(f"{k} {v}" for k, v in index.get("versions", {}).items())],
        *_compute_rows(index.get("compute")),
        ["command", " ".join(index.get("command", []))],
    ]
    return TableData("Study run", ["", ""], rows)


def _compute_rows(compute: dict | None) -> list[list[str]]:
    """CPU kind, threads and resolved precisions of the (latest) study run, where recorded."""
    if not compute:
        return [["machine", "not recorded (a study run before precision was recorded)"]]
    return [
        ["machine", f"{compute['cpu']}; {compute['threads']} torch threads"],
        ["precision, GAN cells", compute["gan_precision"]],
        ["precision, segmenter cells", compute["segment_precision"]],
    ]


def regime_table(results: StudyResults) -> TableData:
    rows = []
    for regime in results.index["regimes"]:
        per_seed = regime["per_seed"]
        picks = "; ".join(f"seed {s}: z {', '.join(str(z) for z in v['slices'][:8])}"
                          f"{' …' if len(v['slices']) > 8 else ''}" for s, v in per_seed.items())
        crop = f"{regime['crop']} px crops" if regime["crop"] else "whole slices"
        rows.append([regime["name"], str(regime["slices"]), crop, picks])
    return TableData("Regimes (real annotated data per seed)",
                     ["regime", "slices", "crop", "training slices chosen"], rows)


# --- figures ---------------------------------------------------------------------------------

def build_figures(results: StudyResults) -> list[FigureData]:
    figures = [FigureData(
        "Test foreground IoU against the amount of real annotated data",
        f"{FIGURES_DIR}/iou_vs_regime.png", plots.score_plot(results, "iou"),
        "Left: mean and 95% CI over seeds per condition. Right: paired differences per regime.")]
    first_seed = results.seeds[0]
    for regime in results.regimes:
        gan = results.cell("gan", regime=regime, seed=first_seed)
        gan_dir = results.study_dir / CELLS_DIR / gan.name if gan and gan.done else None
        synthetic = load_preview(gan_dir / PREVIEW) if gan_dir else None
        # The GAN's view of the real data includes predicted membranes; else the plain data.
        real = load_preview(gan_dir / REAL_PREVIEW) if gan_dir else None
        if real is None:
            real = load_preview(results.study_dir / PREVIEWS_DIR / f"real_{regime}.npz")
        if real is None and synthetic is None:
            continue
        figures.append(FigureData(
            f"Regime {regime}: real {'and synthetic ' if synthetic is not None else ''}"
            f"training images (seed {first_seed})",
            f"{FIGURES_DIR}/data_{regime}.png", plots.data_grid(regime, real, synthetic)))
    figures += layout_figures(results, first_seed)
    rows = []
    for regime in results.regimes:
        tiles = []
        for condition in results.conditions:
            info = results.cell("eval", regime=regime, seed=first_seed, condition=condition)
            preview = load_preview(results.study_dir / CELLS_DIR / info.name / PREVIEW) \
                if info is not None and info.done else None
            blank = np.zeros((2, 2), np.uint8)
            tiles.append(blank if preview is None else plots.prediction_tile(
                preview["image"], preview["truth"], preview["pred"]))
        rows.append((regime, tiles))
    if any(tile.ndim == 3 for _, tiles in rows for tile in tiles):
        figures.append(FigureData(
            f"Test predictions (seed {first_seed})", f"{FIGURES_DIR}/test_predictions.png",
            plots.tile_rows(rows, "yellow: correct, red: false positive, blue: missed",
                             results.conditions),
            "Middle slice of the test set (top-left corner), at each model's chosen threshold."))
    return figures


def layout_figures(results: StudyResults, seed: int) -> list[FigureData]:
    """One figure per mask layout the study synthesised: each regime's synthetic images from
    that layout and their masks (the GAN cells' previews of `seed`)."""
    main = canonical_layout(results.index["config"]["synthesis"]["masks"])
    found: dict[str, list[tuple[str, dict[str, np.ndarray]]]] = {}
    sources: dict[str, str] = {}
    for regime in results.regimes:
        gan = results.cell("gan", regime=regime, seed=seed)
        if gan is None or gan.result is None:
            continue
        per_layout = gan.result.get("layouts") or {main: gan.result}
        for layout, info in per_layout.items():
            preview = load_preview(results.study_dir / CELLS_DIR / gan.name
                                   / layout_preview(layout, main))
            if preview is not None:
                found.setdefault(layout, []).append((regime, preview))
                sources.setdefault(layout, info.get("mask_source", ""))
    return [FigureData(
        f"Mask layout {layout}: synthetic images (seed {seed})",
        f"{FIGURES_DIR}/layout_{layout}.png", plots.layout_grid(layout, previews),
        f"Masks: {sources[layout]}.") for layout, previews in found.items()]


# --- rendering -------------------------------------------------------------------------------

def _md_table(table: TableData) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"### {table.title}", ""]
    if table.header != ["", ""]:
        lines.append("| " + " | ".join(cell(h) for h in table.header) + " |")
    else:
        lines.append("| | |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def _html_table(table: TableData) -> str:
    esc = html.escape
    head = "" if table.header == ["", ""] else (
        "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.header) + "</tr>")
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    note = f"<p class='note'>{esc(table.note)}</p>" if table.note else ""
    return f"<h3>{esc(table.title)}</h3><table>{head}{body}</table>{note}"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.note{color:#555;font-size:0.85em;max-width:60em}
img{max-width:100%;border:1px solid #ddd}pre{background:#f7f7f7;padding:1em;overflow-x:auto;
font-size:0.8em}figure{margin:1em 0 2em}figcaption{color:#555;font-size:0.85em}
"""


def _intro(results: StudyResults) -> str:
    cfg = results.index["config"]
    missing = results.missing
    status = ("complete" if missing == 0 else
              f"INCOMPLETE: {missing} of {len(results.cells)} cells not done; rerun "
              "`emsynth study run` to finish")
    synthesis = ""
    if any(c != REAL for c in results.conditions):
        synthesis = (f" {cfg['synthesis']['count']} synthetic images per regime and seed "
                     f"({cfg['synthesis']['masks']} masks), from a GAN trained on that regime's "
                     "real data only.")
    if synthesis:
        shared = [r["name"] for r in results.index["regimes"] if r.get("gan_shared")]
        synthesis += (" GANs: one per regime and seed" + (
            f", except at {', '.join(shared)}, where every seed has the same real data and the "
            "seeds share one GAN (each seed synthesises its own images from it)."
            if shared else "."))
    if MIXED in results.conditions:
        synthesis += (f" Batches of the real+synthetic condition draw "
                      f"{cfg['mix']['synthetic_share']:.0%} synthetic crops.")
    return (f"Does adding GAN-synthesised images improve U-Net mitochondria segmentation? "
            f"Regimes: {', '.join(results.regimes)}; seeds: {len(results.seeds)}; conditions: "
            f"{', '.join(results.conditions)}.{synthesis} Every segmenter of a seed has the same "
            "step budget, augmentation and initialisation; thresholds are chosen on the "
            f"validation block, scores measured on the test set. Study {status}."
            + (" " + comparisons_note(results) if results.comparisons(TESTED_METRIC) else ""))


def write_report(results: StudyResults) -> tuple[Path, Path]:
    """Write figures/*.png, report.md and report.html into the study folder."""
    study_dir = results.study_dir
    tables = [score_table(results, "iou"), score_table(results, "dice"), per_seed_table(results)]
    extra = [t for t in (recipe_table(results), ablation_table(results), steps_table(results),
                         gan_table(results)) if t is not None]
    figures = build_figures(results)
    for figure in figures:
        atomic_write_bytes(study_dir / figure.file, figure.png)
    provenance = [provenance_table(results), regime_table(results), runtime_table(results)]
    config_yaml = (study_dir / STUDY_YAML).read_text() if (study_dir / STUDY_YAML).is_file() \
        else yaml.safe_dump(results.index["config"], sort_keys=False)
    title = f"emsynth augmentation study: {results.index['name']}"
    intro = _intro(results)
    said = answer.answer(results)

    md = [f"# {title}", "", intro, "", "## Answer", "", *[f"- {line}" for line in said], "",
          "## Results", ""]
    md += [_md_table(t) for t in tables + extra]
    md += ["## Figures", ""]
    md += [f"### {f.title}\n\n![{f.title}]({f.file})\n\n{f.caption}\n" for f in figures]
    md += ["## Provenance", ""] + [_md_table(t) for t in provenance]
    md += ["### Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    md_path = study_dir / REPORT_MD
    atomic_write_text(md_path, "\n".join(md))

    esc = html.escape
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}"
              f"</title><style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
              f"<p>{esc(intro)}</p><h2>Answer</h2><ul>"
              + "".join(f"<li>{esc(line)}</li>" for line in said)
              + "</ul><h2>Results</h2>")]
    parts += [_html_table(t) for t in tables + extra]
    parts.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode(f.png).decode("ascii")
        parts.append(f"<figure><h3>{esc(f.title)}</h3><img alt='{esc(f.title)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{esc(f.caption)}"
                     "</figcaption></figure>")
    parts.append("<h2>Provenance</h2>")
    parts += [_html_table(t) for t in provenance]
    parts.append(f"<h3>Configuration</h3><pre>{esc(config_yaml)}</pre></body></html>")
    html_path = study_dir / REPORT_HTML
    atomic_write_text(html_path, "".join(parts))
    return html_path, md_path


def headline(results: StudyResults) -> Table:
    """The IoU table for the terminal."""
    data = score_table(results, "iou")
    table = Table(title=f"{results.index['name']}: {data.title} (mean ± 95% CI over seeds)")
    for name in data.header:
        table.add_column(name)
    for row in data.rows:
        table.add_row(*row)
    return table
