"""GAN options beyond the spec (issue 12): decoder noise, SPADE, G:D ratio, D scales and
spectral norm, per-class L1, DiffAugment, the mask-consistency loss; the spec stays default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import GAN_TINY, GAN_TRAIN_ONLY, unet_micro

from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.engine import train
from emsynth.engine.checkpoint import unwrap
from emsynth.engine.task import step_context
from emsynth.errors import EmsynthError
from emsynth.gan.augment import diff_augment
from emsynth.gan.config import GanConfig, stored_config
from emsynth.gan.export import export_generator, load_generator
from emsynth.gan.inference import synthesize_volume
from emsynth.gan.losses import discriminator_loss, generator_adversarial_loss, weighted_l1
from emsynth.gan.networks import (
    MultiScaleDiscriminator,
    SPADEGenerator,
    UNetGenerator,
    build_generator,
)
from emsynth.gan.task import GanTask
from emsynth.gan.train import train_gan
from emsynth.segment.config import ModelConfig
from emsynth.segment.model import Segmenter, build_model

CPU = ("engine.device=cpu", "engine.precision=fp32")


@pytest.fixture(scope="module")
def phantom() -> Volume:
    return generate_volume("vnc", 4, (256, 320), seed=3)


def _cfg(*overrides: str) -> GanConfig:
    return load_config(GanConfig, GAN_TINY, list(overrides))


def _task(phantom: Volume, *overrides: str) -> tuple[GanTask, object]:
    cfg = _cfg(*CPU, *overrides)
    task = GanTask(cfg, [phantom])
    ctx = step_context(cfg.engine)
    task.setup(ctx)
    return task, ctx


# --- config -----------------------------------------------------------------------------------

def test_defaults_are_the_spec_and_stored_config_has_no_added_keys():
    cfg = GanConfig()
    assert cfg.model.arch == "unet" and cfg.model.decoder_noise == 0
    assert not cfg.model.spectral_norm and cfg.model.d_downsample
    assert cfg.optim.g_steps_per_d == 1 and cfg.diffaugment.policy == []
    assert cfg.loss.class_l1_weights == {} and cfg.loss.scale_weights is None
    stored = stored_config(cfg)
    assert "diffaugment" not in stored and "arch" not in stored["model"]
    assert "g_steps_per_d" not in stored["optim"] and "scale_weights" not in stored["loss"]
    changed = stored_config(_cfg("model.arch=spade", "optim.g_steps_per_d=2"))
    assert changed["model"]["arch"] == "spade" and changed["optim"]["g_steps_per_d"] == 2


@pytest.mark.parametrize("overrides, message", [
    (["model.noise_sigma=0.1"], "noise_sigma"),
    (["model.arch=pix2pixhd"], "arch"),
    (["loss.class_l1_weights={synapse: 2}"], "not in data.channels"),
    (["loss.class_l1_weights={mito: 0}"], "must be > 0"),
    (["loss.scale_weights=[0.5, 0.5]"], "n_scales=3"),
    (["loss.consistency_weight=1"], "consistency_segmenter"),
    (["optim.g_steps_per_d=0"], "g_steps_per_d"),
    (["diffaugment.policy=[rotate]"], "policy"),
])
def test_bad_options_are_rejected(overrides, message):
    with pytest.raises(EmsynthError, match=message):
        _cfg(*overrides)


# --- decoder noise ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["unet", "spade"])
def test_decoder_noise_changes_output_and_a_seed_reproduces_it(arch):
    torch.manual_seed(0)
    noisy = build_generator(arch, 2, 8, noise=0.5).eval()
    quiet = build_generator(arch, 2, 8, noise=0.0).eval()
    quiet.load_state_dict(noisy.state_dict())  # noise has no parameters
    x = torch.rand(1, 2, 256, 256) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        a = noisy(x)
        torch.manual_seed(1)
        b = noisy(x)
        c = noisy(x)  # next draws
        torch.manual_seed(1)
        q = quiet(x)
    assert torch.equal(a, b) and not torch.equal(a, c)  # on in eval mode too
    assert not torch.allclose(a, q, atol=1e-4)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        quiet(x)
    assert torch.equal(state, torch.random.get_rng_state())  # sigma 0 draws nothing


def test_synthesis_with_noise_is_seeded(phantom):
    torch.manual_seed(0)
    generator = UNetGenerator(2, 1, 8, noise=0.3)
    masks = phantom.select([0])
    one = synthesize_volume(generator, masks, dropout=False, seed=4).image
    same = synthesize_volume(generator, masks, dropout=False, seed=4).image
    other = synthesize_volume(generator, masks, dropout=False, seed=5).image
    assert np.array_equal(one, same) and not np.array_equal(one, other)


# --- SPADE ------------------------------------------------------------------------------------

def test_spade_shapes_train_export_and_synthesize(tmp_path, phantom):
    generator = SPADEGenerator(2, 1, 4)
    with torch.no_grad():
        y = generator(torch.zeros(2, 2, 256, 512))
    assert y.shape == (2, 1, 256, 512) and y.abs().max() <= 1
    cfg = _cfg("engine.steps=3", *GAN_TRAIN_ONLY, *CPU, "model.arch=spade",
               "model.decoder_noise=0.1", "engine.log_every=1")
    result = train_gan(cfg, tmp_path / "run", resume=False, volumes=[phantom])
    assert np.isfinite(result["g"]) and np.isfinite(result["d"]) and result["step"] == 3
    loaded, conditioning, meta = load_generator(tmp_path / "run")
    assert isinstance(loaded, SPADEGenerator) and loaded.noise == 0.1
    assert meta["arch"] == "spade" and conditioning.channels == (MITO, MEMBRANE)
    # The checkpoint fallback rebuilds the same network as the export.
    (tmp_path / "run" / "generator.safetensors").unlink()
    cfg2 = _cfg("engine.steps=2", "engine.checkpoint_every=2", "engine.val_every=0",
                "engine.image_every=0", *CPU, "model.arch=spade")
    train(GanTask(cfg2, [phantom]), cfg2.engine, tmp_path / "ck", resume=False)
    from_ckpt, _, info = load_generator(tmp_path / "ck")
    assert isinstance(from_ckpt, SPADEGenerator) and info["step"] == 2
    # Whole slices of any size.
    synthetic = synthesize_volume(loaded, phantom.select([0, 1]), conditioning, seed=0)
    assert synthetic.shape == (2, 256, 320) and synthetic.image.std() > 0


def test_export_round_trip_keeps_outputs(tmp_path, phantom):
    for arch in ("unet", "spade"):
        torch.manual_seed(0)
        generator = build_generator(arch, 2, 4, noise=0.2)
        from emsynth.gan.data import Conditioning

        path = export_generator(tmp_path / f"{arch}.safetensors", generator,
                                Conditioning((MITO, MEMBRANE)))
        loaded, _, meta = load_generator(path)
        assert type(loaded) is type(generator) and meta["decoder_noise"] == 0.2
        a = synthesize_volume(generator, phantom.select([0]), seed=1).image
        b = synthesize_volume(loaded, phantom.select([0]), seed=1).image
        assert np.array_equal(a, b), arch


# --- resize upsampling -------------------------------------------------------------------------

def _checkerboard(image: torch.Tensor) -> float:
    """Share of the image's power at the period-2 frequencies (the transposed convolution's
    checkerboard), of the power outside the DC term."""
    power = torch.fft.fft2(image - image.mean()).abs() ** 2
    h, w = image.shape
    return float((power[h // 2, :].sum() + power[:, w // 2].sum()) / power.sum())


@pytest.mark.parametrize("upsample", ["resize", "bilinear"])
def test_resize_upsampling_has_no_transposed_convolutions_and_no_checkerboard(upsample):
    """The option swaps every decoder transposed conv for resize + 3x3 conv (the spec keeps
    them), and at initialisation a constant mask gives a resize generator no period-2 pattern
    while the spec's transposed convolutions draw one (Odena et al. 2016)."""
    torch.manual_seed(0)
    spec, resize = build_generator("unet", 2, 8), build_generator("unet", 2, 8, upsample=upsample)
    assert spec.upsample == "transpose" and resize.upsample == upsample
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in spec.modules()) == 8
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in resize.modules())
    x = torch.ones(1, 2, 256, 256)
    with torch.no_grad():
        a, b = spec.eval()(x)[0, 0], resize.eval()(x)[0, 0]
    assert b.shape == a.shape == (256, 256)
    assert _checkerboard(a) > 10 * _checkerboard(b), (_checkerboard(a), _checkerboard(b))
    assert stored_config(_cfg(f"model.upsample={upsample}"))["model"]["upsample"] == upsample
    assert "upsample" not in stored_config(_cfg())["model"]  # runs before the option resume
    with pytest.raises(EmsynthError, match="upsample"):
        _cfg("model.upsample=bicubic")


