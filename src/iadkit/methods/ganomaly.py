"""GANomaly: an encoder-decoder-encoder generator trained adversarially on good images; an
image is anomalous when re-encoding its reconstruction gives a different code.

Paper: Samet Akçay, Amir Atapour-Abarghouei, Toby P. Breckon, "GANomaly: Semi-Supervised
Anomaly Detection via Adversarial Training", ACCV 2018.

Algorithm. The generator G has three parts: an encoder G_E maps the image x to a code
z = G_E(x); a decoder G_D reconstructs x_hat = G_D(z); a second encoder E re-encodes it,
z_hat = E(x_hat). A discriminator D (a DCGAN encoder with a sigmoid output) tells images
from reconstructions. G minimises
    L_G = w_adv * ||f(x) - f(x_hat)||_2^2 + w_con * ||x - x_hat||_1 + w_enc * ||z - z_hat||_2^2
with f the discriminator's last feature map (adversarial loss as feature matching),
contextual L1 and latent L2 terms (weights 1, 50, 1); D minimises the binary cross-entropy
of real against reconstructed images. Trained on good images only, the model learns to
encode good images so that their reconstruction re-encodes to the same code; the anomaly
score is A(x) = ||G_E(x) - E(G(x))||^2.

======================  ===================================  ==================================
paper                   reference code (samet-akcay/ganomaly) ours
======================  ===================================  ==================================
networks                DCGAN encoder / decoder, nz = 100,   `DCGANEncoder` / `DCGANDecoder`,
                        ngf = ndf = 64, no extra layers;     ``latent_dim`` 100, ``base_width``
                        D = encoder with 1 output + sigmoid  32 (CPU-sized; paper 64),
                                                             ``extra_layers`` 0
input                   isize 32 (CIFAR-10, MNIST), images   ``input_size`` 64: the model's
                        normalised to [-1, 1] (Tanh output)  preprocessing maps pixels to
                                                             [-1, 1] (mean = std = 0.5); images
                                                             of another size are resized to
                                                             ``input_size`` inside the detector
                                                             (a power of two >= 16)
generator loss          w_adv 1 * L2(f(x), f(x_hat)) +       the same (means over elements, as
                        w_con 50 * L1(x, x_hat) +            the reference's ``l2_loss`` and
                        w_enc 1 * L2(z, z_hat)               ``L1Loss``)
discriminator loss      (BCE(D(x), 1) + BCE(D(x_hat), 0))/2  the same; D re-initialised when its
                        ; D re-initialised when it drops     loss drops below 1e-5 (seeded)
                        below 1e-5
update order            G step, then D step, every batch     the same
optimiser               Adam lr 2e-4, betas (0.5, 0.999),    the same; batch 8; ``epochs`` 15
                        batch 64, 15 epochs                  (the reference's niter)
model selection         keeps the epoch with the best        the last epoch (no test data
                        *test* AUROC                         during training)
score                   mean over the code of (z - z_hat)^2  the same (= ||z - z_hat||^2 / nz),
                        with BatchNorm in training mode      BatchNorm in eval mode
                        (statistics of the test batch)       (running statistics)
score normalisation     min-max over the *test set*          none: a score must not depend on
                                                             the other test images. Ranking
                                                             metrics are unchanged; thresholds
                                                             are calibrated on good images
maps                    none (image level)                   none (``produces_maps = False``)
======================  ===================================  ==================================

anomalib 2.7.0's ``Ganomaly`` differs from the reference: its adversarial term is the MSE
between D's *predictions* (not features), its latent term a smooth L1, its first conv pads
by 4, and it pads images to the next power of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iadkit.components.autoencoders import DCGANDecoder, DCGANEncoder, _dcgan_levels, dcgan_init
from iadkit.data.transforms import ImageSet
from iadkit.errors import InvalidParameterError, TrainingDataError
from iadkit.methods.base import Detector, register
from iadkit.methods.params import Interval, at_least, param, positive
from iadkit.progress import step_bar
from iadkit.types import Prediction

DISCRIMINATOR_RESET_LOSS = 1e-5  # the reference re-initialises D when its loss falls below this


class GanomalyGenerator(nn.Module):
    """G_E -> G_D -> E: image -> (reconstruction, z, z_hat), codes [B, nz]."""

    def __init__(self, image_size: int, latent_dim: int, base_width: int, extra_layers: int) -> None:
        super().__init__()
        self.encoder1 = DCGANEncoder(image_size, latent_dim, 3, base_width, extra_layers)
        self.decoder = DCGANDecoder(image_size, latent_dim, 3, base_width, extra_layers)
        self.encoder2 = DCGANEncoder(image_size, latent_dim, 3, base_width, extra_layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)
        fake = self.decoder(z)
        z_hat = self.encoder2(fake)
        return fake, z.flatten(1), z_hat.flatten(1)


class GanomalyDiscriminator(nn.Module):
    """DCGAN encoder with one output: image -> (probability real [B], last features [B, C, 4, 4])."""

    def __init__(self, image_size: int, base_width: int, extra_layers: int) -> None:
        super().__init__()
        self.net = DCGANEncoder(image_size, 1, 3, base_width, extra_layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.features(x)
        return torch.sigmoid(self.net.final(features)).flatten(), features


def generator_loss(
    x: torch.Tensor,
    fake: torch.Tensor,
    z: torch.Tensor,
    z_hat: torch.Tensor,
    features_real: torch.Tensor,
    features_fake: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 50.0, 1.0),
) -> tuple[torch.Tensor, dict[str, float]]:
    """GANomaly's L_G = w_adv * mean (f(x) - f(x_hat))^2 + w_con * mean |x - x_hat|
    + w_enc * mean (z - z_hat)^2, and its three terms."""
    adv = ((features_real - features_fake) ** 2).mean()
    con = (x - fake).abs().mean()
    enc = ((z - z_hat) ** 2).mean()
    terms = {"adv": float(adv.detach()), "con": float(con.detach()), "enc": float(enc.detach())}
    return weights[0] * adv + weights[1] * con + weights[2] * enc, terms


@register
class GANomaly(Detector):
    """GANomaly (Akçay et al. 2018): latent distance of an encoder-decoder-encoder GAN."""

    name = "ganomaly"
    family = "GAN"
    paper = "Akçay et al., GANomaly: Semi-Supervised Anomaly Detection via Adversarial Training, ACCV 2018"
    produces_maps = False
    map_sigma = 0.0
    smoke_params = {"epochs": 30, "batch_size": 4, "base_width": 8, "input_size": 64, "latent_dim": 32}
    paper_params = {"epochs": 15, "batch_size": 64, "base_width": 64, "latent_dim": 100, "input_size": 32}
    paper_image_size = 32

    input_size: int = param(
        64, "Side the networks work at, a power of two >= 16 (reference isize: 32).", check=at_least(16)
    )
    latent_dim: int = param(100, "Size of the code z (paper: 100).", check=at_least(1))
    base_width: int = param(32, "Width of the first conv, doubling per level (paper: 64).", check=at_least(1))
    extra_layers: int = param(0, "Extra conv layers in every encoder/decoder (reference: 0).", check=at_least(0))
    epochs: int = param(15, "Training epochs (reference: 15).", check=at_least(1))
    batch_size: int = param(
        8, "Images per step (reference: 64, which gives a few dozen images one step per epoch).", check=at_least(2)
    )
    lr: float = param(2e-4, "Adam learning rate of G and D (paper: 2e-4).", check=positive())
    beta1: float = param(0.5, "Adam beta1 (paper: 0.5).", check=Interval(0, 1, closed="left"))
    w_adv: float = param(1.0, "Weight of the adversarial (feature matching) loss (paper: 1).", check=at_least(0))
    w_con: float = param(50.0, "Weight of the contextual L1 loss (paper: 50).", check=at_least(0))
    w_enc: float = param(1.0, "Weight of the latent L2 loss (paper: 1).", check=at_least(0))

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # The reference maps pixels to [-1, 1], the range of the decoder's Tanh.
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def _check_params(self) -> None:
        try:
            _dcgan_levels(self.input_size)
        except Exception as exc:
            raise InvalidParameterError(f"GANomaly: input_size={self.input_size} is not valid: {exc}") from None

    def _build(self) -> None:
        args = (self.input_size, self.base_width, self.extra_layers)
        gen = torch.Generator().manual_seed(self.seed)
        self.generator_ = dcgan_init(
            GanomalyGenerator(self.input_size, self.latent_dim, self.base_width, self.extra_layers), gen
        )
        self.discriminator_ = dcgan_init(GanomalyDiscriminator(*args), gen)
        self.generator_.eval()
        self.discriminator_.eval()

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) == (self.input_size, self.input_size):
            return images
        return F.interpolate(
            images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
        )

    def _fit(self, train: ImageSet, *, progress: bool) -> None:
        n = len(train)
        if n < 2:
            raise TrainingDataError("GANomaly needs at least 2 good training images (BatchNorm statistics)")
        gen = torch.Generator().manual_seed(self.seed)
        betas = (self.beta1, 0.999)
        opt_g = torch.optim.Adam(self.generator_.parameters(), lr=self.lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator_.parameters(), lr=self.lr, betas=betas)
        weights = (self.w_adv, self.w_con, self.w_enc)
        bs = min(self.batch_size, n)
        # The reference drops the last incomplete batch; a batch of one cannot train BatchNorm.
        steps = n // bs
        self.generator_.train()
        self.discriminator_.train()
        self.discriminator_resets_ = 0
        with step_bar(self.epochs * steps, "ganomaly", enabled=progress) as bar:
            for epoch in range(self.epochs):
                order = torch.randperm(n, generator=gen)
                for s in range(steps):
                    idx = order[s * bs : (s + 1) * bs]
                    x = self._resize(torch.stack([train.image(int(i)) for i in idx]).to(self.device))
                    fake, z, z_hat = self.generator_(x)
                    # generator step: features of the real and the reconstructed images (D's
                    # weights get no gradient from it: the reference zeroes them before D's step)
                    self.discriminator_.requires_grad_(False)
                    _, feat_real = self.discriminator_(x)
                    _, feat_fake = self.discriminator_(fake)
                    loss_g, terms = generator_loss(x, fake, z, z_hat, feat_real, feat_fake, weights)
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    opt_g.step()
                    self.discriminator_.requires_grad_(True)
                    # discriminator step on the same batch, the reconstruction detached
                    pred_real, _ = self.discriminator_(x)
                    pred_fake, _ = self.discriminator_(fake.detach())
                    loss_d = 0.5 * (
                        F.binary_cross_entropy(pred_real, torch.ones_like(pred_real))
                        + F.binary_cross_entropy(pred_fake, torch.zeros_like(pred_fake))
                    )
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()
                    if float(loss_d.detach()) < DISCRIMINATOR_RESET_LOSS:
                        dcgan_init(self.discriminator_, gen)
                        self.discriminator_resets_ += 1
                    bar.advance(
                        **{k: round(v, 4) for k, v in terms.items()},
                        d=round(float(loss_d.detach()), 4),
                        epoch=f"{epoch + 1}/{self.epochs}",
                    )
        self.generator_.eval()
        self.discriminator_.eval()

    def latent_codes(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, z_hat) [B, nz] of preprocessed images."""
        with torch.no_grad():
            _, z, z_hat = self.generator_(self._resize(images))
        return z, z_hat

    def _predict(self, images: torch.Tensor) -> Prediction:
        z, z_hat = self.latent_codes(images)
        return Prediction(scores=((z - z_hat) ** 2).mean(1), maps=None)
