"""GanTask: paired crops, a training step, learning on a phantom, images, resume, the CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from tiny import GAN_TINY, GAN_TRAIN_ONLY
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.engine import train
from emsynth.engine.checkpoint import load_checkpoint, unwrap
from emsynth.engine.task import step_context
from emsynth.errors import EmsynthError
from emsynth.gan.config import GanConfig
from emsynth.gan.export import GENERATOR_FILE, load_generator
from emsynth.gan.task import GanTask, linear_decay
from emsynth.gan.train import split_volumes, train_gan


@pytest.fixture(scope="module")
def phantom() -> Volume:
    return generate_volume("vnc", 4, (256, 320), seed=3)


def _cfg(*overrides: str) -> GanConfig:
    return load_config(GanConfig, GAN_TINY, list(overrides))


def test_presets_load():
    root = GAN_TINY.parent
    spec = load_config(GanConfig, root / "spec.yaml")
    model, data = spec.model, spec.data
    assert (model.ngf, model.ndf, data.crop, data.batch_size) == (64, 64, 256, 1)
    assert spec.loss.adversarial == "lsgan" and spec.loss.l1_weight == 100
    assert (spec.optim.lr, spec.optim.beta1, spec.optim.beta2) == (2e-4, 0.5, 0.999)
    cpu = load_config(GanConfig, root / "cpu.yaml")
    assert cpu.model.ngf in (16, 32) and cpu.data.crop == 256 and cpu.engine.precision == "auto"
    assert _cfg().model.ngf == 8


#: What `gan evaluate --json` writes besides TSTR, as the texture-ablation table reads it.
_IMAGE_SCORES = {"spectrum_distance": 0.5, "local_std_w1_cytoplasm": 3.0, "local_std_w1_mito": 4.0,
                 "fid_minus_baseline": 1.0, "kid": 0.1, "grey_level_w1": 2.0, "fcn_ratio": 1.0}


def _finished_gan_run(folder: Path) -> None:
    """A run.json as a GAN run that reached 3000 steps leaves it, for the ablation's table."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(
        {"end_step": 3000, "resolved": {"cpu_kind": "AMD EPYC", "precision": "bf16"}}))


def _texture_experiment():
    """experiments/gan_texture.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gan_texture", GAN_TINY.parents[2] / "experiments" / "gan_texture.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    return experiment


def test_texture_presets_are_the_ablations_han_variant():
    """configs/gan/cpu_texture.yaml is what experiments/gan_texture.py measured as "han": the
    CPU preset plus its overrides (steps and the safety net aside); the GPU preset is the same
    recipe at the spec's width with Han et al.'s 512 crops; the SPADE preset is "spade_han"."""
    root = GAN_TINY.parent
    experiment = _texture_experiment()
    measured = load_config(GanConfig, root / "cpu.yaml", experiment.VARIANTS["han"])
    preset = load_config(GanConfig, root / "cpu_texture.yaml")
    for section in ("data", "model", "loss", "optim"):
        assert getattr(preset, section) == getattr(measured, section), section
    assert preset.model.decoder_noise == 0.1 and preset.optim.g_steps_per_d == 2
    gpu = load_config(GanConfig, root / "gpu_texture.yaml")
    assert (gpu.model.ngf, gpu.model.ndf, gpu.data.crop) == (64, 64, 512)
    assert gpu.loss == preset.loss and gpu.optim == preset.optim
    assert gpu.model.model_copy(update={"ngf": 32, "ndf": 32}) == preset.model
    spade = load_config(GanConfig, root / "cpu_texture_spade.yaml")
    measured = load_config(GanConfig, root / "cpu.yaml", experiment.VARIANTS["spade_han"])
    for section in ("data", "model", "loss", "optim"):
        assert getattr(spade, section) == getattr(measured, section), section
    assert spade.model.arch == "spade" and preset.model.arch == "unet"


def test_texture_ablation_variants_are_valid_configs():
    """Each generator variant and CA1 membrane channel of the ablation is a valid config; only
    the clDice channel changes the membrane model's loss (the others share one model)."""
    from emsynth.membranes.config import MembraneConfig

    root = GAN_TINY.parents[1]
    experiment = _texture_experiment()
    base = load_config(MembraneConfig, root / "membranes" / "cpu.yaml")
    losses = {name: load_config(MembraneConfig, root / "membranes" / "cpu.yaml", overrides).loss
              for name, (overrides, _) in experiment.MEMBRANES.items()}
    assert losses["predicted"] == losses["thin"] == base.loss and base.loss.cldice_weight == 0
    assert losses["cldice"].cldice_weight == 0.5 and losses["cldice"].cldice_iters == 5
    # every generator variant is a valid GAN config that differs from today's preset
    today = load_config(GanConfig, root / "gan" / "cpu.yaml")
    for name, overrides in experiment.VARIANTS.items():
        variant = load_config(GanConfig, root / "gan" / "cpu.yaml",
                              [o.replace("{ref}", "runs/segment/ref") for o in overrides])
        assert (variant == today) == (name == "today"), name


