"""anomalib 2.7.0 side of bench/trained_perf.py. Runs inside bench/.anomalib-venv; never imports iadkit.

One call = one (method, data set): build anomalib's *torch* model, train it in a plain loop that reproduces
its Lightning module's `training_step` and `configure_optimizers` (no Lightning, no datamodule), predict the
test set, write scores (and maps) as .npy, and print one ``RESULT {json}`` line with the timings. Metrics are
computed by the driver with iadkit.metrics, the same function as for the iadkit side.

What is anomalib's and what is ours, per method (everything not listed is anomalib's code, called as is):

* all: pixels are read from the driver's preprocessed float32 files (iadkit's `Preprocess`: same resize,
  same normalisation); `timm.create_model` is wrapped during model construction so that nothing is
  downloaded (``pretrained=False``), and the packaged EfficientNet-Lite0 weights (timm naming) are loaded
  into the frozen extractor afterwards (every extractor key must be covered).
* stfpm, cflow: `STFPMModel` / `CflowModel` accept any timm name: tf_efficientnet_lite0 is passed directly.
* fastflow: `FastflowModel` allows only resnet18 / wide_resnet50_2 (and two ViTs). It is built with
  backbone "resnet18" while `timm.create_model("resnet18", features_only, out_indices=[1, 2, 3])` is
  redirected to tf_efficientnet_lite0 with the same out_indices (= blocks.1 / blocks.2 / blocks.4, strides
  4 / 8 / 16); the LayerNorms, flows, loss and map are then built by anomalib for those shapes.
* cfa: `CfaModel` loads torchvision weights (a download) and knows only vgg19_bn / resnet18 /
  wide_resnet50_2. It is built with backbone "resnet18" while its `get_feature_extractor` returns a Lite0
  extractor whose outputs are named layer1/2/3 (= blocks.1/2/4); the descriptor's CoordConv is re-made by
  anomalib's own `CoordConv2d` for the 24 + 40 + 112 = 176 Lite0 channels (anomalib hard-codes 448 for
  resnet18). Memory-bank initialisation, loss, scoring: anomalib's.
* reverse_distillation: anomalib's bottleneck and decoder exist only for ResNet-family encoders, so it runs
  with backbone "resnet18" and a torchvision resnet18 weight file given by the user (``resnet18_weights``).
* draem: `DraemModel`, `DraemLoss`, `PerlinAnomalyGenerator` (DTD folder or none: then anomalib uses the
  Perlin noise itself as texture). Pixels are not normalised (anomalib refuses Normalize for DRAEM).
* ganomaly: `GanomalyModel`, `GeneratorLoss`, `DiscriminatorLoss`, two Adams, G step then D step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RowFile:
    """Rows of a raw float32 [N, C, H, W] file, read with pread into fresh buffers.

    No memory map: the process's resident memory then holds only the batches in use, as with a data
    loader that decodes images on the fly (mapped file pages would count in VmRSS).
    """

    def __init__(self, path: str, shape: list[int]) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.shape = tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape)) * 4
        self.n = os.fstat(self.fd).st_size // self.row_bytes

    def read(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        out = np.empty((len(indices), *self.shape), dtype=np.float32)
        view = memoryview(out).cast("B")
        for k, i in enumerate(indices):
            got = os.preadv(self.fd, [view[k * self.row_bytes : (k + 1) * self.row_bytes]], int(i) * self.row_bytes)
            if got != self.row_bytes:
                raise OSError(f"short read of row {i}")
        return torch.from_numpy(out)


def epoch_batches(n: int, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[np.ndarray]:
    """A shuffled epoch, the last batch partial (torch DataLoader(shuffle=True, drop_last=False))."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for s in range(0, n, batch_size):
        yield order[s : s + batch_size]


