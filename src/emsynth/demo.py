"""`emsynth demo`: the whole pipeline on built-in phantom data, runnable anywhere without
downloads, in a few minutes on 2 CPU cores.

1. data: phantom volumes of two domains (ssTEM-like "vnc", FIB-SEM-like "ca1"), written and read back;
2. membrane transfer: a membrane U-Net trained on phantom vnc, scored on phantom ca1;
3-5. GAN, synthesis and the augmentation study at tiny scale (configs/study/demo.yaml), then the report.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from emsynth.config import load_config
from emsynth.data.figures import default_slices, save_slice_figure
from emsynth.data.phantom import generate_volume
from emsynth.data.readers import read_volume, volume_stats
from emsynth.data.writers import write_slice_folder
from emsynth.engine.device import torch_threads
from emsynth.errors import EmsynthError

PHANTOM_DOMAINS = ("vnc", "ca1")
#: The repo's configs/ folder (the README installs the project in editable mode).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _config_file(relative: str) -> Path:
    path = CONFIGS / relative
    if not path.is_file():
        raise EmsynthError(
            f"{path}: demo config not found. Fix: run the demo from a checkout installed with "
            "`pip install -e .` (the README's first command)"
        )
    return path


def write_phantoms(out_dir: Path, n_slices: int, size: int, seed: int, console: Console) -> None:
    """Write one phantom volume per domain as slice folders, read them back and summarise them."""
    table = Table(title="1. phantom datasets (written, then read back from disk)", title_justify="left")
    for col in ("domain", "slices x size", "membrane", "mito", "intensity mean ± std"):
        table.add_column(col)
    for domain in PHANTOM_DOMAINS:
        folder = out_dir / f"phantom_{domain}"
        write_slice_folder(generate_volume(domain, n_slices, (size, size), seed=seed), folder)
        volume = read_volume(folder, layout="slices")
        stats = volume_stats(volume)
        fractions, intensity = stats["label_fractions"], stats["intensity"]
        table.add_row(
            domain,
            f"{len(volume)} x {size}²",
            f"{fractions['membrane']:.1%}",
            f"{fractions['mito']:.1%}",
            f"{intensity['mean']:.0f} ± {intensity['std']:.0f}",
        )
        indices = default_slices(len(volume))
        save_slice_figure(
            volume.select(indices), out_dir / f"phantom_{domain}.png",
            title=f"phantom '{domain}'", z_numbers=indices,
        )
    console.print(table)


def membrane_transfer(out_dir: Path, seed: int, console: Console) -> None:
    """Train the membrane model on phantom vnc and score it on phantom ca1 (ground truth known)."""
    from emsynth.membranes.config import MembraneConfig
    from emsynth.membranes.predict import MembraneModel, evaluate_volume
    from emsynth.membranes.task import train_membranes

    cfg = load_config(
        MembraneConfig,
        _config_file("membranes/phantom.yaml"),
        [f"engine.seed={seed}", "engine.steps=400", "engine.max_time=45s"],
    )
    run_dir = out_dir / "membranes_vnc"
    train_membranes(cfg, run_dir)
    model = MembraneModel.load(run_dir)
    target = generate_volume("ca1", 4, (256, 256), seed=seed + 100)
    report = evaluate_volume(model, target, mito_from="labels")
    scores, plaus = report["scores"], report["plausibility"]
    table = Table(title="2. membrane transfer: trained on phantom vnc, tested on phantom ca1",
                  title_justify="left")
    for col in ("membrane F1", "membrane IoU", "membrane fraction (pred / truth)",
                "mito interior covered"):
        table.add_column(col)
    table.add_row(
        f"{scores['f1']:.3f}", f"{scores['iou']:.3f}",
        f"{plaus['membrane_fraction']:.1%} / {target.labels['membrane'].mean():.1%}",
        f"{plaus['mito_interior_on_membrane']:.2%}",
    )
    console.print(table)


def run_study_demo(out_dir: Path, seed: int, console: Console) -> None:
    """GAN training, synthesis, segmenters real / real+synthetic / synthetic, and the report."""
    from emsynth.report import build_report, headline
    from emsynth.study.config import StudyConfig
    from emsynth.study.runner import run_study

    cfg = load_config(StudyConfig, _config_file("study/demo.yaml"), [f"seeds=[{seed}, {seed + 1}]"])
    study_dir = out_dir / "study"
    run_study(cfg, study_dir, console=console)
    results, html_path, md_path = build_report(study_dir)
    console.rule("[bold]3-5. GAN, synthesis and the augmentation study (test foreground IoU)")
    console.print(headline(results))
    console.print(f"report: {html_path} (and {md_path.name})")


def run_demo(out_dir: Path, seed: int = 0) -> None:
    console = Console()
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(None):  # every usable core: measured faster (benchmarks/threads.py)
        console.rule("[bold]emsynth demo 1/3: phantom data")
        write_phantoms(out_dir, n_slices=4, size=512, seed=seed, console=console)
        console.rule("[bold]emsynth demo 2/3: membrane transfer between phantom domains")
        membrane_transfer(out_dir, seed, console)
        console.rule("[bold]emsynth demo 3/3: GAN, synthesis, study, report")
        run_study_demo(out_dir, seed, console)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {out_dir}")