def test_texture_ablation_resumes_a_killed_run(tmp_path):
    """A GAN killed mid-run leaves run.json with end_step null: the ablation counts it as not
    finished (and reruns it from its checkpoint) instead of failing on the comparison."""
    experiment = _texture_experiment()
    for name, end_step in (("killed", None), ("short", 2500), ("done", 3000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(
            {"status": "running", "end_step": end_step}))
    assert [experiment.finished(tmp_path / n, 3000) for n in ("killed", "short", "done")] == [
        False, False, True]
    assert not experiment.finished(tmp_path / "absent", 3000)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable cores")
def test_texture_jobs_run_on_cores_of_their_own(tmp_path, monkeypatch):
    """--jobs 2: the two commands at once are pinned to two different single cores (emsynth
    sizes its threads to them), so they do not each take every core."""
    experiment = _texture_experiment()
    script = ("import os, sys, time; time.sleep(1); "
              "open(sys.argv[1], 'w').write(' '.join(map(str, sorted(os.sched_getaffinity(0)))))")
    monkeypatch.setattr(experiment, "EMSYNTH", [sys.executable, "-c", script])
    outs = [tmp_path / f"{k}.txt" for k in range(2)]
    experiment.run_all([([str(o)], tmp_path / f"{k}.log") for k, o in enumerate(outs)], 2)
    cores = [o.read_text().split() for o in outs]
    assert [len(c) for c in cores] == [1, 1] and cores[0] != cores[1]


def test_texture_table_reads_scores_without_tstr(tmp_path):
    """A variant scored with --tstr-steps 0 shows in the TSTR table as not measured, beside one
    scored with TSTR, rather than failing the whole table; so do scores written before the
    lattice score existed."""
    experiment = _texture_experiment()
    scores = {"a": {**_IMAGE_SCORES, "tstr_ratio": 0.75, "tstr_iou_synthetic": 0.3,
                    "tstr_iou_real": 0.4},
              "b": _IMAGE_SCORES,
              "c": {**_IMAGE_SCORES, "tstr_ratio": 0.0, "tstr_iou_synthetic": 0.0,
                    "tstr_iou_real": 0.4, "tstr_iou_synthetic_on_synthetic": 0.9,
                    "lattice_mito": 0.3, "lattice_mito_real": 0.09}}
    for name, tstr in (("a", "tstr300"), ("b", "tstr0"), ("c", "tstr300")):
        _finished_gan_run(tmp_path / name)
        (tmp_path / f"{name}_{tstr}_tiles.json").write_text(json.dumps(scores[name]))
    rows = experiment.table(tmp_path, ["a", "b", "c"], 300, "tiles").splitlines()
    assert rows[2].startswith("| a | 0.750 (0.300 / 0.400) | 0.500 |")
    assert rows[2].split(" | ")[4] == "not measured"
    # a later --tstr-steps 0 run of the same generator adds the lattice to its TSTR row
    (tmp_path / "a_tstr0_tiles.json").write_text(json.dumps(
        {**_IMAGE_SCORES, "lattice_mito": 0.25, "lattice_mito_real": 0.09}))
    rows = experiment.table(tmp_path, ["a", "b", "c"], 300, "tiles").splitlines()
    assert rows[3].startswith("| b | not measured | 0.500 |")
    assert rows[4].startswith("| c | 0.000 (0.000 / 0.400); on synthetic 0.900 | 0.500 | "
                              "3.0 / 4.0 | 0.300 (0.090) |")
    assert rows[2].startswith("| a | 0.750 (0.300 / 0.400) | 0.500 | 3.0 / 4.0 | 0.250 (0.090) |")


def test_texture_table_summarises_tstr_over_evaluation_seeds(tmp_path):
    """With several evaluation seeds scored, TSTR is their mean ± t-interval and variants are
    compared paired over their common seeds; a variant with one seed keeps its single value."""
    experiment = _texture_experiment()
    ratios = {"a": {0: 0.9, 1: 1.1, 2: 1.0}, "b": {0: 0.5, 1: 0.8}, "ab": {0: 0.2}}
    for name, by_seed in ratios.items():
        _finished_gan_run(tmp_path / name)
        for seed, ratio in by_seed.items():
            path = experiment.score_file(tmp_path, name, 300, "tiles", seed)
            path.write_text(json.dumps({**_IMAGE_SCORES, "tstr_ratio": ratio, "tstr_iou_synthetic": ratio / 2,
                                        "tstr_iou_real": 0.5}))
    assert experiment.score_file(tmp_path, "a", 300, "tiles", 2).name == "a_tstr300_tiles_seed2.json"
    assert experiment.tstr_by_seed(tmp_path, "a", 300, "tiles") == {0: 0.9, 1: 1.1, 2: 1.0}
    rows = experiment.table(tmp_path, ["a", "b", "ab"], 300, "tiles").splitlines()
    # mean 1.0, sd 0.1, t(0.975, 2) = 4.303: half-width 0.248
    assert rows[2].startswith("| a | 1.000 ± 0.248 (n=3) | 0.500 |")
    assert rows[3].startswith("| b | 0.650 ± 1.906 (n=2) |")
    assert rows[4].startswith("| ab | 0.200 (0.100 / 0.500) |")  # not among "a"'s seeds
    difference = experiment.tstr_difference(tmp_path, "a", "b", 300, "tiles")
    assert difference.n == 2 and abs(difference.mean - (-0.35)) < 1e-9  # seeds 0 and 1 only


def test_texture_ablation_trains_gan_seeds_and_scores_evaluation_seeds(tmp_path, monkeypatch,
                                                                       capsys):
    """--gan-seeds trains each variant again with engine.seed into <variant>_gan<k>; --seeds
    scores every run once per evaluation seed (gan evaluate --seed), and the variants are
    compared within each GAN seed. The emsynth commands are captured, not run."""
    experiment = _texture_experiment()
    (tmp_path / "segment" / "vnc_ref2000" / "model").mkdir(parents=True)
    commands = []

    def fake_run_all(batch, jobs):
        for cmd, _log in batch:
            commands.append(cmd)
            if cmd[:2] == ["gan", "evaluate"]:  # han 1.0 and l1_10 0.5 (+ 0.1 per seed)
                seed, run = int(cmd[cmd.index("--seed") + 1]), Path(cmd[cmd.index("-g") + 1])
                ratio = (1.0 if run.name.startswith("han") else 0.5) + 0.1 * seed
                Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(
                    {**_IMAGE_SCORES, "tstr_ratio": ratio, "tstr_iou_synthetic": ratio / 2,
                     "tstr_iou_real": 0.5}))

    monkeypatch.setattr(experiment, "run_all", fake_run_all)
    argv = ["gan_texture.py", "--dataset", "vnc", "--variants", "han,l1_10", "--gan-seeds", "0,1",
            "--seeds", "0,2", "--runs", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="rerun to resume"):  # the fake trained nothing
        experiment.main()
    trained = {Path(c[c.index("-o") + 1]).name: c for c in commands}
    assert sorted(trained) == ["han", "han_gan1", "l1_10", "l1_10_gan1"]
    assert "engine.seed=1" in trained["han_gan1"] and "loss.l1_weight=10" in trained["l1_10_gan1"]
    assert not any(o.startswith("engine.seed") for o in trained["han"])
    out = tmp_path / "gan12" / "vnc"
    for name in trained:
        _finished_gan_run(out / name)
    commands.clear()
    experiment.main()
    scored = sorted(Path(c[c.index("--json") + 1]).name for c in commands)
    assert scored == sorted(f"{n}_tstr300_tiles{s}.json" for n in trained for s in ("", "_seed2"))
    printed = capsys.readouterr().out
    assert "| han_gan1 | 1.100 ± 1.271 (n=2) |" in printed  # 1.0 and 1.2
    assert "TSTR ratio, l1_10_gan1 − han_gan1, paired over seeds: -0.500 ± 0.000 (n=2)" in printed


