"""The augmentation study's report: statistics over seeds, figures, HTML and Markdown."""

from __future__ import annotations

from pathlib import Path

from emsynth.report.collect import StudyResults, load_results
from emsynth.report.render import headline, write_report


def build_report(study_dir: str | Path) -> tuple[StudyResults, Path, Path]:
    """Write report.html, report.md and figures/ into the study folder; returns the results
    and the two report paths."""
    results = load_results(study_dir)
    html_path, md_path = write_report(results)
    return results, html_path, md_path


__all__ = ["StudyResults", "build_report", "headline", "load_results", "write_report"]