# -- offline construction ----------------------------------------------------------------------------
@contextlib.contextmanager
def offline_timm(redirect: dict[str, tuple[str, dict[str, Any]]] | None = None) -> Iterator[None]:
    """While active, timm.create_model never downloads (pretrained=False) and may rename an architecture."""
    import timm

    real = timm.create_model

    def create_model(name: str, *args: Any, **kwargs: Any) -> nn.Module:
        kwargs["pretrained"] = False
        if redirect and name in redirect:
            name, extra = redirect[name]
            kwargs.update(extra)
        return real(name, *args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = real


def load_weights(module: nn.Module, path: str) -> None:
    """Load a timm-named state dict; every key of `module` must be provided."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    missing, _unexpected = module.load_state_dict(sd, strict=False)
    if missing:
        raise RuntimeError(f"weights {path} do not cover the extractor: missing {missing[:5]}")


class LiteTaps(nn.Module):
    """Frozen tf_efficientnet_lite0 blocks.1/2/4 under the names CFA's code expects (layer1/2/3)."""

    def __init__(self, weights: str) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(
            "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=[1, 2, 3]
        )
        load_weights(self.body, weights)
        for p in self.body.parameters():
            p.requires_grad = False
        self.body.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {"layer1": f[0], "layer2": f[1], "layer3": f[2]}


# -- methods: build, train step, optimiser ------------------------------------------------------------
class Runner:
    """model + training step + optimiser(s) of one anomalib method, as its Lightning module defines them."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    scheduler: Any = None
    steps = 0

    def train_step(self, images: torch.Tensor) -> float:  # pragma: no cover - per method
        raise NotImplementedError

    def before_training(self, train: RowFile, cfg: dict[str, Any]) -> None:
        pass

    def end_of_epoch(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()


class Stfpm(Runner):
    def __init__(self, cfg: dict[str, Any]) -> None:
        from anomalib.models.image.stfpm.loss import STFPMLoss
        from anomalib.models.image.stfpm.torch_model import STFPMModel

        with offline_timm():
            self.model = STFPMModel(layers=cfg["layers"], backbone="tf_efficientnet_lite0")
        load_weights(self.model.teacher_model.feature_extractor, cfg["weights"])
        self.loss = STFPMLoss()
        # Stfpm.configure_optimizers (stfpm/lightning_model.py)
        self.optimizers = [
            torch.optim.SGD(
                self.model.student_model.parameters(), lr=0.4, momentum=0.9, dampening=0.0, weight_decay=0.001
            )
        ]

    def train_step(self, images: torch.Tensor) -> float:
        opt = self.optimizers[0]
        teacher, student = self.model(images)
        loss = self.loss(teacher, student)
        opt.zero_grad()
        loss.backward()
        opt.step()
        self.steps += 1
        return float(loss)


class ReverseDistillation(Runner):
    def __init__(self, cfg: dict[str, Any]) -> None:
        from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
        from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
        from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

        if not cfg.get("resnet18_weights"):
            raise SystemExit(
                "SKIP anomalib's reverse distillation supports only ResNet-family encoders; give --resnet18-weights"
            )
        size = int(cfg["image_size"])
        with offline_timm():
            self.model = ReverseDistillationModel(
                backbone="resnet18",
                input_size=(size, size),
                layers=["layer1", "layer2", "layer3"],
                anomaly_map_mode=AnomalyMapGenerationMode.ADD,  # ReverseDistillation's default
                pre_trained=False,
            )
        load_weights(self.model.encoder.feature_extractor, cfg["resnet18_weights"])
        self.loss = ReverseDistillationLoss()
        self.optimizers = [
            torch.optim.Adam(
                list(self.model.decoder.parameters()) + list(self.model.bottleneck.parameters()),
                lr=0.005,
                betas=(0.5, 0.99),
            )
        ]

    def train_step(self, images: torch.Tensor) -> float:
        opt = self.optimizers[0]
        loss = self.loss(*self.model(images))
        opt.zero_grad()
        loss.backward()
        opt.step()
        self.steps += 1
        return float(loss)


class Fastflow(Runner):
    def __init__(self, cfg: dict[str, Any]) -> None:
        from anomalib.models.image.fastflow.loss import FastflowLoss
        from anomalib.models.image.fastflow.torch_model import FastflowModel

        size = int(cfg["image_size"])
        redirect = {"resnet18": ("tf_efficientnet_lite0", {"features_only": True, "out_indices": [1, 2, 3]})}
        with offline_timm(redirect):
            self.model = FastflowModel(
                input_size=(size, size),
                backbone="resnet18",
                pre_trained=False,
                flow_steps=8,
                conv3x3_only=False,
                hidden_ratio=1.0,
            )
        load_weights(self.model.feature_extractor, cfg["weights"])
        self.loss = FastflowLoss()
        self.optimizers = [torch.optim.Adam(self.model.parameters(), lr=0.001, weight_decay=0.00001)]

    def train_step(self, images: torch.Tensor) -> float:
        opt = self.optimizers[0]
        hidden, jacobians = self.model(images)
        loss = self.loss(hidden, jacobians)
        opt.zero_grad()
        loss.backward()
        opt.step()
        self.steps += 1
        return float(loss)


class Cflow(Runner):
    def __init__(self, cfg: dict[str, Any]) -> None:
        from anomalib.models.image.cflow.torch_model import CflowModel

        with offline_timm():
            self.model = CflowModel(
                backbone="tf_efficientnet_lite0",
                layers=cfg["layers"],
                pre_trained=False,
                fiber_batch_size=int(cfg.get("fiber_batch_size", 64)),  # Cflow's default 64
                decoder="freia-cflow",
                condition_vector=128,
                coupling_blocks=8,
                clamp_alpha=1.9,
                permute_soft=False,
            )
        load_weights(self.model.encoder.feature_extractor, cfg["weights"])
        params = [p for d in self.model.decoders for p in d.parameters()]
        self.optimizers = [torch.optim.Adam(params, lr=float(cfg.get("lr", 0.0001)))]

    def train_step(self, images: torch.Tensor) -> float:
        # Cflow.training_step (cflow/lightning_model.py), manual optimisation, line for line.
        import einops
        import torch.nn.functional as F
        from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d

        opt = self.optimizers[0]
        m = self.model
        activation = m.encoder(images)
        total = 0.0
        for layer_idx, layer in enumerate(m.pool_layers):
            enc = activation[layer].detach()
            b, c, h, w = enc.size()
            e_len = b * h * w
            pos = einops.repeat(
                positional_encoding_2d(m.condition_vector, h, w).unsqueeze(0), "b c h w-> (tile b) c h w", tile=b
            )
            c_r = einops.rearrange(pos, "b c h w -> (b h w) c")
            e_r = einops.rearrange(enc, "b c h w -> (b h w) c")
            perm = torch.randperm(e_len)
            decoder = m.decoders[layer_idx]
            fiber_batches = e_len // m.fiber_batch_size
            if fiber_batches <= 0:
                raise ValueError("not enough fibers for one fiber batch")
            for batch_num in range(fiber_batches):
                opt.zero_grad()
                if batch_num < fiber_batches - 1:
                    idx = torch.arange(batch_num * m.fiber_batch_size, (batch_num + 1) * m.fiber_batch_size)
                else:
                    idx = torch.arange(batch_num * m.fiber_batch_size, e_len)
                p_u, log_jac_det = decoder(e_r[perm[idx]], [c_r[perm[idx]]])
                log_prob = get_logp(c, p_u, log_jac_det) / c
                loss = -F.logsigmoid(log_prob)
                loss.mean().backward()
                opt.step()
                self.steps += 1
                total += float(loss.sum())
        return total


class Cfa(Runner):
    def __init__(self, cfg: dict[str, Any]) -> None:
        import anomalib.models.image.cfa.torch_model as cfa_torch
        from anomalib.models.image.cfa.loss import CfaLoss

        real = cfa_torch.get_feature_extractor
        cfa_torch.get_feature_extractor = lambda backbone, return_nodes: LiteTaps(cfg["weights"])
        try:
            self.model = cfa_torch.CfaModel(
                backbone="resnet18",
                gamma_c=1,
                gamma_d=1,
                num_nearest_neighbors=3,
                num_hard_negative_features=3,
                radius=1e-5,
            )
        finally:
            cfa_torch.get_feature_extractor = real
        dim = 24 + 40 + 112  # Lite0 blocks.1 + blocks.2 + blocks.4
        self.model.descriptor.layer = cfa_torch.CoordConv2d(in_channels=dim, out_channels=dim // 1, kernel_size=1)
        self.loss = CfaLoss(num_nearest_neighbors=3, num_hard_negative_features=3, radius=1e-5)
        self.optimizers = [torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=5e-4, amsgrad=True)]

    def before_training(self, train: RowFile, cfg: dict[str, Any]) -> None:
        # Cfa.on_train_start: initialize_centroid over the (shuffled) training loader.
        from types import SimpleNamespace

        batches = [
            SimpleNamespace(image=train.read(idx))
            for idx in epoch_batches(train.n, cfg["batch_size"], cfg["seed"] + 10_000)
        ]
        self.model.initialize_centroid(batches)

    def train_step(self, images: torch.Tensor) -> float:
        opt = self.optimizers[0]
        loss = self.loss(self.model(images))
        opt.zero_grad()
        loss.backward(retain_graph=True)  # Cfa.backward: its radius tensor carries a graph from __init__
        opt.step()
        self.steps += 1
        return float(loss)


class Draem(Runner):
    def __init__(self, cfg: dict[str, Any]) -> None:
        from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
        from anomalib.models.image.draem.loss import DraemLoss
        from anomalib.models.image.draem.torch_model import DraemModel

        self.model = DraemModel(sspcab=False)
        self.augmenter = PerlinAnomalyGenerator(anomaly_source_path=cfg.get("dtd_dir"), blend_factor=(0.1, 1.0))
        self.loss = DraemLoss()
        opt = torch.optim.Adam(self.model.parameters(), lr=0.0001)
        self.optimizers = [opt]
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[400, 600], gamma=0.1)

    def train_step(self, images: torch.Tensor) -> float:
        opt = self.optimizers[0]
        augmented, mask = self.augmenter(images)
        reconstruction, prediction = self.model(augmented)
        loss = self.loss(images, reconstruction, mask, prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
        self.steps += 1
        return float(loss)


class Ganomaly(Runner):
    def __init__(self, cfg: dict[str, Any]) -> None:
        from anomalib.models.image.ganomaly.loss import DiscriminatorLoss, GeneratorLoss
        from anomalib.models.image.ganomaly.torch_model import GanomalyModel

        size = int(cfg["image_size"])
        self.model = GanomalyModel(input_size=(size, size), num_input_channels=3, n_features=64, latent_vec_size=100)
        self.generator_loss = GeneratorLoss(1, 50, 1)
        self.discriminator_loss = DiscriminatorLoss()
        betas = (0.5, 0.999)
        self.optimizers = [
            torch.optim.Adam(self.model.discriminator.parameters(), lr=0.0002, betas=betas),
            torch.optim.Adam(self.model.generator.parameters(), lr=0.0002, betas=betas),
        ]

    def train_step(self, images: torch.Tensor) -> float:
        d_opt, g_opt = self.optimizers
        padded, fake, latent_i, latent_o = self.model(images)
        pred_real, _ = self.model.discriminator(padded)
        pred_fake, _ = self.model.discriminator(fake)
        g_loss = self.generator_loss(latent_i, latent_o, padded, fake, pred_real, pred_fake)
        g_opt.zero_grad()
        g_loss.backward(retain_graph=True)
        g_opt.step()
        pred_fake, _ = self.model.discriminator(fake.detach())
        d_loss = self.discriminator_loss(pred_real, pred_fake)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        self.steps += 1
        return float(g_loss)


RUNNERS = {
    "stfpm": Stfpm,
    "reverse_distillation": ReverseDistillation,
    "fastflow": Fastflow,
    "cflow": Cflow,
    "cfa": Cfa,
    "draem": Draem,
    "ganomaly": Ganomaly,
}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg["seed"]))
    np.random.seed(int(cfg["seed"]))
    train = RowFile(cfg["train"], cfg["shape"])
    test = RowFile(cfg["test"], cfg["shape"])

    t0, c0 = time.perf_counter(), cpu_seconds()
    runner = RUNNERS[cfg["method"]](cfg)
    build_s = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), cpu_seconds()
    runner.model.train()
    runner.before_training(train, cfg)
    history = []
    for epoch in range(int(cfg["epochs"])):
        runner.model.train()
        total, n = 0.0, 0
        for idx in epoch_batches(train.n, int(cfg["batch_size"]), int(cfg["seed"]) + epoch):
            total += runner.train_step(train.read(idx)) * len(idx)
            n += len(idx)
        runner.end_of_epoch()
        history.append(total / max(n, 1))
        with open(Path(cfg["out_dir"]) / "progress.log", "a") as log:  # tail it to follow a long run
            log.write(f"epoch {epoch + 1}/{cfg['epochs']} loss {history[-1]:.5g} {time.perf_counter() - t0:.0f} s\n")
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"loss became {history[-1]} in epoch {epoch + 1}")
    fit_s, fit_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    fit_peak = vm_hwm_mb()

    runner.model.eval()
    scores, maps = [], []
    t0, c0 = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        for idx in epoch_batches(test.n, int(cfg["eval_batch_size"]), 0, shuffle=False):
            out = runner.model(test.read(idx))
            scores.append(out.pred_score.reshape(-1).float().numpy())
            if cfg["want_maps"] and out.anomaly_map is not None:
                m = out.anomaly_map
                maps.append((m[:, 0] if m.ndim == 4 else m).float().numpy())
    pred_s, pred_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    out_dir = Path(cfg["out_dir"])
    np.save(out_dir / "scores.npy", np.concatenate(scores))
    if maps:
        np.save(out_dir / "maps.npy", np.concatenate(maps))
    result = {
        "impl": "anomalib",
        "build_s": build_s,
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "optimizer_steps": runner.steps,
        "n_train": train.n,
        "n_test": test.n,
        "predict_s": pred_s,
        "predict_cpu_s": pred_cpu_s,
        "predict_img_s": test.n / pred_s,
        "peak_rss_mb_fit": fit_peak,
        "peak_rss_mb": vm_hwm_mb(),
        "loss_history": history,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