def test_sample_batch_pairs_and_ranges(phantom):
    task = GanTask(_cfg(), [phantom])
    masks, image = task.sample_batch(np.random.default_rng(0))
    assert masks.shape == (1, 2, 256, 256) and image.shape == (1, 1, 256, 256)
    assert set(torch.unique(masks).tolist()) == {-1.0, 1.0}
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.05
    again = task.sample_batch(np.random.default_rng(0))
    assert torch.equal(again[0], masks) and torch.equal(again[1], image)
    # Masks stay registered to the image under flips/rotations: membranes are dark here.
    many = [task.sample_batch(np.random.default_rng(s)) for s in range(6)]
    membrane = torch.cat([m[:, 1] for m, _ in many]) > 0
    pixels = torch.cat([i[:, 0] for _, i in many])
    assert pixels[membrane].mean() < pixels[~membrane].mean() - 0.2


def test_mask_range_01_and_single_channel(phantom):
    task = GanTask(_cfg("data.mask_range=0,1", "data.channels=[mito]"), [phantom])
    masks, _ = task.sample_batch(np.random.default_rng(1))
    assert masks.shape[1] == 1 and set(torch.unique(masks).tolist()) <= {0.0, 1.0}


def test_missing_channel_and_small_slices_are_user_errors(phantom):
    no_membrane = Volume(phantom.image, {MITO: phantom.labels[MITO]}, source="lucchi-like")
    with pytest.raises(EmsynthError, match="lucchi-like.*no 'membrane' label"):
        GanTask(_cfg(), [no_membrane])
    small = generate_volume("vnc", 1, (128, 128), seed=0)
    with pytest.raises(EmsynthError, match="smaller than the 256x256"):
        GanTask(_cfg(), [small])
    with pytest.raises(EmsynthError, match="multiple of 256"):
        _cfg("data.crop=200")