@pytest.mark.parametrize("upsample", ["resize", "bilinear"])
def test_resize_generator_trains_exports_and_reloads_the_same_network(tmp_path, phantom,
                                                                      upsample):
    cfg = _cfg("engine.steps=2", *GAN_TRAIN_ONLY, *CPU, f"model.upsample={upsample}")
    train_gan(cfg, tmp_path / "run", resume=False, volumes=[phantom])
    loaded, conditioning, meta = load_generator(tmp_path / "run")
    assert meta["upsample"] == upsample and loaded.upsample == upsample
    # the bioimage.io module rebuilds it from its plain kwargs, with the same outputs
    from emsynth.export.bioimageio import exported_generator

    module, kwargs = exported_generator(loaded, conditioning, dropout=False)
    assert kwargs["upsample"] == upsample
    crop = {k: v[:1, :256, :256] for k, v in phantom.labels.items()}
    expected = synthesize_volume(loaded, Volume(np.zeros((1, 256, 256), np.uint8), crop),
                                 conditioning, dropout=False, precision="fp32").image
    masks = torch.from_numpy(np.stack([crop[c] for c in conditioning.channels], 1) * 1.0)
    got = np.rint(module(masks)[0, 0].numpy() * 255)
    assert np.abs(got - expected[0]).max() <= 1


