import pytest
from pydantic import Field

from emsynth.config import StrictModel, load_config
from emsynth.errors import EmsynthError


class Train(StrictModel):
    steps: int = 10
    lr: float = 1e-3


class Cfg(StrictModel):
    name: str = "x"
    train: Train = Field(default_factory=Train)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\ntrain:\n  steps: 5\n")
    cfg = load_config(Cfg, p, ["train.lr=0.5"])
    assert cfg.name == "run" and cfg.train.steps == 5 and cfg.train.lr == 0.5


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepz: 5\n")
    with pytest.raises(EmsynthError, match="unknown config key 'train.stepz'"):
        load_config(Cfg, p)


def test_bad_value_and_bad_override(tmp_path):
    with pytest.raises(EmsynthError, match="train.steps"):
        load_config(Cfg, None, ["train.steps=many"])
    with pytest.raises(EmsynthError, match="key=value"):
        load_config(Cfg, None, ["train.steps"])


def test_atomic_writes_get_normal_permissions_and_leave_no_temp(tmp_path):
    import os

    from emsynth.io import _UMASK, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_UMASK)
    assert os.listdir(tmp_path) == ["out.txt"]


def test_stage_presets_load_with_their_typed_configs():
    from pathlib import Path

    from emsynth.membranes.config import MembraneConfig
    from emsynth.segment.config import SegmentConfig
    from emsynth.study.config import StudyConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for folder, model in (("segment", SegmentConfig), ("membranes", MembraneConfig),
                          ("study", StudyConfig)):
        presets = sorted((root / folder).glob("*.yaml"))
        assert presets, folder
        for preset in presets:
            load_config(model, preset)


def test_tstr_recipes_are_the_cpu_segment_preset_but_for_intensity_augmentation():
    """cpu_jitter / _intensity / _noise are copies of cpu.yaml for TSTR: they must not drift from it
    in anything but the intensity augmentation they exist for."""
    from pathlib import Path

    from emsynth.segment.config import SegmentConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "segment"
    base = load_config(SegmentConfig, root / "cpu.yaml").model_dump()
    assert (base["augment"].pop("intensity_prob"), base["augment"].pop("noise_prob")) == (0, 0)
    for name, intensity, noise in (("cpu_jitter.yaml", 0.8, 0.5), ("cpu_intensity.yaml", 0.8, 0.0),
                                   ("cpu_noise.yaml", 0.0, 0.5)):
        recipe = load_config(SegmentConfig, root / name).model_dump()
        assert recipe["augment"].pop("intensity_prob") == intensity
        assert recipe["augment"].pop("noise_prob") == noise
        assert recipe == base, name


def test_composed_augmentation_keeps_the_dumped_keys_study_cells_hash():
    """Study cell keys hash these dumps: composing the classes must not rename a key."""
    from emsynth.segment.config import AugmentConfig, GeometryConfig
    from emsynth.study.config import MembraneSourceConfig, SynthesisConfig

    geometry = {"dihedral", "elastic_prob", "elastic_sigma", "elastic_spacing", "rotate_prob",
                "scale_range"}
    assert set(GeometryConfig().model_dump()) == geometry
    assert set(AugmentConfig().model_dump()) == geometry | {
        "noise_prob", "noise_std", "intensity_prob", "brightness", "contrast", "gamma"}
    synthesis = SynthesisConfig()
    assert synthesis.model_dump() == {
        "count": 64, "size": 256, "masks": "real", "elastic_sigma": 10.0, "elastic_spacing": 64,
        "scale_range": 0.1, "procedural_domain": "ca1", "procedural_fit": True, "dropout": True,
        # added with the remodel layout; left out of the GAN cell key at these defaults
        "count_per_slice": None, "remodel_jitter": 4.0, "remodel_scale": 0.2,
        "remodel_spacing": 20, "pixel_noise": 0.0}  # and pixel noise, added later
    with pytest.raises(ValueError, match="scale_range"):
        SynthesisConfig(scale_range=1.0)
    assert set(MembraneSourceConfig().model_dump()) == {
        "source", "model_dir", "train_config", "folder", "threshold", "thin_width"}


def test_the_three_stages_load_one_phantom_section_to_the_same_volume(monkeypatch):
    """Membranes, GAN and study embed the same `phantom` section and load it through
    PhantomConfig.generate: equal values give the byte-identical volume of generate_volume."""
    import numpy as np

    from emsynth.data.phantom import PhantomConfig, generate_volume
    from emsynth.gan.config import GanConfig
    from emsynth.gan.train import load_volumes
    from emsynth.membranes.config import MembraneConfig
    from emsynth.membranes.task import load_training_volume
    from emsynth.study.config import StudyConfig
    from emsynth.study.data import load_source

    calls = []
    generate = PhantomConfig.generate
    monkeypatch.setattr(PhantomConfig, "generate", lambda self: calls.append(self) or generate(self))
    spec = {"domain": "ca1", "slices": 2, "size": 256, "seed": 3}  # 256: the GAN's crop
    volumes = [
        load_training_volume(MembraneConfig.model_validate({"data": {"phantom": spec}})),
        load_volumes(GanConfig.model_validate({"data": {"phantom": spec}}))[0],
        load_source(StudyConfig.model_validate(
            {"data": {"phantom": spec}, "regimes": [{"name": "a", "slices": 1}]}).data).volume,
    ]
    assert calls == [PhantomConfig(**spec)] * 3
    expected = generate_volume("ca1", 2, (256, 256), seed=3)
    for volume in volumes:
        assert volume.source == expected.source == "phantom:ca1:seed=3"
        assert volume.image.tobytes() == expected.image.tobytes()
        assert sorted(volume.labels) == sorted(expected.labels)
        for name, labels in expected.labels.items():
            assert np.array_equal(volume.labels[name], labels)