def test_split_volumes_holds_out_the_last_slices(phantom):
    train_v, val_v = split_volumes([phantom], 1, gap=0)
    assert len(train_v[0]) == 3 and val_v[0].slice_names == [phantom.slice_names[-1]]
    with pytest.raises(EmsynthError, match="val_block"):
        split_volumes([phantom], 4)


def test_linear_decay_schedule():
    factor = linear_decay(100, 0.5)
    assert [factor(s) for s in (0, 49, 50, 75, 99)] == [1.0, 1.0, 1.0, 0.5, 0.02]


def _metric(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["value"]) for row in csv.DictReader(handle) if row["name"] == name]


def test_tiny_gan_learns_on_a_phantom(tmp_path, phantom):
    """ngf 8, 256 crops, 80 steps: L1 to the real image falls clearly, D stays balanced."""
    cfg = _cfg("engine.steps=80", *GAN_TRAIN_ONLY, "engine.log_every=20")
    train_v, val_v = split_volumes([phantom], 1, gap=0)
    task = GanTask(cfg, train_v, val_v)
    result = train(task, cfg.engine, tmp_path / "run", resume=False)
    l1 = _metric(tmp_path / "run", "train/l1")
    assert len(l1) == 4
    assert l1[-1] < 0.85 * l1[0], l1
    assert result["val/l1"] < 0.27  # an untrained generator (grey output) scores ~0.3
    assert result["val/psnr"] > 14.5
    assert all(np.isfinite([result["d"], result["g_adv"], result["d_real"], result["d_fake"]]))


