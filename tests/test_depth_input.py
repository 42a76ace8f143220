"""How depth reaches a 3D method: point maps as channels 3-5 of the image tensor.

A model of a method with ``uses_depth`` gets a `Preprocess` with ``depth=True``; its tensors
are then colour (normalised) + the sample's point map, nearest-resampled to the same
geometry and kept in float32 (also in the ImageSet's cache). Other methods never see them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _dummy import PixelZScore
from iadkit.data.point_maps import PointMapSample, point_map_of
from iadkit.data.transforms import ImageSet, Preprocess
from iadkit.errors import DatasetLayoutError, InvalidParameterError
from iadkit.methods.base import register, split_depth
from iadkit.model import Model
from iadkit.types import GOOD, Prediction, Sample


def _xyz(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyz = np.stack(np.meshgrid(np.linspace(-0.05, 0.05, w), np.linspace(-0.05, 0.05, h)), -1)
    z = 0.3 + 1e-4 * rng.standard_normal((h, w))  # 0.1 mm noise: lost in float16
    out = np.concatenate([xyz, z[..., None]], -1).astype(np.float32)
    out[0, 0] = 0.0  # a missing point
    return out


def test_preprocess_depth_round_trips_and_resamples_nearest() -> None:
    pp = Preprocess(image_size=(8, 8), depth=True)
    assert Preprocess.from_dict(pp.to_dict()) == pp and pp.tensor_channels == 6
    assert Preprocess.from_dict({**Preprocess(image_size=8).to_dict()}).depth is False
    old = Preprocess(image_size=8).to_dict()
    del old["depth"]  # a manifest written before depth existed
    assert Preprocess.from_dict(old).depth is False
    xyz = _xyz(16, 16)
    out = pp.point_map(xyz)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    # nearest: every output value is one of the input points, bit for bit
    expected = torch.from_numpy(xyz).permute(2, 0, 1)[:, ::2, ::2]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(InvalidParameterError):
        Preprocess(depth="yes")  # type: ignore[arg-type]


def test_imageset_appends_the_point_map_in_float32_also_from_its_cache() -> None:
    img = np.full((16, 16, 3), 100, np.uint8)
    xyz = _xyz(16, 16)
    s = PointMapSample(path="mem://a", label=GOOD, image=img, xyz=xyz)
    pp = Preprocess(image_size=(16, 16), depth=True)
    ds = ImageSet([s], pp, cache=True)
    first, second = ds.image(0), ds.image(0)  # the second comes from the cache
    assert first.shape == (6, 16, 16)
    rgb, pts = split_depth(first[None])
    torch.testing.assert_close(pts[0], torch.from_numpy(xyz).permute(2, 0, 1), rtol=0, atol=0)
    torch.testing.assert_close(second[3:], first[3:], rtol=0, atol=0)
    torch.testing.assert_close(rgb[0], pp(img), rtol=0, atol=2e-3)  # colour cached as float16
    # a colour-only preprocessing ignores the point map
    assert ImageSet([s], Preprocess(image_size=(16, 16))).image(0).shape == (3, 16, 16)
    with pytest.raises(InvalidParameterError, match="6"):
        split_depth(first[None, :3])


def test_point_map_of_finds_the_mvtec3d_sibling_or_says_what_is_missing(tmp_path) -> None:
    import tifffile
    from PIL import Image

    rgb_dir, xyz_dir = tmp_path / "good" / "rgb", tmp_path / "good" / "xyz"
    rgb_dir.mkdir(parents=True)
    xyz_dir.mkdir()
    xyz = _xyz(12, 10)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(rgb_dir / "000.png")
    tifffile.imwrite(xyz_dir / "000.tiff", xyz, photometric="rgb")
    found = point_map_of(Sample(path=str(rgb_dir / "000.png")), shape=(12, 10))
    np.testing.assert_array_equal(found, xyz)
    with pytest.raises(DatasetLayoutError, match="uses depth"):
        point_map_of(Sample(path=str(tmp_path / "elsewhere.png")))
    with pytest.raises(DatasetLayoutError, match="point map"):
        point_map_of(Sample(path="array://0", image=np.zeros((4, 4, 3), np.uint8)))


@register
class DepthZScore(PixelZScore):
    """The z-score test detector on colour + depth channels (a depth method for these tests)."""

    name = "test_depth_zscore"
    uses_depth = True

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        self.seen_channels = {int(b.images.shape[1]) for b in train.batches(4)}
        super()._fit(train, progress=progress)

    def _predict(self, images: torch.Tensor) -> Prediction:
        split_depth(images)  # refuses anything but [B, 6, H, W]
        return super()._predict(images)


def test_a_depth_model_gets_point_maps_in_fit_predict_and_after_loading(tmp_path) -> None:
    assert Model.create("patchcore", image_size=16).preprocess.depth is False
    model = Model.create("test_depth_zscore", image_size=16)
    assert model.preprocess.depth is True
    train = [
        PointMapSample(path=f"mem://t{i}", label=GOOD, image=np.full((16, 16, 3), 90, np.uint8), xyz=_xyz(16, 16, i))
        for i in range(4)
    ]
    bumped = _xyz(16, 16, 9)
    bumped[6:10, 6:10, 2] -= 0.002  # a 2 mm bump, invisible in the colour image
    test = [
        PointMapSample(path="mem://good", label=GOOD, image=np.full((16, 16, 3), 90, np.uint8), xyz=_xyz(16, 16, 8)),
        PointMapSample(path="mem://bump", label=1, image=np.full((16, 16, 3), 90, np.uint8), xyz=bumped),
    ]
    model.fit(train, calibration_fraction=0.0, progress=False)
    assert model.detector.seen_channels == {6}
    scores = model.predict(test).scores
    assert scores[1] > 3 * scores[0]  # only depth tells them apart
    loaded = Model.load(model.save(tmp_path / "depth.iad"))
    assert loaded.preprocess.depth is True
    np.testing.assert_array_equal(loaded.predict(test).scores, scores)
    with pytest.raises(DatasetLayoutError, match="uses depth"):
        model.predict([np.full((16, 16, 3), 90, np.uint8)])  # an array has no point map
