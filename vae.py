"""
WaveletVAE: the IRIS latent space. The image is first split losslessly into Haar
subbands (wavelet.py), and a small convolutional VAE compresses those, so the encoder
starts from a representation that already separates structure (LL) from detail.

    x (B, 3, H, W) -> dwt -> (B, 12, H/2, W/2) -> encoder, 3 stride-2 stages
      -> mean, logvar (B, 16, H/16, W/16) -> decoder, 3 x2 upsamplings
      -> (B, 12, H/2, W/2) -> idwt -> x_hat (B, 3, H, W)

A 256x256 image becomes a 16x16x16 latent (48x fewer numbers). The encoder is light
(LiteVAE, 2405.14477, in spirit: it works on wavelet coefficients) and the decoder small,
because the decoder runs on the phone. The VAE also stores the per-channel latent shift
and scale measured on its training data (the idea behind Stable Diffusion's 0.18215), so
the generator sees zero-mean, unit-variance latents: use encode_latent / decode_latent.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_weights, read_ema_checkpoint
from configurator import UsageError
from data import to_float, to_uint8
from wavelet import dwt, idwt

DOWNSAMPLE = 16  # image side / latent side: 2 from the DWT, 8 from the encoder


def check_image_size(height, width, multiple=DOWNSAMPLE):
    if height % multiple or width % multiple:
        nearest = [max(multiple, round(side / multiple) * multiple) for side in (height, width)]
        raise ValueError(f"image size {height}x{width} is not a multiple of {multiple}; "
                         f"use e.g. {nearest[0]}x{nearest[1]}")


def norm(channels):
    return nn.GroupNorm(min(32, channels // 4), channels)


class ResBlock(nn.Module):
    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.block = nn.Sequential(norm(channels_in), nn.SiLU(), nn.Conv2d(channels_in, channels_out, 3, padding=1),
                                   norm(channels_out), nn.SiLU(), nn.Conv2d(channels_out, channels_out, 3, padding=1))
        self.skip = nn.Identity() if channels_in == channels_out else nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x):
        return self.skip(x) + self.block(x)


class Upsample(nn.Module):
    # nearest + conv rather than a transposed conv: no checkerboard artefacts
    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class WaveletVAE(nn.Module):
    def __init__(self, channels=(64, 128, 256), latent_channels=16, blocks_per_stage=1):
        super().__init__()
        self.config = dict(channels=list(channels), latent_channels=latent_channels, blocks_per_stage=blocks_per_stage)
        wavelet_channels = 12
        # encoder: wavelet coefficients at H/2 -> three stride-2 stages -> H/16
        enc = [nn.Conv2d(wavelet_channels, channels[0], 3, padding=1)]
        c_prev = channels[0]
        for c in channels:
            enc += [ResBlock(c_prev, c)] + [ResBlock(c, c) for _ in range(blocks_per_stage - 1)]
            enc += [nn.Conv2d(c, c, 3, stride=2, padding=1)]
            c_prev = c
        enc += [ResBlock(c_prev, c_prev), norm(c_prev), nn.SiLU(), nn.Conv2d(c_prev, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        # start with a small posterior variance: at logvar = 0 the sampling noise is as large as
        # the latent itself and the decoder learns nothing until the tiny KL weight shrinks it
        nn.init.constant_(self.encoder[-1].bias[latent_channels:], -8.0)
        # decoder: the mirror image, upsampling back to H/2, out to wavelet coefficients
        dec = [nn.Conv2d(latent_channels, channels[-1], 3, padding=1), ResBlock(channels[-1], channels[-1])]
        c_prev = channels[-1]
        for c in reversed(channels):
            dec += [Upsample(c_prev, c)] + [ResBlock(c, c) for _ in range(blocks_per_stage)]
            c_prev = c
        dec += [norm(c_prev), nn.SiLU(), nn.Conv2d(c_prev, wavelet_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # measured after training (train_vae.py); identity until then
        self.register_buffer('latent_shift', torch.zeros(latent_channels))
        self.register_buffer('latent_scale', torch.ones(latent_channels))

    def encode(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> mean, logvar: (B, 16, H/16, W/16)"""
        check_image_size(*x.shape[-2:])
        mean, logvar = self.encoder(dwt(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_wavelet(self, z):
        """z: (B, 16, h, w) -> wavelet coefficients (B, 12, 8h, 8w)"""
        return self.decoder(z)

    def decode(self, z):
        """z: (B, 16, h, w) -> image (B, 3, 16h, 16w), roughly in [-1, 1]"""
        return idwt(self.decode_wavelet(z))

    def forward(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)  # reparameterisation
        return self.decode_wavelet(z), mean, logvar

    # the generator's view: normalised latents
    def encode_latent(self, x):
        mean, _ = self.encode(x)
        return (mean - self.latent_shift[:, None, None]) / self.latent_scale[:, None, None]

    def decode_latent(self, z):
        return self.decode(z * self.latent_scale[:, None, None] + self.latent_shift[:, None, None])


def latent_keep_mask(repaint):
    """A pixel mask (B, 1, H, W), 1 = repaint, -> the latent grid's keep mask (B, 1, H/16, W/16):
    1 = keep, 0 = repaint, in between for latent cells the border crosses (a soft blend)."""
    return 1 - F.avg_pool2d(repaint.float(), DOWNSAMPLE)


def load_vae(vae_dir, device='cpu'):
    """The EMA weights of a WaveletVAE trained by train_vae.py, ready to encode/decode."""
    state, meta = read_ema_checkpoint(vae_dir, 'VAE', '--vae_dir')
    vae = WaveletVAE(**meta['model_config'])
    load_weights(vae, state, os.path.join(vae_dir, 'ckpt.safetensors'))
    if bool((vae.latent_scale == 1).all()):
        raise UsageError(f"{os.path.join(vae_dir, 'ckpt.safetensors')} has no measured latent scale (its "
                         f"training did not finish); finish it with `python train_vae.py ... --init_from=resume`")
    return vae.to(device).eval().requires_grad_(False)


def vae_loss(wavelet_hat, x, mean, logvar, wavelet_weight=1.0, high_freq_weight=2.0, kl_weight=1e-6, mse_weight=4.0):
    """Total loss and its parts. wavelet_hat: (B, 12, H/2, W/2) decoder output, x: (B, 3, H, W).
    L1 + MSE in pixels (the MSE weighs the few large errors at edges, which PSNR counts and
    L1 alone neglects; docs/results.md measures what it adds) + an L1 on the subbands that
    weights LH, HL, HH (where blur shows) more than LL + a small KL to N(0, 1) that keeps
    the latent smooth enough to generate in."""
    error = idwt(wavelet_hat) - x
    pixel = error.abs().mean() + mse_weight * error.square().mean()
    band_errors = (wavelet_hat - dwt(x)).abs().unflatten(1, (4, -1)).mean(dim=(0, 2, 3, 4))  # LL, LH, HL, HH
    band_weights = torch.tensor([1.0, high_freq_weight, high_freq_weight, high_freq_weight], device=x.device)
    wavelet = (band_weights * band_errors).sum() / band_weights.sum()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    parts = dict(pixel=pixel.item(), wavelet=wavelet.item(), kl=kl.item())
    return pixel + wavelet_weight * wavelet + kl_weight * kl, parts


@torch.no_grad()
def reconstruct(model, images, batch=64):
    """uint8 images (N, 3, H, W) -> their uint8 reconstructions through the mean latent."""
    device = next(model.parameters()).device
    return torch.cat([to_uint8(model.decode(model.encode(to_float(images[i:i + batch]).to(device))[0]).float()).cpu()
                      for i in range(0, len(images), batch)])


def psnr(images, references):
    """Mean per-image PSNR in dB between two uint8 batches."""
    mse = (images.float() - references.float()).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).mean().item()