@pytest.mark.parametrize("adversarial", ["vanilla", "hinge"])
def test_other_losses_and_feature_matching_train(tmp_path, phantom, adversarial):
    cfg = _cfg("engine.steps=3", *GAN_TRAIN_ONLY, "engine.log_every=1",
               f"loss.adversarial={adversarial}", "loss.feature_matching_weight=10")
    result = train(GanTask(cfg, [phantom]), cfg.engine, tmp_path / "run", resume=False)
    assert np.isfinite(result["fm"]) and result["fm"] > 0 and np.isfinite(result["g"])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(module).state_dict().items()}


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in unwrap(module).parameters()]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fm_weight", [0, 10])
def test_each_update_changes_only_its_own_network(phantom, fm_weight):
    """The D step leaves G untouched (fake detached: no gradient reaches G either); the G step
    leaves D untouched (frozen: not even a weight gradient lands in D)."""
    cfg = _cfg("engine.device=cpu", "engine.precision=fp32",
               f"loss.feature_matching_weight={fm_weight}")
    task = GanTask(cfg, [phantom])
    ctx = step_context(cfg.engine)
    task.setup(ctx)
    generator, discriminator = task.modules["generator"], task.modules["discriminator"]
    masks, real = task.sample_batch(np.random.default_rng(0))
    with ctx.autocast():
        fake = generator(masks)
    g_start, d_start = _state(generator), _state(discriminator)

    d_terms = task.update_discriminator(masks, real, fake, ctx)
    assert _same(_state(generator), g_start)
    assert all(p.grad is None for p in generator.parameters())
    d_after = _state(discriminator)
    assert not _same(d_after, d_start)
    assert set(d_terms) == {"d", "d_real", "d_fake"}
    d_grads = _grads(discriminator)
    assert all(g is not None for g in d_grads)

    g_terms = task.update_generator(masks, real, fake, ctx)
    assert _same(_state(discriminator), d_after)
    assert all(torch.equal(a, b) for a, b in zip(_grads(discriminator), d_grads))
    assert all(p.requires_grad for p in discriminator.parameters())
    assert not _same(_state(generator), g_start)
    assert set(g_terms) == {"g_adv", "l1", "g"} | ({"fm"} if fm_weight else set())


class _ModeRecordingGanTask(GanTask):
    """Records, at each step, whether every generator module is in train mode (dropout on)."""

    def setup(self, ctx):
        super().setup(ctx)
        self.train_modes: list[bool] = []

    def train_step(self, batch, ctx):
        generator = unwrap(self.modules["generator"])
        self.train_modes.append(all(m.training for m in generator.modules()))
        return super().train_step(batch, ctx)


def test_generator_back_in_train_mode_after_validation_and_images(tmp_path, phantom):
    """Validation and image logging run G in eval mode every step; each next step and the end
    of training still find G (and its dropout) in train mode."""
    cfg = _cfg("engine.steps=3", "engine.checkpoint_every=0", "engine.val_every=1",
               "engine.image_every=1", "engine.log_every=1", "engine.device=cpu")
    train_v, val_v = split_volumes([phantom], 1, gap=0)
    task = _ModeRecordingGanTask(cfg, train_v, val_v)
    result = train(task, cfg.engine, tmp_path / "run", resume=False)
    assert task.train_modes == [True, True, True]
    generator = unwrap(task.modules["generator"])
    assert all(m.training for m in generator.modules())
    assert np.isfinite(result["val/l1"])
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == [
        f"samples_{s:08d}.png" for s in (1, 2, 3)]


class _InterruptedGanTask(GanTask):
    """Sends itself SIGINT after `stop_after` steps: the engine checkpoints and returns."""

    stop_after = 3

    def train_step(self, batch, ctx):
        losses = super().train_step(batch, ctx)
        self.stop_after -= 1
        if self.stop_after == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return losses


