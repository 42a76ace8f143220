"""The paper configuration is one switch away: ``Model.create(name, paper=True, weights_path=...)``
builds each method on its paper's backbone, layers and schedule. The wiring is tested with a
random-weights WideResNet-50 written to a file (the real torchvision file is the user's to
download; nothing is downloaded here), at a tiny input size."""

from __future__ import annotations

import pytest
import torch

from _helpers import built
from iadkit.methods import available_methods
from iadkit.model import Model


@pytest.fixture(scope="module")
def wrn50_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "wide_resnet50_2-random.pth"
    torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), path)
    return path


def test_every_trained_method_declares_its_paper_configuration():
    for name, cls in available_methods().items():
        if not cls.__module__.startswith("iadkit.methods."):
            continue
        assert cls.paper_params, f"{name} has no paper configuration"
        det = cls(**cls.paper_params)
        det.validate()  # the paper's configuration is valid here (weights aside)


@pytest.mark.parametrize(
    "name, channels",
    [
        ("stfpm", None),  # ResNet-18 in the paper: checked by layer names below
        ("reverse_distillation", [256, 512, 1024]),
        ("padim", [256, 512, 1024]),
        ("patchcore", [512, 1024]),
    ],
)
def test_paper_layers_follow_the_backbone(name, channels, wrn50_file, monkeypatch, synthetic):
    monkeypatch.setenv("IADKIT_ALLOW_UNLISTED_WEIGHTS", "1")
    cls = available_methods()[name]
    backbone = cls.paper_params["backbone"]
    if backbone != "wide_resnet50_2":
        det = cls(**cls.paper_params)
        assert det.tapped_layers() == ["layer1", "layer2", "layer3"]  # ResNet-18 conv2_x-conv4_x
        return
    quick = {"epochs": 1} if "epochs" in cls.param_names() else {}
    model = Model.create(name, paper=True, image_size=64, weights_path=str(wrn50_file), **quick)
    assert model.preprocess.image_size == (64, 64)
    assert Model.create(name, paper=True).preprocess.image_size == (cls.paper_image_size,) * 2
    det = model.detector
    assert det.backbone == "wide_resnet50_2" and det.layer_channels() == channels
    assert det.tapped_layers() == (["layer1", "layer2", "layer3"] if len(channels) == 3 else ["layer2", "layer3"])
    if name != "reverse_distillation":
        return  # one end-to-end fit on the 270 MB WideResNet is enough for the suite
    train = synthetic("metal").train[:4]
    model.fit(train, calibration_fraction=0, progress=False)
    result = model.predict(synthetic("metal").test[:2])
    assert result.scores.shape == (2,) and result.maps.shape == (2, 64, 64)
    if name == "reverse_distillation":
        assert det.bottleneck_.embed_channels == 2048  # the paper's OCE width
        assert [len(stage) for stage in det.decoder_.stages] == [3, 4, 6]  # the official decoder depths


def test_rd4ad_paper_decoder_shapes_with_a_random_wrn50(wrn50_file, monkeypatch):
    monkeypatch.setenv("IADKIT_ALLOW_UNLISTED_WEIGHTS", "1")
    det = built(
        available_methods()["reverse_distillation"](
            **{**available_methods()["reverse_distillation"].paper_params, "weights_path": str(wrn50_file)}
        )
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        enc = det.features(x)
        dec = det.decoder_(det.bottleneck_(enc))
    assert [tuple(e.shape[1:]) for e in enc] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    assert [d.shape for d in dec] == [e.shape for e in enc]