# --- G:D ratio --------------------------------------------------------------------------------

class _CountingTask(GanTask):
    def setup(self, ctx):
        super().setup(ctx)
        self.calls = {"d": 0, "g": 0}

    def update_discriminator(self, *args, **kwargs):
        self.calls["d"] += 1
        return super().update_discriminator(*args, **kwargs)

    def update_generator(self, *args, **kwargs):
        self.calls["g"] += 1
        return super().update_generator(*args, **kwargs)


@pytest.mark.parametrize("ratio", [1, 3])
def test_g_steps_per_d_counts(tmp_path, phantom, ratio):
    cfg = _cfg("engine.steps=2", *GAN_TRAIN_ONLY, *CPU, f"optim.g_steps_per_d={ratio}")
    task = _CountingTask(cfg, [phantom])
    train(task, cfg.engine, tmp_path / "run", resume=False)
    assert task.calls == {"d": 2, "g": 2 * ratio}
    adam_steps = {name: {int(s["step"]) for s in opt.state.values()}
                  for name, opt in task.optimizers.items()}
    assert adam_steps == {"discriminator": {2}, "generator": {2 * ratio}}
    assert task.schedulers["generator"].last_epoch == 2  # the LR schedule follows engine steps


# --- discriminator: scales, weights, spectral norm ---------------------------------------------

def test_scale_weights_weight_each_scale():
    real = [torch.randn(1, 1, 6, 6), torch.randn(1, 1, 3, 3)]
    fake = [torch.randn(1, 1, 6, 6), torch.randn(1, 1, 3, 3)]
    for mode in ("lsgan", "vanilla", "hinge"):
        per_scale = [discriminator_loss([r], [f], mode) for r, f in zip(real, fake)]
        weighted = discriminator_loss(real, fake, mode, [0.25, 2.0])
        assert weighted == pytest.approx(float(0.25 * per_scale[0] + 2.0 * per_scale[1]))
        mean = discriminator_loss(real, fake, mode)
        assert mean == pytest.approx(float(discriminator_loss(real, fake, mode, [0.5, 0.5])))
        g = generator_adversarial_loss(fake, mode, [1.0, 0.0])
        assert g == pytest.approx(float(generator_adversarial_loss(fake[:1], mode)))