def test_resume_is_exact_and_images_are_written(tmp_path, phantom):
    """6 steps straight == 3 steps, interrupted, then resumed (LR decay from step 3 on)."""
    common = ["engine.steps=6", "engine.deterministic=true", "engine.precision=fp32",
              "engine.val_every=0", "engine.log_every=1", "optim.decay_start=0.5"]
    straight = _cfg(*common, "engine.checkpoint_every=0", "engine.image_every=0")
    train(GanTask(straight, [phantom]), straight.engine, tmp_path / "a", resume=False)

    cfg = _cfg(*common, "engine.checkpoint_every=0", "engine.image_every=2")
    first = train(_InterruptedGanTask(cfg, [phantom]), cfg.engine, tmp_path / "b", resume=False)
    assert first["stop_reason"] == "signal:SIGINT" and first["step"] == 3
    result = train(GanTask(cfg, [phantom]), cfg.engine, tmp_path / "b", resume=True)
    assert result["step"] == 6

    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000006.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000006.pt")
    for module in ("generator", "discriminator"):
        for key, tensor in a["modules"][module].items():
            assert torch.equal(tensor, b["modules"][module][key]), (module, key)
    assert a["schedulers"]["generator"]["last_epoch"] == 6
    assert b["schedulers"]["generator"]["last_epoch"] == 6
    moments_a = a["optimizers"]["discriminator"]["state"]
    moments_b = b["optimizers"]["discriminator"]["state"]
    assert all(torch.equal(moments_a[k]["exp_avg"], moments_b[k]["exp_avg"]) for k in moments_a)

    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == [
        "samples_00000002.png", "samples_00000004.png", "samples_00000006.png"]
    grid = iio.imread(tmp_path / "b" / "images" / "samples_00000006.png")
    # 4 rows of 256 + 3 gaps; columns: 2 masks, real, synthetic
    assert grid.shape == (4 * 256 + 3 * 4, 4 * 256 + 3 * 4) and grid.dtype == np.uint8


def test_train_gan_exports_a_loadable_generator(tmp_path):
    cfg = _cfg("engine.steps=2", *GAN_TRAIN_ONLY)
    result = train_gan(cfg, tmp_path / "run", resume=False)
    assert result["generator"] == str(tmp_path / "run" / GENERATOR_FILE)
    generator, conditioning, meta = load_generator(tmp_path / "run")
    assert conditioning.channels == (MITO, MEMBRANE) and conditioning.mask_range == "-1,1"
    assert generator.ngf == 8 and meta["step"] == 2


def test_cli_train_then_synthesize(tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["gan", "train", "-c", str(GAN_TINY), "-o", str(run_dir),
                              "--steps", "2", "--set", "engine.image_every=0",
                              "--set", "engine.val_every=0"])
    assert res.exit_code == 0, res.output
    assert (run_dir / GENERATOR_FILE).is_file() and "generator:" in res.output

    masks_dir = tmp_path / "masks"
    from emsynth.data.writers import write_slice_folder

    write_slice_folder(generate_volume("vnc", 2, (300, 260), seed=5), masks_dir)
    out = tmp_path / "synthetic"
    res = runner.invoke(app, ["gan", "synthesize", "-m", str(run_dir), "--masks", str(masks_dir),
                              "-o", str(out), "--device", "cpu", "--no-dropout"])
    assert res.exit_code == 0, res.output
    from emsynth.data.readers import read_volume

    synthetic = read_volume(out, "slices")
    assert synthetic.shape == (2, 300, 260)
    assert set(synthetic.labels) == {MITO, MEMBRANE}
    assert synthetic.image.std() > 0


def test_cli_missing_model_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope"
    done = subprocess.run(
        [sys.executable, "-m", "emsynth.cli", "gan", "synthesize", "-m", str(missing),
         "--masks", str(tmp_path), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "Fix: " in lines[0]


def test_real_vnc_crops_keep_masks_registered(shared_data):
    """On the real Drosophila VNC slices, membrane pixels of a crop are darker than the rest,
    and mitochondria darker than cytoplasm, whatever the flip/rotation drawn."""
    from emsynth.data.readers import read_volume

    volume = read_volume(shared_data / "drosophila_vnc", "vnc", indices=[0, 1])
    task = GanTask(_cfg(), [volume])
    pairs = [task.sample_batch(np.random.default_rng(s)) for s in range(8)]
    masks = torch.cat([m for m, _ in pairs])
    pixels = torch.cat([i[:, 0] for _, i in pairs])
    mito, membrane = masks[:, 0] > 0, masks[:, 1] > 0
    rest = ~mito & ~membrane
    assert pixels[membrane].mean() < pixels[rest].mean() - 0.2
    assert pixels[mito].mean() < pixels[rest].mean()