def test_full_resolution_scales_and_spectral_norm(phantom):
    x = torch.randn(1, 3, 64, 64)
    full = MultiScaleDiscriminator(3, 4, 2, downsample=False)
    assert [f[-1].shape for f in full(x)] == [f[-1].shape for f in full(x)[:1]] * 2
    pooled = MultiScaleDiscriminator(3, 4, 2)
    assert pooled(x)[1][-1].shape[-1] < pooled(x)[0][-1].shape[-1]
    sn = MultiScaleDiscriminator(3, 4, 2, spectral_norm=True)
    convs = [m for m in sn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    task, ctx = _task(phantom, "model.spectral_norm=true", "model.n_scales=2",
                      "model.d_downsample=false", "loss.scale_weights=[0.5, 0.5]")
    losses = task.train_step(task.sample_batch(np.random.default_rng(0)), ctx)
    assert all(np.isfinite(v) for v in losses.values())
    # Spectral norm bounds each convolution's largest singular value by about 1.
    conv = [m for m in unwrap(task.modules["discriminator"]).modules()
            if isinstance(m, torch.nn.Conv2d)][1]
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert float(sigma) < 1.2


# --- per-class L1 -----------------------------------------------------------------------------

def test_class_weight_map_and_weighted_l1(phantom):
    task, ctx = _task(phantom, "loss.class_l1_weights={membrane: 2, mito: 4}")
    masks = -torch.ones(1, 2, 4, 4)
    masks[0, 0, 0, 0] = 1  # mito
    masks[0, 1, 0, 1] = 1  # membrane
    masks[0, :, 0, 2] = 1  # both: the larger weight
    weight = task.class_weight_map(masks)[0, 0]
    assert weight[0, :4].tolist() == [4, 2, 4, 1] and float(weight[1:].max()) == 1
    fake, real = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert float(weighted_l1(fake, real, task.class_weight_map(masks))) == pytest.approx(
        (4 + 2 + 4 + 13) / 16)
    losses = task.train_step(task.sample_batch(np.random.default_rng(0)), ctx)
    assert losses["l1_weighted"] > losses["l1"] > 0


# --- DiffAugment ------------------------------------------------------------------------------

def test_diffaugment_keeps_pairs_registered_and_spares_masks():
    torch.manual_seed(0)
    mask = (torch.rand(4, 1, 32, 32) > 0.5).float() * 2 - 1
    pairs = torch.cat([mask, mask.clone()], 1)  # image = mask, to see the registration
    assert diff_augment(pairs, []) is pairs
    shifted = diff_augment(pairs, ["translation"], translation=0.25)
    assert torch.equal(shifted[:, 0], shifted[:, 1]) and not torch.equal(shifted, pairs)
    image_only = diff_augment(pairs, ["colour", "cutout"], cutout=0.5)
    assert torch.equal(image_only[:, 0], pairs[:, 0])
    assert not torch.equal(image_only[:, 1], pairs[:, 1])
    cut = diff_augment(torch.ones(2, 2, 16, 16), ["cutout"], cutout=0.5)
    # An 8x8 square centred anywhere (DiffAugment's cutout may overhang the border).
    zeroed = (cut[:, 1] == 0).sum(dim=(1, 2))
    assert bool(((zeroed > 0) & (zeroed <= 64)).all()) and bool((cut[:, 0] == 1).all())
    x = pairs.clone().requires_grad_(True)
    diff_augment(x, ["translation", "colour", "cutout"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diffaugment_trains(phantom):
    task, ctx = _task(phantom, "diffaugment.policy=[translation, colour, cutout]")
    losses = task.train_step(task.sample_batch(np.random.default_rng(0)), ctx)
    assert all(np.isfinite(v) for v in losses.values())


# --- mask consistency -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ModelConfig(**unet_micro())
    segmenter = Segmenter(net=build_model(model, 1), model=model, channel_names=["image"],
                          target_name=MITO)
    return segmenter.save(tmp_path_factory.mktemp("seg") / "model")


def test_consistency_segmenter_stays_frozen_and_g_learns_from_it(tmp_path, phantom,
                                                               segmenter_dir):
    cfg = _cfg("engine.steps=2", *GAN_TRAIN_ONLY, *CPU, "engine.log_every=1",
               "loss.consistency_weight=5", f"loss.consistency_segmenter={segmenter_dir}")
    task = GanTask(cfg, [phantom])
    result = train(task, cfg.engine, tmp_path / "run", resume=False)
    net = task.consistency_net.net
    reference = Segmenter.load(segmenter_dir).net.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())
    assert not net.training and not any(m.training for m in net.modules())
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert "consistency" not in task.modules and 0 <= result["consistency"] <= 1
    # Its gradient reaches G: with every other term off, the consistency loss alone moves G.
    task, ctx = _task(phantom, "loss.l1_weight=0", "loss.consistency_weight=1",
                      f"loss.consistency_segmenter={segmenter_dir}")
    generator = unwrap(task.modules["generator"])
    masks, real = task.sample_batch(np.random.default_rng(0))
    fake = generator(masks)
    loss = task.update_generator(masks, real, fake, ctx)["consistency"]
    assert loss.requires_grad is False or loss.grad_fn is not None
    grads = [p.grad for p in generator.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ["unet", "spade"])
def test_han_et_al_combination_trains(tmp_path, phantom, segmenter_dir, arch):
    """Every option at once (Han et al.'s recipe plus the rest): the terms stay finite."""
    cfg = _cfg("engine.steps=2", *GAN_TRAIN_ONLY, *CPU, "engine.log_every=1",
               f"model.arch={arch}", "model.decoder_noise=0.1", "model.n_scales=2",
               "model.d_downsample=false", "model.spectral_norm=true", "loss.l1_weight=10",
               "loss.class_l1_weights={membrane: 2, mito: 4}", "loss.scale_weights=[0.5, 0.5]",
               "loss.feature_matching_weight=10", "optim.g_steps_per_d=2",
               "loss.consistency_weight=1", f"loss.consistency_segmenter={segmenter_dir}",
               "diffaugment.policy=[translation, colour, cutout]")
    result = train(GanTask(cfg, [phantom]), cfg.engine, tmp_path / "run", resume=False)
    for key in ("d", "g", "g_adv", "l1", "l1_weighted", "fm", "consistency"):
        assert np.isfinite(result[key]), key
