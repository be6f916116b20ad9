"""
IRIS smoke and reference tests:  python -m pytest -q test_iris.py

Each test checks real behaviour against an independent reference (the 2x2 Haar formulas
written out, a loss that must fall on a real batch, a checkpoint that must restore
bit-exactly), on data the tests make themselves: nothing is downloaded.
"""
import ast
import concurrent.futures
import copy
import errno
import glob
import inspect
import itertools
import json
import logging
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import browser
import cache
import checkpoint
import internals
import metrics
import precision
import procedural
import training
from cache import encode_images, load_training_set
from checkpoint import load_checkpoint, load_generator, read_checkpoint, save_checkpoint
from configurator import UsageError, config_files, configure, read_config_file, script_settings
from data import control_map, image_tensor, load_data, load_hub, load_imagefolder, open_image, to_float, to_uint8
from flow import (consistency_fn, consistency_loss, consistency_sample, encode_once, euler_sample, flow_loss, guided,
                  shift_time, time_grid, upscale)
from metrics import (adherence, analyse, control_f1, frechet_distance, geneval, read_scene, scene_correct, ssim,
                     structure)
from model import (CHUNK, SIZES, Attention, FourierMixer, Iris, IrisConfig, RecurrentMixer, SelfAttentionMixer,
                   SpatialMixer, build_generator, count_parameters, irfft2_dft, iterate_core, linear_scan, rfft2_dft,
                   sequential_scan, wake_up, window_attention)
from precision import mixed_precision
from procedural import (POSITIONS, TASKS, conflicting_shape_captions, drawn_clearly, held_out, make_scenes, make_shapes,
                        scene_attributes, scene_caption, shape_attributes)
from text import Prompt, load_text_encoder
from training import draw_iters, ema_update, make_ema, optimizer_step
from vae import WaveletVAE, load_vae, psnr, reconstruct, vae_loss
from wavelet import dwt, idwt, impose_lowpass

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES_CONFIG = os.path.join(HERE, 'config', 'shapes.py')
# Every precision a GPU trains in, run here through CPU autocast (and the GradScaler for fp16):
# the same lines of training.py a T4 (fp16) or an A100 (bf16) runs
DTYPES = ['float32', 'bfloat16', 'float16']
FULL = pytest.mark.full  # beyond the smoke tier (pytest.ini)
# fp32 in the smoke tier, the reduced precisions (emulated, slow on a CPU without them) in the full tier
TIERED_DTYPES = ['float32'] + [pytest.param(dtype, marks=FULL) for dtype in DTYPES[1:]]


def _train_step(model, optimizer, precision, compute_loss):
    """One step as the training scripts take it: the loss under autocast, the scaled backward,
    then training.optimizer_step. -> the loss."""
    autocast, scaler = precision
    with autocast:
        loss = compute_loss()
    scaler.scale(loss).backward()
    optimizer_step(model, optimizer, scaler, grad_clip=float('inf'))
    return loss.item()


# -----------------------------------------------------------------------------
# wavelet.py


def test_dwt_matches_the_2x2_haar_formulas():
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right of each 2x2 block
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
    expected = torch.cat([(a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2], dim=1)
    torch.testing.assert_close(dwt(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('levels', [1, 2, 3])
def test_idwt_inverts_dwt_exactly_and_preserves_energy(levels):
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    y = dwt(x, levels)
    assert y.shape == (2, 3 * 4 ** levels, 16 // 2 ** levels, 24 // 2 ** levels)
    torch.testing.assert_close(idwt(y, levels), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.square().sum(), x.square().sum())  # orthonormal


def test_dwt_rejects_odd_sizes_with_a_clear_message():
    with pytest.raises(ValueError, match='even height and width, got 7x8'):
        dwt(torch.randn(1, 3, 7, 8))


def test_impose_lowpass_makes_the_2x2_means_the_small_image_and_keeps_the_details():
    torch.manual_seed(0)
    small = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    coarse = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    x = F.interpolate(coarse, scale_factor=2) + 0.1 * torch.randn(2, 3, 16, 16)
    exact = x - F.interpolate(F.avg_pool2d(x, 2) - small, scale_factor=2)  # the projection, written out
    assert exact.abs().max() < 1  # the [-1, 1] box does not bind: the projection is the answer
    torch.testing.assert_close(impose_lowpass(x, small), exact, rtol=0, atol=1e-12)
    far = torch.randn(2, 3, 16, 16, dtype=torch.float64).clamp(-1, 1)  # here it binds, and both must hold at the end
    small = small * 2
    y = impose_lowpass(far, small)
    torch.testing.assert_close(F.avg_pool2d(y, 2), small, rtol=0, atol=1e-12)
    assert y.abs().max() <= 1 + 1e-5


# -----------------------------------------------------------------------------
# vae.py


@pytest.mark.parametrize('height,width', [(16, 16), (32, 64), (64, 48)])
def test_vae_shapes_and_finite_outputs(height, width):
    vae = WaveletVAE(channels=(8, 16, 32))
    x = torch.rand(2, 3, height, width) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 16, height // 16, width // 16)
    wavelet_hat, _, _ = vae(x)
    assert wavelet_hat.shape == (2, 12, height // 2, width // 2)
    image = vae.decode(mean)
    assert image.shape == x.shape and torch.isfinite(image).all()
    assert vae.encode_latent(x).shape == mean.shape and vae.decode_latent(mean).shape == x.shape


def test_vae_rejects_a_size_that_is_not_a_multiple_of_16():
    with pytest.raises(ValueError, match='not a multiple of 16'):
        WaveletVAE(channels=(8, 16, 32)).encode(torch.zeros(1, 3, 40, 48))


@pytest.mark.parametrize('dtype', TIERED_DTYPES)
def test_vae_training_steps_lower_the_loss_on_a_real_batch(dtype):
    torch.manual_seed(0)
    images, _ = make_shapes(16, 32, seed=3)
    x = to_float(images)
    vae = WaveletVAE(channels=(16, 32, 32))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)

    def loss():
        wavelet_hat, mean, logvar = vae(x)
        return vae_loss(wavelet_hat.float(), x, mean.float(), logvar.float())[0]
    losses = [_train_step(vae, optimizer, mixed_precision(dtype, 'cpu'), loss) for _ in range(40)]
    assert np.isfinite(losses).all() and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_psnr_of_a_perfect_and_a_known_reconstruction():
    a = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    assert psnr(a, a) > 100
    assert abs(psnr(a + 1, a) - 10 * torch.log10(torch.tensor(255.0 ** 2)).item()) < 1e-4  # mse = 1


# -----------------------------------------------------------------------------
# model.py: each GRFM pathway against an independent reference, then the generator


def _tiny_config(**overrides):
    return IrisConfig(**{**dict(dim=48, heads=3, core_layers=2, text_dim=24, fourier_blocks=4, window=4, patch_size=1),
                         **overrides})


def _wake_up(model):
    torch.manual_seed(0)
    return wake_up(model, std=0.05)


def _inputs(batch=2, side=8, text_len=5, text_dim=24):
    torch.manual_seed(1)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[-1, 2:] = False  # the last prompt is shorter
    return torch.randn(batch, 16, side, side), torch.rand(batch), torch.randn(batch, text_len, text_dim), mask


@pytest.mark.parametrize('h,w', [(8, 8), (6, 9), (16, 5)])
def test_fourier_dft_matrices_match_the_torch_fft(h, w):
    torch.manual_seed(0)
    x = torch.randn(2, h, w, 32)
    spectrum = torch.fft.rfft2(x, dim=(1, 2), norm='ortho')
    re, im = rfft2_dft(x).unbind(-1)
    torch.testing.assert_close(re, spectrum.real, rtol=0, atol=1e-5)
    torch.testing.assert_close(im, spectrum.imag, rtol=0, atol=1e-5)
    noise = torch.randn_like(spectrum)  # irfft2 must also ignore DC/Nyquist imaginary parts as torch does
    expected = torch.fft.irfft2(noise, s=(h, w), dim=(1, 2), norm='ortho')
    torch.testing.assert_close(irfft2_dft(torch.view_as_real(noise), w), expected, rtol=0, atol=1e-5)
    by_torch = FourierMixer(32, 4, 0.01, 'torch')
    by_dft = FourierMixer(32, 4, 0.01, 'dft')
    by_dft.load_state_dict(by_torch.state_dict())
    torch.testing.assert_close(by_dft(x), by_torch(x), rtol=0, atol=1e-5)


def test_fourier_mixer_is_the_block_diagonal_complex_mlp():
    torch.manual_seed(0)
    mixer = FourierMixer(8, 2, 0.01, 'torch')
    with torch.no_grad():
        mixer.b1.normal_()
        mixer.b2.normal_(std=0.01)
    x = torch.randn(1, 4, 6, 8)
    spectrum = torch.fft.rfft2(x, dim=(1, 2), norm='ortho')
    w1, w2 = torch.complex(*mixer.w1), torch.complex(*mixer.w2)
    b1, b2 = torch.complex(*mixer.b1), torch.complex(*mixer.b2)
    blocks = spectrum.reshape(1, 4, 4, 2, 4)  # (B, h, w//2+1, blocks, block size)
    hidden = torch.einsum('bhwni,nio->bhwno', blocks, w1) + b1
    hidden = torch.complex(torch.relu(hidden.real), torch.relu(hidden.imag))
    out = torch.einsum('bhwni,nio->bhwno', hidden, w2) + b2
    out = torch.complex(F.softshrink(out.real, 0.01), F.softshrink(out.imag, 0.01)).reshape(1, 4, 4, 8)
    expected = torch.fft.irfft2(out, s=(4, 6), dim=(1, 2), norm='ortho')
    torch.testing.assert_close(mixer(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('tokens', [1, 7, 16, 17, 100, 1024, 4096])
def test_parallel_scan_matches_a_sequential_loop_forward_and_backward(tokens):
    torch.manual_seed(tokens)
    a = (0.5 + 0.5 * torch.rand(2, tokens, 8)).requires_grad_()  # decays near 1 carry state far
    b = torch.randn(2, tokens, 8).requires_grad_()
    weight = torch.randn(2, tokens, 8)
    h = linear_scan(a.log(), b)
    expected = sequential_scan(a.log(), b)
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-4)
    grads = torch.autograd.grad((h * weight).sum(), (a, b))
    expected_grads = torch.autograd.grad((expected * weight).sum(), (a, b))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-4)
    with torch.no_grad():  # the autograd-free path that export traces
        torch.testing.assert_close(linear_scan(a.log(), b), expected, rtol=0, atol=1e-4)


def test_parallel_scan_floors_vanishing_decays_and_stays_finite():
    # decays anywhere in [0, 1], exact zeros included, and inputs up to 1e3: the closed form inside
    # a chunk divides by products of decays, so it floors log a at -60 / CHUNK and must not overflow
    torch.manual_seed(0)
    a = torch.rand(2, 300, 8)
    a[:, ::7] = 0
    b = 1e3 * torch.randn(2, 300, 8)
    h = linear_scan(a.log(), b)
    assert torch.isfinite(h).all()
    expected = sequential_scan(a.log().clamp_min(-60 / CHUNK), b)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-3)


def test_recurrent_mixer_runs_half_the_channels_each_way():
    torch.manual_seed(0)
    mixer = RecurrentMixer(8, 2)
    x = torch.randn(1, 12, 8)
    out = mixer(x)
    changed = x.clone()
    changed[:, -1] += 1  # the last token reaches every earlier one, but only backwards
    diff = (mixer(changed) - out).abs()[0, :-1]
    assert diff[:, :4].max() == 0 and diff[:, 4:].min() > 0


def test_recurrent_mixer_is_the_rg_lru_written_out_with_a_loop_each_way():
    torch.manual_seed(0)
    mixer = RecurrentMixer(8, 2)
    x = torch.randn(3, 12, 8, requires_grad=True)  # several rows: one scan runs both halves of every row
    gates = torch.einsum('bnhi,hio->bnho', x.view(3, 12, 2, 4), mixer.gate_weight) + mixer.gate_bias
    r, i = (g.reshape(3, 12, 8) for g in torch.sigmoid(gates).chunk(2, dim=-1))
    a = torch.sigmoid(mixer.decay_logit) ** (mixer.c * r)                           # Griffin eq. 1-4
    b = torch.sqrt(1 - a ** 2) * i * x
    forward = sequential_scan(a[..., :4].log(), b[..., :4])
    backward = sequential_scan(a[..., 4:].log().flip(1), b[..., 4:].flip(1)).flip(1)
    expected = torch.cat([forward, backward], dim=-1)
    out = mixer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    weight = torch.randn_like(out)
    grad, = torch.autograd.grad((out * weight).sum(), x)
    expected_grad, = torch.autograd.grad((expected * weight).sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize('h,w', [(5, 7), (8, 8)])
def test_manhattan_decay_equals_the_dense_matrix(h, w):
    torch.manual_seed(0)
    mixer = SpatialMixer(12, 3)
    x = torch.randn(2, h, w, 12)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    manhattan = (ys[:, None] - ys[None]).abs() + (xs[:, None] - xs[None]).abs()     # (N, N)
    gamma = torch.sigmoid(mixer.gamma_logit)
    dense = gamma[:, None, None] ** manhattan                                         # (heads, N, N)
    dense = dense / dense.sum(-1, keepdim=True)
    v = mixer.value(x).reshape(2, h * w, 3, 4)
    expected = torch.einsum('gnm,bmgc->bngc', dense, v).reshape(2, h, w, 12)
    torch.testing.assert_close(mixer(x), expected, rtol=0, atol=1e-5)


def test_window_attention_equals_attention_inside_each_tile():
    torch.manual_seed(0)
    attention = Attention(16, 2)
    x = torch.randn(2, 6 * 10, 16)
    out = window_attention(attention, x, (6, 10), 4).view(2, 6, 10, 16)
    grid = x.view(2, 6, 10, 16)
    for top in range(0, 6, 4):
        for left in range(0, 10, 4):
            tile = grid[:, top:top + 4, left:left + 4]
            expected = attention(tile.reshape(2, -1, 16)).view(tile.shape)
            torch.testing.assert_close(out[:, top:top + 4, left:left + 4], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('side,patch', [(8, 1), (6, 2), (12, 2)])
def test_generator_shapes_any_resolution_batch_and_text_length(side, patch):
    model = _wake_up(Iris(_tiny_config(patch_size=patch)))
    z, t, text, mask = _inputs(side=side, text_len=3 + side)
    v = model(z, t, text, mask, iters=2)
    assert v.shape == z.shape and torch.isfinite(v).all()
    text_with_other_padding = text.clone()
    text_with_other_padding[-1, 2:] = 100.0
    torch.testing.assert_close(model(z, t, text_with_other_padding, mask, iters=2), v, rtol=0, atol=1e-6)


def test_generator_rejects_a_latent_that_does_not_patch():
    model = Iris(_tiny_config(patch_size=2))
    with pytest.raises(ValueError, match='multiples of 32'):
        model(*_inputs(side=5), iters=1)
    with pytest.raises(ValueError, match='unconditional'):
        z, t, text, mask = _inputs(side=4)
        model(z, t, text, torch.zeros_like(mask), iters=1)


@pytest.mark.parametrize('backprop_iters,mixer', [(0, 'grfm'), (2, 'grfm'), (2, 'attention')])
def test_gradients_reach_every_parameter(backprop_iters, mixer):
    model = _wake_up(Iris(_tiny_config(backprop_iters=backprop_iters, mixer=mixer)))
    model(*_inputs(), iters=4).square().mean().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_truncated_backprop_runs_under_module_hooks():
    # bench.py's FLOP counter hooks every module, and a hook meets the gradient-free iterations
    model = _wake_up(Iris(_tiny_config(backprop_iters=1)))
    with FlopCounterMode(display=False) as flops:
        model(*_inputs(), iters=3).square().mean().backward()
    assert flops.get_total_flops() > 0 and all(p.grad is not None for p in model.core.parameters())


def test_loop_distill_pulls_each_learning_iteration_towards_the_last():
    model = _wake_up(Iris(_tiny_config(backprop_iters=2)))
    z, t, text, mask = _inputs()
    readouts = model(z, t, text, mask, iters=4, every_iteration=True)
    assert readouts.shape == (2, *z.shape)  # iterations 3 and 4 keep gradients
    torch.testing.assert_close(readouts[-1], model(z, t, text, mask, iters=4), rtol=0, atol=0)
    x0, prompt = torch.randn_like(z), Prompt(text, mask)
    eps = (z - (1 - t.view(-1, 1, 1, 1)) * x0) / t.view(-1, 1, 1, 1)  # so that x_t is z
    plain = flow_loss(model, x0, prompt, 4, t, eps)
    distilled = flow_loss(model, x0, prompt, 4, t, eps, loop_distill=0.5)
    gap = (readouts[0] - readouts[1]).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(distilled, plain + 0.5 * gap)
    distilled.sum().backward()  # the held-fixed last readout passes no gradient through the gap
    assert all(p.grad is not None for p in model.core.parameters())


@pytest.mark.parametrize('dtype,tolerance', [('bfloat16', 3e-2), ('float16', 5e-3)])  # measured: 1.0e-2, 1.3e-3
@pytest.mark.parametrize('fft_impl', ['torch', 'dft'])
def test_autocast_output_stays_close_to_fp32_on_the_same_weights(dtype, tolerance, fft_impl):
    # a 6x6 grid pads the Coda's 4x4 windows; backprop_iters=2 of r=3 runs one core
    # iteration without grad; every GRFM pathway is awake
    model = _wake_up(Iris(_tiny_config(fft_impl=fft_impl, backprop_iters=2)))
    inputs = _inputs(side=6)
    reference = model(*inputs, iters=3)
    with mixed_precision(dtype, 'cpu')[0]:
        out = model(*inputs, iters=3)
    assert out.dtype == getattr(torch, dtype)  # autocast really ran in low precision
    error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    assert error < tolerance, error


def test_attention_mixer_is_dense_softmax_attention_over_all_tokens():
    torch.manual_seed(0)
    mixer = SelfAttentionMixer(12, 3)
    x = torch.randn(2, 10, 12)
    q, k, v = (y.view(2, 10, 3, 4).transpose(1, 2) for y in (mixer.query(x), *mixer.key_value(x).chunk(2, dim=-1)))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # / sqrt(head width 4)
    expected = mixer.out((weights @ v).transpose(1, 2).reshape(2, 10, 12))
    torch.testing.assert_close(mixer(x, (2, 5)), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mixer must be"):
        Iris(_tiny_config(mixer='mamba'))


def test_text_keys_and_values_are_projected_once_per_forward_not_per_iteration():
    model = _wake_up(Iris(_tiny_config()))
    calls = []
    for layer in model.core:
        layer.cross_attention.key_value.register_forward_hook(lambda *_: calls.append(1))
    model(*_inputs(), iters=5)
    assert len(calls) == model.config.core_layers


def test_the_text_stage_reads_word_order_and_ignores_padding():
    """Without a text stage, swapping two prompt tokens only swaps their keys and values and
    leaves the pooled conditioning as it was: the order reaches the Core only through the
    encoder's own features. The stage's positions and self-attention make both depend on it;
    padded tokens change nothing either way."""
    z, t, text, mask = _inputs()  # the second prompt's tokens from the third on are padding
    order = [1, 0, 2, 3, 4]
    for text_layers in (0, 2):
        model = _wake_up(Iris(_tiny_config(text_layers=text_layers))).eval()
        kv, cond, _ = model.encode_prompt(text, mask)
        kv_swapped, cond_swapped, _ = model.encode_prompt(text[:, order], mask)
        bag_of_words = torch.allclose(cond, cond_swapped, atol=1e-6) and torch.allclose(kv[..., order, :], kv_swapped,
                                                                                        atol=1e-6)
        assert bag_of_words == (text_layers == 0), text_layers
        padded = text.clone()
        padded[1, 2:] = torch.randn(3, text.shape[-1])
        kv_padded, cond_padded, _ = model.encode_prompt(padded, mask)
        torch.testing.assert_close(cond_padded, cond)
        torch.testing.assert_close(kv_padded[:, :, 1, :, :2], kv[:, :, 1, :, :2])


def test_a_new_control_adapter_leaves_the_output_bit_identical_and_is_what_trains():
    base = _wake_up(Iris(_tiny_config()))
    controlled = Iris(_tiny_config(control='edges'))
    controlled.load_state_dict(base.state_dict() | {f'control_adapter.{k}': v
                                                    for k, v in controlled.control_adapter.state_dict().items()})
    z, t, text, mask = _inputs(side=4)
    control = control_map(make_shapes(2, 64, seed=4)[0], 'edges')
    assert torch.equal(controlled(z, t, text, mask, 3, control_map=control), base(z, t, text, mask, 3))
    controlled.requires_grad_(False).control_adapter.requires_grad_(True)
    controlled(z, t, text, mask, 3, control_map=control).square().mean().backward()
    assert controlled.control_adapter.out.weight.grad.abs().sum() > 0  # zero output, but not a zero gradient
    assert count_parameters(controlled)['control'] == sum(p.numel() for p in controlled.control_adapter.parameters())
    with torch.no_grad():
        controlled.control_adapter.out.weight.normal_()
    prompt = controlled.encode_prompt(text, mask)
    assert torch.equal(controlled.velocity(z, t, prompt, 3, controlled.encode_control(control, strength=0.0))[0],
                       base(z, t, text, mask, 3))
    assert not torch.equal(controlled(z, t, text, mask, 3, control_map=control), base(z, t, text, mask, 3))
    with pytest.raises(ValueError, match='no control adapter'):
        base.encode_control(control)


def test_outputs_finite_at_one_and_sixteen_iterations():
    model = _wake_up(Iris(_tiny_config())).eval()
    with torch.no_grad():
        for iters in (1, 16):
            assert torch.isfinite(model(*_inputs(), iters=iters)).all()


def test_core_conditioning_changes_with_the_iteration_index():
    model = _wake_up(Iris(_tiny_config()))
    torch.manual_seed(2)
    s, e, c_base = torch.randn(2, 16, 48), torch.randn(2, 16, 48), torch.randn(2, 48)
    text_kv, mask = torch.randn(model.config.core_layers, 2, 2, model.config.heads, 5, 48 // model.config.heads), \
        torch.ones(2, 5, dtype=torch.bool)
    prepared = [layer.mixer.prepare((4, 4)) for layer in model.core]
    steps = [model.core_iteration(s, e, model.core_condition(c_base, torch.full((2,), i / 8)), text_kv, mask, (4, 4),
                                  prepared) for i in (0, 1, 7)]
    assert (steps[0] - steps[1]).abs().max() > 1e-3 and (steps[1] - steps[2]).abs().max() > 1e-3


def test_training_draws_r_uniformly_or_from_huginns_heavy_tail():
    generator = torch.Generator().manual_seed(0)
    uniform = [draw_iters((2, 4, 6), 0.0, generator) for _ in range(3000)]
    assert set(uniform) == {2, 4, 6} and abs(np.mean(uniform) - 4) < 0.1
    # 1 + Poisson(exp(tau)): E = 1 + E[exp(tau)] = 1 + exp(log(m - 1) - s^2/2 + s^2/2) = m
    heavy = np.array([draw_iters((64,), 6.0, generator) for _ in range(20000)])
    assert abs(heavy.mean() - 6) < 0.1 and heavy.min() >= 1 and heavy.max() <= 64
    assert np.median(heavy) < 6 and (heavy >= 12).mean() > 0.03  # mostly short, sometimes long
    assert max(draw_iters((8,), 6.0, generator) for _ in range(2000)) == 8  # capped at max(train_iters)


@pytest.mark.parametrize('amx, avx512_bf16, expected', [(False, False, 'float32'), (True, False, 'bfloat16'),
                                                         (False, True, 'bfloat16')])
def test_auto_dtype_on_a_cpu_is_bf16_only_where_the_cpu_has_it_natively(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    assert precision.resolve_dtype('auto', 'cpu') == expected
    assert precision.resolve_dtype('float16', 'cpu') == 'float16'  # a dtype asked for is kept


def test_no_config_forces_a_dtype():  # 'auto' knows the machine; a config file does not
    for path in glob.glob(os.path.join(HERE, 'config', '*.py')):
        for script in ('train_vae', 'train_control' if path.endswith('_edges.py') else 'train_flow', 'distill'):
            assert 'dtype' not in read_config_file(path, script), (path, script)


def test_adaptive_iterations_stop_each_sample_where_its_state_settles():
    # s -> a s + (1 - a) converges to 1 with ||s_{i+1} - s_i|| / ||s_{i+1}|| known per step;
    # the reference runs each sample alone and stops at the first step within tolerance
    rates = torch.tensor([0.1, 0.5, 0.9])
    iteration = lambda i, s: rates[:, None, None] * s + (1 - rates[:, None, None])  # noqa: E731
    s, used = iterate_core(iteration, torch.zeros(3, 4, 2), 100, exit_tolerance=1e-3)
    for k, rate in enumerate(rates):
        state, steps = torch.zeros(4, 2), 0
        while steps < 100:
            following = rate * state + (1 - rate)
            steps += 1
            settled = (following - state).norm() <= 1e-3 * following.norm()
            state = following
            if settled:
                break
        assert used[k] == steps and torch.equal(s[k], state)
    assert used[0] < used[1] < used[2] < 100
    assert iterate_core(iteration, torch.zeros(3, 4, 2), 5)[1].tolist() == [5, 5, 5]  # without a tolerance: iters


def test_adaptive_iterations_are_the_fixed_ones_at_the_extremes():
    model = _wake_up(Iris(_tiny_config(iteration_embedding='none'))).eval()
    z, t, text, mask = _inputs()
    with torch.no_grad():
        prompt = model.encode_prompt(text, mask)
        fixed = {r: model(z, t, text, mask, r) for r in (1, 6)}
        never, never_used = model.velocity(z, t, prompt, 6, exit_tolerance=1e-30)  # never settles: runs the cap
        torch.testing.assert_close(never, fixed[6], rtol=0, atol=0)
        at_once, at_once_used = model.velocity(z, t, prompt, 6, exit_tolerance=1e30)  # settles at once: one iteration
        torch.testing.assert_close(at_once, fixed[1], rtol=0, atol=0)
    assert never_used.tolist() == [6, 6] and at_once_used.tolist() == [1, 1]


def test_a_core_told_nothing_of_its_iteration_repeats_one_map():
    # iteration_embedding='none' (Huginn): no progress embedder, and iteration i is the same
    # function of (s, e) for every i and r
    model = _wake_up(Iris(_tiny_config(iteration_embedding='none')))
    assert model.progress_embed is None
    z, t, text, mask = _inputs()
    text_kv, text_cond, _ = model.encode_prompt(text, mask)
    e, c_base = model.prelude_forward(z, t, text_cond)
    prepared = [layer.mixer.prepare((8, 8)) for layer in model.core]
    modulations = model.core_condition(c_base, None)
    s = e
    for _ in range(3):
        s = model.core_iteration(s, e, modulations, text_kv, mask, (8, 8), prepared)
    expected = model.coda_forward(s, c_base, (8, 8))
    torch.testing.assert_close(model.velocity(z, t, (text_kv, text_cond, mask), 3)[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('mixer', ['grfm', 'attention'])
def test_velocity_equals_iterations_that_compute_everything_themselves(mixer):
    # velocity() computes each iteration's conditioning and the mixers' weight-derived matrices
    # once; the reference recomputes them at every iteration, as the exported core method does
    model = _wake_up(Iris(_tiny_config(mixer=mixer)))
    z, t, text, mask = _inputs()
    text_kv, text_cond, _ = prompt = model.encode_prompt(text, mask)
    e, c_base = model.prelude_forward(z, t, text_cond)
    s = e
    for i in range(3):
        c = c_base + model.progress_embed(torch.full((2,), i / 3))
        s = model.injection(torch.cat([s, e], dim=-1))
        for layer, layer_kv in zip(model.core, text_kv):
            shift1, scale1, gate1, gate2, shift3, scale3, gate3 = layer.modulation(c).unsqueeze(1).chunk(7, dim=-1)
            s = s + gate1 * layer.mixer(layer.norm1(s) * (1 + scale1) + shift1, (8, 8))
            s = s + gate2 * layer.cross_attention(layer.norm2(s), layer_kv, mask[:, None, None, :])
            s = s + gate3 * layer.ffn(layer.norm3(s) * (1 + scale3) + shift3)
    expected = model.coda_forward(s, c_base, (8, 8))
    torch.testing.assert_close(model.velocity(z, t, prompt, 3)[0], expected, rtol=0, atol=1e-5)


@FULL
@pytest.mark.parametrize('name,target', [('tiny', 19e6), ('small', 47e6), ('base', 135e6)])
def test_model_sizes_match_the_seed_within_ten_percent(name, target):
    counts = count_parameters(SIZES[name]())
    assert abs(counts['total'] - target) <= 0.1 * target, counts
    assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')


# -----------------------------------------------------------------------------
# procedural.py, data.py and text.py


def test_shapes_are_deterministic_and_captioned():
    images, captions = make_shapes(6, 32, seed=5)
    again, captions_again = make_shapes(4, 32, seed=5)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    assert torch.equal(images[:4], again) and captions[:4] == captions_again  # item i does not depend on N
    assert all(c.startswith('a ') and c.endswith(' background') for c in captions)
    assert not torch.equal(make_shapes(4, 32, seed=6)[0], again)


def test_conflicting_shape_captions_keep_the_colours_and_name_another_type_and_place():
    conflicts = conflicting_shape_captions(200, seed=3)
    assert conflicts == conflicting_shape_captions(200, seed=3)
    for i, conflict in enumerate(conflicts):
        a = shape_attributes(3, i)
        assert conflict.startswith(f"a small {a['colour']} ") or conflict.startswith(f"a large {a['colour']} ")
        assert conflict.endswith(f" on a {a['background']} background")
        assert a['shape'] not in conflict and POSITIONS[a['position']][1] not in conflict
    assert len(set(conflicts)) > 100  # not a few fixed layouts


def test_scenes_are_deterministic_and_every_test_caption_is_a_new_combination():
    images, captions = make_scenes(12, 64, seed=5)
    again, captions_again = make_scenes(6, 64, seed=5)
    assert images.shape == (12, 3, 64, 64) and torch.equal(images[:6], again) and captions[:6] == captions_again
    train = [scene_attributes(0, i) for i in range(600)]
    test = [scene_attributes(1, i, test=True) for i in range(600)]
    assert {s['task'] for s in test} == set(TASKS) and all(not held_out(s) for s in train)
    assert all(held_out(s) for s in test if s['task'] != 'single object')
    seen = {scene_caption(s) for s in train}
    assert {scene_caption(s) for s in test} & seen == {'a circle', 'a square', 'a triangle', 'a diamond'}
    for s in train + test:  # drawn as captioned: the relation by its gap, no two shapes touching
        spots = [(o['x'], o['y'], o['r']) for o in s['objects']]
        assert len(spots) == {'counting': len(spots), 'single object': 1, 'colours': 1}.get(s['task'], 2)
        assert s['relation'] is None or drawn_clearly(s['relation'], spots[0], spots[1])
        assert all(math.dist(a[:2], b[:2]) > 1.2 * (a[2] + b[2]) for a, b in itertools.combinations(spots, 2))
    assert scene_caption(dict(task='colour attribution', relation=None, objects=[
        dict(shape='circle', colour='orange'), dict(shape='square', colour='blue')])) == \
        'an orange circle and a blue square'


def test_control_maps_of_a_drawn_square_against_hand_made_ones():
    image = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    image[:, 0] = 200  # a red background
    image[:, :, 4:12, 6:10] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]  # a blue rectangle
    inside = torch.zeros(1, 1, 16, 16)
    inside[..., 4:12, 6:10] = 1
    assert torch.equal(control_map(image, 'silhouette'), inside)
    # Sobel reads a step on the two pixels either side of it: the rectangle's ring and the one outside it
    grown = F.max_pool2d(inside, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-inside, 3, stride=1, padding=1)
    assert torch.equal(control_map(image, 'edges'), grown - shrunk)
    ring = grown - shrunk
    assert control_f1(ring, ring).item() == 1.0
    assert control_f1(ring.roll(1, -1), ring).item() == 1.0  # one pixel off is within the tolerance
    assert control_f1(ring.roll(4, -1), ring, tolerance=0).item() < 0.5
    assert control_f1(torch.zeros_like(ring), ring).item() == 0.0


def _write_folder(folder):
    images, captions = make_shapes(5, 40, seed=0)
    rows = []
    for i in range(5):
        name = f"{i}.png"
        img = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        if i == 1:
            img = img.convert('L')  # grayscale
        if i == 2:
            img = img.convert('RGBA').resize((60, 40))  # transparency and another aspect ratio
        img.save(folder / name)
        rows.append({'file_name': name, 'text': captions[i]})
    (folder / 'corrupt.png').write_bytes(b'this is not a png')
    (folder / 'empty.jpg').write_bytes(b'')
    rows += [{'file_name': 'corrupt.png', 'text': 'x'}, {'file_name': 'empty.jpg', 'text': 'y'}]
    (folder / 'metadata.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return captions


@FULL
def test_twemoji_prepare_is_deterministic_and_keeps_each_emoji_in_one_split(tmp_path):
    for out in ('a', 'b'):
        result = _run(['data/emoji/prepare.py', '--styles=twemoji', '--size=32', '--source=png',
                       f'--out={tmp_path / out}'], tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*') if p.is_file())
    assert len(files) > 3000
    assert all((tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes() for f in files)
    splits = {}
    for split in ('train', 'test'):
        images, captions = load_imagefolder(str(tmp_path / 'a' / split), 32)
        assert images.shape[1:] == (3, 32, 32) and (images[:, :, 0, 0] == 255).all(1).float().mean() > 0.5  # on white
        splits[split] = {caption.split(', ')[0] for caption in captions}  # the emoji without its skin tone
    assert 'grinning face' in splits['train'] | splits['test'] and not splits['train'] & splits['test']
    assert 'CC BY 4.0' in (tmp_path / 'a' / 'LICENSE.txt').read_text()


@FULL
def test_emoji_styles_share_one_split_and_say_their_style(tmp_path):
    if not os.path.isdir(os.path.join(HERE, 'data', 'emoji', 'node_modules', '@svgmoji', 'noto')):
        pytest.skip("the emoji styles' npm packages are not installed (npm ci --prefix data/emoji)")
    styles = ('noto', 'fluent', 'emojione')
    for out in ('a', 'b'):
        result = _run(['data/emoji/prepare.py', f'--styles={",".join(styles)}', '--size=16', f'--out={tmp_path / out}'],
                      tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*') if p.is_file())
    assert all((tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes() for f in files)
    emoji = {}  # split -> the emoji it holds, in any style, without style or skin tone
    for split in ('train', 'test'):
        rows = [json.loads(line) for line in (tmp_path / 'a' / split / 'metadata.jsonl').read_text().splitlines()]
        assert {row['style'] for row in rows} == set(styles)
        styled = [row for row in rows if row['text'].endswith(f", in the {row['style']} style")]
        plain = [row for row in rows if row not in styled]
        assert len(styled) == len({row['file_name'] for row in rows})  # each image once with its style
        assert [row['file_name'] for row in plain] == ([row['file_name'] for row in styled] if split == 'train' else [])
        emoji[split] = {row['text'].split(', ')[0] for row in styled}
        images, _ = load_imagefolder(str(tmp_path / 'a' / split), 16)
        assert len(images) == len(rows) and (images[:, :, 0, 0] == 255).all(1).float().mean() > 0.5  # on white
    assert not emoji['train'] & emoji['test'] and 'red apple' in emoji['train'] | emoji['test']
    assert all(Image.open(tmp_path / 'a' / f).size == (16, 16) for f in files if f.suffix == '.png')  # flags too
    licence = (tmp_path / 'a' / 'LICENSE.txt').read_text()
    assert all(name in licence for name in ('Apache License 2.0', 'MIT', 'CC BY 4.0'))


def test_imagefolder_loader_converts_odd_images_and_skips_corrupt_ones(tmp_path):
    captions = _write_folder(tmp_path)
    with pytest.warns(UserWarning, match='skipped 2 unreadable'):
        images, loaded = load_imagefolder(str(tmp_path), 32)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(loaded) == sorted(captions)


def test_imagefolder_skips_bad_metadata_unnamed_and_huge_images(tmp_path):
    captions = _write_folder(tmp_path)
    Image.new('1', (9000, 8000)).save(tmp_path / 'huge.png')  # 72M pixels, a few KB on disk
    Image.new('RGB', (8, 8)).save(tmp_path / 'unnamed.png')
    with open(tmp_path / 'metadata.jsonl', 'ab') as f:
        f.write(b'{"file_name": "huge.png", "text": "too big"}\n')
        f.write(b'{"file_name": "0.png", "text": "caf\xe9 in latin-1"}\n')  # not UTF-8
        f.write(b'{"file_name": "1.png"}\n\n')                               # no caption
        f.write(b'{"file_name": "../outside.png", "text": "leaves the folder"}\n')
        f.write(b'{"file_name": "%s", "text": "an absolute path"}\n' % str(tmp_path / '0.png').encode())
    Image.new('RGB', (8, 8)).save(tmp_path.parent / 'outside.png')  # readable: only its path is wrong
    with pytest.warns(UserWarning) as caught:
        images, got = load_imagefolder(str(tmp_path), 32)
    messages = ' | '.join(str(w.message) for w in caught)
    assert 'skipped 4 line(s)' in messages and 'e.g. line 9' in messages
    assert 'skipped 1 image(s) with no line' in messages and 'unnamed.png' in messages
    assert 'skipped 3 unreadable' in messages  # corrupt.png, empty.jpg and huge.png
    assert images.shape == (5, 3, 32, 32) and got == captions


def _png_header_only(path, width, height):
    """A PNG that declares width x height in its header and holds no pixels: a decompression
    bomb's first bytes, which is all a guard against one may read."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


@pytest.mark.parametrize('side', [9000, 30000])  # over MAX_PIXELS; over PIL's own bomb limit
def test_an_image_a_user_hands_in_is_refused_from_its_header_when_huge(tmp_path, side):
    _png_header_only(tmp_path / 'big.png', side, side)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # PIL's DecompressionBombWarning would be noise
        with pytest.raises(UsageError, match='big.png is over the 64 Mpixel limit; resize it first'):
            open_image(str(tmp_path / 'big.png'), 'init_image')


def test_image_tensor_of_a_pil_image_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # torch warns on a read-only NumPy view of the PIL image
        picture = image_tensor(Image.new('RGB', (40, 32), (10, 20, 30)), 16)
    assert picture.shape == (1, 3, 16, 16) and picture[0, :, 0, 0].tolist() == [10, 20, 30]


def test_load_data_holds_out_a_disjoint_split(tmp_path):
    _write_folder(tmp_path)
    with pytest.warns(UserWarning):
        (train, train_captions), (held, held_captions) = load_data('shapes', str(tmp_path), 32, 0, num_holdout=2)
    assert len(train) == 3 and len(held) == 2 and not set(train_captions) & set(held_captions)


def test_missing_folder_and_offline_hub_fail_fast_with_a_clear_message(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match='no metadata.jsonl'):
        load_imagefolder(str(tmp_path), 32)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty-hf-cache'))  # nothing cached
    monkeypatch.setattr('data._hub_reachable', lambda: False)
    start = time.time()
    with pytest.raises(UsageError, match='--data_dir'):
        load_hub('someone/some-captioned-images', 32)
    assert time.time() - start < 30  # the real client retries for minutes when left alone


def test_minilm_tokens_masks_empty_and_overlong_prompts():
    encoder = load_text_encoder('minilm')
    assert encoder.width == 384 and len(encoder.tokenizer) == 30522
    with pytest.warns(UserWarning, match='only the first 77'):
        text, mask = encoder(['a red circle', '', 'red ' * 200])
    assert text.shape == (3, 77, 384) and mask.sum(1).tolist() == [5, 2, 77]  # '' is [CLS] [SEP], not nothing
    alone = encoder(['a red circle']).text
    torch.testing.assert_close(alone[0], text[0, :5], rtol=0, atol=1e-4)  # padding does not leak into real tokens
    assert (alone[0] - encoder(['a blue circle']).text[0]).abs().max() > 0.1


def test_missing_clip_fails_at_once_with_a_message():
    with pytest.raises(UsageError, match='not on this machine'):
        load_text_encoder('openai/clip-vit-large-patch14')


# -----------------------------------------------------------------------------
# cache.py


class _Offset(nn.Module):
    """A stand-in text encoder: each prompt becomes one token per word."""
    name, width = 'offset', 4

    def forward(self, prompts):
        length = max(len(p.split()) for p in prompts) + 1
        mask = torch.tensor([[i <= len(p.split()) for i in range(length)] for p in prompts])
        return torch.arange(length, dtype=torch.float)[None, :, None].repeat(len(prompts), 1, 4) * mask[..., None], mask


def test_training_set_cache_is_built_once_and_keyed(tmp_path, monkeypatch):
    vae = WaveletVAE(channels=(8, 16, 16))
    vae_dir = tmp_path / 'vae'
    vae_dir.mkdir()
    (vae_dir / 'ckpt.safetensors').write_bytes(b'stands for the checkpoint: only its hash is read')
    settings = dict(dataset='shapes', data_dir='', image_size=32, num_images=12, num_holdout=4)
    first = load_training_set(settings, vae, str(vae_dir), _Offset(), str(tmp_path / 'cache'))
    images, captions = make_shapes(12, 32)
    assert first['latents'].shape == (12, 16, 2, 2) and len(first['holdout_captions']) == 4
    torch.testing.assert_close(first['latents'], vae.encode_latent(to_float(images)), rtol=0, atol=1e-5)
    assert first['mask'][first['caption_ids']].sum(1).tolist() == [len(c.split()) + 1 for c in captions]

    monkeypatch.setattr(cache, 'load_data', lambda **kw: pytest.fail('a cache hit must not load the data again'))
    second = load_training_set(settings, vae, str(vae_dir), _Offset(), str(tmp_path / 'cache'))
    for k in ('latents', 'caption_ids', 'tokens', 'mask'):  # a first (GPU) run gets what a later one reads
        assert (first[k].dtype, first[k].device.type) == (second[k].dtype, 'cpu') and torch.equal(first[k], second[k])
    assert second['holdout_captions'] == first['holdout_captions']
    source = inspect.getsource(procedural)
    # the code that draws the shapes is part of the key; data.py's, which reads image folders, is not
    monkeypatch.setattr(cache.inspect, 'getsource',
                        lambda module: source if module is procedural else pytest.fail(f"hashed {module.__name__}"))
    load_training_set(settings, vae, str(vae_dir), _Offset(), str(tmp_path / 'cache'))
    monkeypatch.setattr(cache.inspect, 'getsource', lambda module: source.replace('def draw_one', 'def draw_one_'))
    with pytest.raises(pytest.fail.Exception):
        load_training_set(settings, vae, str(vae_dir), _Offset(), str(tmp_path / 'cache'))
    monkeypatch.undo()
    (vae_dir / 'ckpt.safetensors').write_bytes(b'another VAE')
    monkeypatch.setattr(cache, 'load_data', lambda **kw: pytest.fail('a cache hit must not load the data again'))
    with pytest.raises(pytest.fail.Exception):
        load_training_set(settings, vae, str(vae_dir), _Offset(), str(tmp_path / 'cache'))
    assert len(os.listdir(tmp_path / 'cache')) == 1


def test_an_image_with_several_captions_is_encoded_once():
    vae = WaveletVAE(channels=(8, 16, 16))
    images = make_shapes(3, 32)[0][[0, 1, 0, 2, 1]]  # as a data set with two captions for two images has them
    encode, batches = vae.encode_latent, []
    vae.encode_latent = lambda x: batches.append(len(x)) or encode(x)
    latents = encode_images(vae, images)
    assert batches == [3]
    torch.testing.assert_close(latents, encode(to_float(images)), rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# flow.py: the maths against known flows, then training and editing


class _Field(nn.Module):
    """A velocity function v(x, t, text, mask, iters) as a generator the samplers can call:
    they encode the prompt once (here, keep it as it is), then ask for velocities."""

    def __init__(self, velocity):
        super().__init__()
        self.v = velocity

    def encode_prompt(self, text, mask):
        return text, mask

    def velocity(self, x, t, encoded_prompt, iters, hint=None, exit_tolerance=0.0):
        return self.v(x, t, *encoded_prompt, iters), torch.full((len(x),), float(iters))

    def forward(self, x, t, text, mask, iters):
        return self.v(x, t, text, mask, iters)


def test_euler_integrates_a_known_flow_exactly():
    # data = one point c: the exact velocity is v(x_t, t) = (x_t - c) / t, and its paths are
    # straight lines, which Euler integrates exactly at any step count
    c = torch.randn(1, 16, 2, 2)
    exact = _Field(lambda x, t, text, mask, iters: (x - c) / t.view(-1, 1, 1, 1))
    prompt = Prompt(torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool))
    for steps in (1, 3, 25):
        x0 = euler_sample(exact, torch.randn(3, 16, 2, 2), prompt, prompt.rows(slice(0, 1)), steps=steps, cfg_scale=1.0,
                          iters=1)
        torch.testing.assert_close(x0, c.expand(3, -1, -1, -1), rtol=0, atol=1e-5)
    t = torch.rand(64) * 0.98 + 0.01
    loss = flow_loss(exact, c.expand(64, -1, -1, -1), prompt.rows([0] * 64), 1, t, torch.randn(64, 16, 2, 2))
    assert loss.shape == (64,) and loss.max() < 1e-8  # the exact velocity, at any time


def test_guidance_combines_the_two_branches():
    def model(x, t, text, mask, iters):
        return x * (text * mask[..., None]).sum((1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)
    x, t = torch.randn(2, 16, 2, 2), torch.tensor(0.5)
    prompt = Prompt(torch.ones(2, 3, 4), torch.tensor([[True, True, True], [True, False, False]]))
    null_prompt = Prompt(torch.ones(1, 2, 4), torch.tensor([[True, False]]))
    v_cond = model(x, t.expand(2), *prompt, 1)
    v_uncond = model(x, t.expand(2), *null_prompt.rows([0, 0]), 1)
    guided_velocity = guided(_Field(model), prompt, null_prompt, 3.0)
    torch.testing.assert_close(guided_velocity(x, t, 1), v_uncond + 3 * (v_cond - v_uncond))


@pytest.mark.parametrize('dtype,mixer', [('float32', 'grfm'), ('float32', 'attention')] + [
    pytest.param(dtype, 'grfm', marks=FULL) for dtype in DTYPES[1:]])
def test_flow_training_steps_lower_the_loss_on_a_real_batch(dtype, mixer):
    # 64 px -> a 4x4 latent, which 3x3 Coda windows must pad; r = 3 with backprop through 2
    torch.manual_seed(0)
    vae = WaveletVAE(channels=(8, 16, 16))
    images, captions = make_shapes(32, 64)
    x0 = vae.encode_latent(to_float(images)).detach()
    x0 = (x0 - x0.mean()) / x0.std()
    prompt = Prompt(*_Offset()(captions))
    model = Iris(_tiny_config(text_dim=4, backprop_iters=2, window=3, mixer=mixer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    precision = mixed_precision(dtype, 'cpu')
    t, eps = torch.sigmoid(torch.randn(32)), torch.randn_like(x0)  # a fixed draw to measure on

    def held_loss():
        with torch.no_grad(), precision[0]:
            return flow_loss(model, x0, prompt, 3, t, eps).mean().item()
    before = held_loss()
    losses = [_train_step(model, optimizer, precision, lambda: flow_loss(
        model, x0, prompt, 3, torch.sigmoid(torch.randn(32)), torch.randn_like(x0)).mean()) for _ in range(60)]
    assert np.isfinite(losses).all() and held_loss() < 0.8 * before, (before, held_loss())  # 2.01 -> 1.49 in each dtype


def test_consistency_boundary_condition_is_exact():
    model = _wake_up(Iris(_tiny_config()))
    z, _, text, mask = _inputs()
    velocity = encode_once(model, Prompt(text, mask))
    assert torch.equal(consistency_fn(velocity, z, torch.zeros(2), 2), z)
    assert not torch.equal(consistency_fn(velocity, z, torch.full((2,), 0.5), 2), z)


@pytest.mark.parametrize('dtype', TIERED_DTYPES)
def test_distillation_steps_lower_the_consistency_loss(dtype):
    torch.manual_seed(0)
    images, captions = make_shapes(32, 32)
    x0 = WaveletVAE(channels=(8, 16, 16)).encode_latent(to_float(images)).detach()
    x0 = (x0 - x0.mean()) / x0.std()
    prompt, null_prompt = Prompt(*_Offset()(captions)), Prompt(*_Offset()(['']))
    teacher = _wake_up(Iris(_tiny_config(text_dim=4))).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    target = make_ema(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    grid = torch.linspace(0, 1, 9)
    n = torch.arange(32) % 8

    def loss(seed):
        torch.manual_seed(seed)
        return consistency_loss(student, target, teacher, x0=x0, prompt=prompt, null_prompt=null_prompt, t_low=grid[n],
                                t_high=grid[n + 1], cfg_scale=3.0, teacher_iters=2, iters=2, huber_c=0.01)
    precision = mixed_precision(dtype, 'cpu')
    with torch.no_grad(), precision[0]:
        before = sum(loss(seed).item() for seed in range(4))
    for step in range(40):
        _train_step(student, optimizer, precision, lambda: loss(100 + step))
        ema_update(target, student, 1000, 0.95)
    with torch.no_grad(), precision[0]:
        after = sum(loss(seed).item() for seed in range(4))
    assert np.isfinite(after) and after < 0.7 * before, (before, after)


class _Recorder(_Field):
    """Wraps a generator and keeps every latent it is asked about."""

    def __init__(self, model):
        super().__init__(self.record)
        self.model, self.seen = model, []

    def record(self, x, t, text, mask, iters):
        self.seen.append((x[:len(x) // 2].clone(), t[0].item()))  # the conditional half of the guided batch
        return self.model(x, t, text, mask, iters)


def test_img2img_strength_is_the_starting_time():
    init, noise = torch.randn(1, 16, 2, 2), torch.randn(3, 16, 2, 2)
    still = _Field(lambda x, t, text, mask, iters: torch.zeros_like(x))  # v = 0: x stays where it starts
    prompt = Prompt(torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool))
    for strength in (0.0, 0.3, 1.0):
        assert time_grid(5, 1.0, strength)[0] == strength
        x = euler_sample(still, noise, prompt, prompt.rows(slice(0, 1)), steps=5, cfg_scale=1.0, iters=1, init=init,
                         strength=strength)
        torch.testing.assert_close(x, (1 - strength) * init + strength * noise)


def test_inpainting_keeps_the_known_latent_exactly_at_every_step():
    model = _Recorder(_wake_up(Iris(_tiny_config())))
    z, _, text, mask = _inputs(side=4)
    init, noise = torch.randn(1, 16, 4, 4), torch.randn(2, 16, 4, 4)
    keep = torch.ones(1, 1, 4, 4)
    keep[..., :2, :2] = 0      # repaint the top-left 2x2 cells
    keep[..., 2, :2] = 0.5     # and blend the row below
    prompt = Prompt(text, mask)
    null_prompt = Prompt(text[:1, :2], mask[:1, :2])
    x = euler_sample(model, noise, prompt, null_prompt, steps=6, cfg_scale=3.0, iters=2, init=init, keep=keep)
    known = (keep == 1).expand_as(noise)
    for latent, t in model.seen:
        assert torch.equal(latent[known], ((1 - t) * init + t * noise)[known])
    assert torch.equal(x[known], init.expand_as(noise)[known]) and not torch.equal(x, init.expand_as(noise))
    consistency = consistency_sample(model.model, noise, prompt, steps=2, iters=2, init=init, keep=keep)
    assert torch.equal(consistency[known], init.expand_as(noise)[known])


def test_upscale_keeps_the_small_image_as_the_outputs_2x2_means():
    torch.manual_seed(0)
    vae = WaveletVAE(channels=(8, 16, 16)).eval()
    model = _wake_up(Iris(_tiny_config()))
    def encoder(prompts):
        return torch.randn(len(prompts), 5, 24), torch.ones(len(prompts), 5, dtype=torch.bool)
    small = make_shapes(2, 32, seed=5)[0]
    images = upscale(model, vae, encoder, small, ['a', 'b'], torch.randn(2, 16, 4, 4), strength=0.5, steps=2, iters=2)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    means = F.avg_pool2d(images.float(), 2)
    assert (means - small.float()).abs().max() <= 0.5 + 1e-3  # equal up to rounding each pixel to 8 bits
    assert (images.float() - small.float().repeat_interleave(2, -1).repeat_interleave(2, -2)).abs().max() > 0


# -----------------------------------------------------------------------------
# training.py, checkpoint.py, precision.py: schedules, optimizers, checkpoints, locks, precision


def test_lr_schedules_warm_up_then_decay_to_min_lr():
    cosine = [training.lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    wsd = [training.lr_at(s, 100, 10, 1.0, 0.0, cooldown=0.4) for s in range(100)]
    linear = [training.lr_at(s, 100, 10, 1.0, 0.0, cooldown=1.0) for s in range(100)]
    assert cosine[:10] == wsd[:10] == linear[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert cosine[10] == 1.0 and cosine[55] == pytest.approx(0.55) and cosine[-1] == pytest.approx(0.1, abs=1e-3)
    assert wsd[10:60] == [1.0] * 50 and wsd[60:] == pytest.approx([1 - (s - 60) / 40 for s in range(60, 100)])
    assert linear[10:] == pytest.approx([1 - (s - 10) / 90 for s in range(10, 100)])


def test_orthogonalise_keeps_the_singular_vectors_and_squeezes_the_singular_values():
    torch.manual_seed(0)
    for G in (torch.randn(40, 150), torch.randn(150, 40)):
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        X = training.orthogonalise(G)
        inner = U.T @ X @ Vh.T  # diagonal when X = U S' V^T
        assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-4)
        assert 0.6 < torch.diagonal(inner).min() and torch.diagonal(inner).max() < 1.25


def test_muon_is_torch_muon_on_the_hidden_matrices_and_adamw_on_the_rest():
    # torch.optim.Muon (Newton-Schulz in bf16) and torch.optim.AdamW as the references
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 48), nn.SiLU(), nn.LayerNorm(48), nn.Linear(48, 32), nn.SiLU(),
                          nn.Linear(32, 5))
    ours = copy.deepcopy(model)
    optimizer = training.make_optimizer(ours, 1e-2, 0.1, muon=True, ends=(ours[0], ours[-1]))
    assert [len(group['params']) for group in optimizer.param_groups] == [1, 7]
    matrix = model[3].weight
    references = [torch.optim.Muon([matrix], lr=1e-2, weight_decay=0.1, adjust_lr_fn='match_rms_adamw'),
                  torch.optim.AdamW([p for p in model.parameters() if p is not matrix], lr=1e-2, weight_decay=0.1,
                                    betas=(0.9, 0.99))]
    start = matrix.detach().clone()
    for step in range(3):  # both take our network's gradients
        ours(torch.randn(16, 12)).square().mean().backward()
        for p, q in zip(model.parameters(), ours.parameters()):
            p.grad = q.grad.clone()
        for stepper in references + [optimizer]:
            stepper.step()
            stepper.zero_grad()
    for name, p in model.named_parameters():
        if p is not matrix:
            assert torch.allclose(p, ours.get_parameter(name), atol=1e-6), name
    moved, reference_moved = ours[3].weight - start, matrix - start
    # torch's Newton-Schulz runs in bf16 (ours in the weights' dtype, fp64's to 1e-6): 1-3% apart a step
    assert (moved - reference_moved).norm() < 0.1 * reference_moved.norm()
    # a convolution's weight (out, in, k, k) is stepped as the matrix (out, in k k); the ends are AdamW's
    vae = WaveletVAE(channels=(8, 16, 32))
    ends = (vae.encoder[0], vae.decoder[-1])
    muon_group, _ = training.make_optimizer(vae, 1e-3, 0.0, muon=True, ends=ends).param_groups
    assert {p.ndim for p in muon_group['params']} == {4}
    assert not {id(end.weight) for end in ends} & set(map(id, muon_group['params']))


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = WaveletVAE(channels=(8, 16, 32))
    ema, optimizer, generator = make_ema(model), torch.optim.AdamW(model.parameters()), torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    wavelet_hat, mean, logvar = model(x)
    vae_loss(wavelet_hat, x, mean, logvar)[0].backward()
    optimizer.step()
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale is made on first use
    scaler.update(new_scale=256.0)  # as after two overflowed fp16 steps
    path = str(tmp_path / 'ckpt.safetensors')
    save_checkpoint(path, model, ema, optimizer, 7, {'lr': 1.0}, generator, scaler)
    expected_draws = (torch.rand(3), torch.rand(3, generator=generator))

    restored = WaveletVAE(channels=(8, 16, 32))
    restored_ema = make_ema(restored)
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    restored_generator = torch.Generator()
    restored_scaler = torch.amp.GradScaler('cpu')
    resumed = load_checkpoint(path, restored, restored_ema, restored_optimizer, restored_generator, restored_scaler)
    assert resumed['step'] == 7
    assert restored_scaler.state_dict() == scaler.state_dict() and restored_scaler.get_scale() == 256.0
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()['state'][0]['exp_avg_sq'],
                       restored_optimizer.state_dict()['state'][0]['exp_avg_sq'])
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert torch.equal(torch.rand(3, generator=restored_generator), expected_draws[1])
    with pytest.raises(UsageError, match='holds another model'):
        other = WaveletVAE(channels=(8, 16, 16))
        load_checkpoint(path, other, make_ema(other), torch.optim.AdamW(other.parameters()), torch.Generator())
    with pytest.raises(UsageError, match='no checkpoint at'):
        read_checkpoint(str(tmp_path / 'missing.safetensors'))
    with pytest.raises(UsageError, match="holds another optimizer's state .*muon=False"):  # AdamW's, resumed with Muon
        load_checkpoint(path, restored, restored_ema, training.make_optimizer(restored, 1e-3, 0.0, muon=True),
                        torch.Generator())


def test_fp16_skips_an_overflowed_step_and_stops_when_the_scale_collapses():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, scaler = mixed_precision('float16', 'cpu')
    scaler.scale(torch.ones(()))  # the scale is made on first use: 2^16

    def overflowed_step():
        model.weight.grad, model.bias.grad = torch.full((1, 2), float('inf')), torch.zeros(1)
        optimizer_step(model, optimizer, scaler, grad_clip=1.0)
    weight = model.weight.detach().clone()
    overflowed_step()  # skipped and halved, not an error
    assert torch.equal(model.weight, weight) and scaler.get_scale() == 2.0 ** 15
    with pytest.raises(UsageError, match='loss scale fell to 2.0e-03: the gradients overflow at every scale'):
        for _ in range(30):
            overflowed_step()


@pytest.mark.parametrize('hard_links', [True, False])
def test_keep_last_checkpoints(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # Google Drive's mount in Colab, and other file systems that refuse them
        def refuse(src, dst):
            raise OSError(errno.EPERM, 'Operation not permitted', src)
        monkeypatch.setattr(os, 'link', refuse)
    model = WaveletVAE(channels=(8, 16, 16))
    path = str(tmp_path / 'ckpt.safetensors')
    for step in range(1, 6):
        save_checkpoint(path, model, make_ema(model), torch.optim.AdamW(model.parameters()), step, {},
                        torch.Generator(), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ['ckpt.safetensors', 'ckpt_000004.safetensors', 'ckpt_000005.safetensors',
                                            'config.json']
    assert read_checkpoint(str(tmp_path / 'ckpt_000004.safetensors'), prefixes=())[1]['step'] == 4
    newest = tmp_path / 'ckpt_000005.safetensors'
    assert newest.read_bytes() == (tmp_path / 'ckpt.safetensors').read_bytes()
    assert os.stat(newest).st_nlink == (2 if hard_links else 1)


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    saver = (f"import sys, torch; sys.path.insert(0, {HERE!r})\n"
             "from checkpoint import save_checkpoint\nfrom training import make_ema\nfrom vae import WaveletVAE\n"
             "model = WaveletVAE(channels=(64, 128, 256), blocks_per_stage=2)  # 10M parameters: a save takes a while\n"
             "ema, optimizer = make_ema(model), torch.optim.AdamW(model.parameters())\n"
             "for step in range(1, 1000):\n"
             "    save_checkpoint(sys.argv[1], model, ema, optimizer, step, {}, torch.Generator())\n"
             "    print(step, flush=True)\n")
    path = tmp_path / 'ckpt.safetensors'
    delays = iter([0.05, 0.13, 0.29, 0.41])
    for delay in delays:
        process = subprocess.Popen([sys.executable, '-c', saver, str(path)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == '1'  # one complete checkpoint exists
        time.sleep(delay)
        process.kill()  # SIGKILL, most likely in the middle of the next save
        process.wait()
        tensors, meta = read_checkpoint(str(path))
        assert meta['step'] >= 1 and len(tensors) > 100


def test_a_full_disk_during_a_save_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model = WaveletVAE(channels=(8, 16, 16))
    ema, optimizer, path = make_ema(model), torch.optim.AdamW(model.parameters()), str(tmp_path / 'ckpt.safetensors')
    save_checkpoint(path, model, ema, optimizer, 1, {}, torch.Generator())

    def disk_full(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device', filename)
    monkeypatch.setattr(checkpoint, 'save_file', disk_full)
    with pytest.raises(UsageError, match='cannot write checkpoint .* at step 2 .No space left on device.') as e:
        save_checkpoint(path, model, ema, optimizer, 2, {}, torch.Generator())
    assert '\n' not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ['ckpt.safetensors', 'ckpt_000001.safetensors', 'config.json']
    assert read_checkpoint(path)[1]['step'] == 1


def test_unreadable_checkpoints_are_one_line_and_resume_takes_the_newest_intact_one(tmp_path, capsys):
    model = WaveletVAE(channels=(8, 16, 16))
    ema, optimizer, path = make_ema(model), torch.optim.AdamW(model.parameters()), tmp_path / 'ckpt.safetensors'
    for step in (1, 2, 3):
        save_checkpoint(str(path), model, ema, optimizer, step, {}, torch.Generator())
    good = path.read_bytes()
    save_file({'x': torch.zeros(2)}, str(tmp_path / 'foreign.safetensors'))
    foreign = (tmp_path / 'foreign.safetensors').read_bytes()
    for bad in (good[:len(good) // 2], good[:5], b'', b'PK\x03\x04 a zip renamed', foreign):
        path.unlink()  # a new file, as a copy or a sync writes it: ckpt_000003 keeps the old one
        path.write_bytes(bad)
        with pytest.raises(UsageError, match='is not a readable IRIS checkpoint .*copy it again') as e:
            read_checkpoint(str(path))
        assert '\n' not in str(e.value)
        assert load_checkpoint(str(path), model, ema, optimizer, torch.Generator())['step'] == 3
        assert 'resuming from' in capsys.readouterr().out
    (tmp_path / 'ckpt_000003.safetensors').write_bytes(good[:100])  # the newest numbered copy is cut short too
    assert load_checkpoint(str(path), model, ema, optimizer, torch.Generator())['step'] == 2
    assert 'ckpt_000002.safetensors (step 2)' in capsys.readouterr().out


def test_a_checkpoint_with_the_old_parameter_names_loads_unchanged(tmp_path):
    from safetensors import safe_open
    model = _wake_up(Iris(_tiny_config()))
    ema, path = make_ema(model), str(tmp_path / 'ckpt.safetensors')
    save_checkpoint(path, model, ema, torch.optim.AdamW(model.parameters()), 5, {}, torch.Generator())
    with safe_open(path, framework='pt') as f:  # rewrite it as a run made before the renames wrote it
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old_names = {k.replace('.injection.', '.adapter.').replace('.decay_logit', '.log_lambda'): v
                 for k, v in tensors.items()}
    assert any('.adapter.' in k for k in old_names) and any(k.endswith('.log_lambda') for k in old_names)
    save_file(old_names, path, metadata=metadata)
    loaded, _, _ = checkpoint.load_generator(str(tmp_path))
    for (name, expected), (loaded_name, weights) in zip(ema.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name and torch.equal(expected, weights)
    resumed = load_checkpoint(path, model, make_ema(model), torch.optim.AdamW(model.parameters()), torch.Generator())
    assert resumed['step'] == 5


def test_one_run_per_out_dir_and_a_killed_runs_lock_is_taken_over(tmp_path):
    lock = tmp_path / 'run.lock'
    lock.write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(UsageError, match=f'another run .pid {os.getppid()}. is writing to'):
        checkpoint.lock_out_dir(str(tmp_path))
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    lock.write_text(gone.stdout.strip())  # a run killed before it could remove its lock
    holder = (f"import os, sys; sys.path.insert(0, {HERE!r}); from checkpoint import lock_out_dir\n"
              "lock_out_dir(sys.argv[1]); print(os.getpid(), open(sys.argv[1] + '/run.lock').read())")
    result = subprocess.run([sys.executable, '-c', holder, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert 'no longer runs; taking it over' in result.stdout, result.stderr
    pid, held_by = result.stdout.splitlines()[-1].split()
    assert pid == held_by and not lock.exists()  # it held the lock, and removed it at exit


def test_a_full_disk_when_a_run_starts_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpoint.os, 'write', disk_full)
    with pytest.raises(UsageError, match='cannot write .*run.lock .No space left on device.; free some space') as e:
        checkpoint.lock_out_dir(str(tmp_path / 'run'))
    assert '\n' not in str(e.value)
    assert not (tmp_path / 'run').exists()  # neither an empty lock nor the folder it made


def test_a_script_prints_a_usage_error_and_a_warning_as_one_line_each_and_a_bug_with_its_traceback(tmp_path):
    os.makedirs(tmp_path / 'images')
    Image.new('RGB', (32, 32)).save(tmp_path / 'images' / 'a.png')
    (tmp_path / 'images' / 'metadata.jsonl').write_text('{"file_name": "a.png", "text": "black"}\nnot json\n')
    (tmp_path / 'x.py').write_text(
        f"import sys, warnings; sys.path.insert(0, {HERE!r})\n"
        "import configurator, data\n"
        "settings = configurator.configure({'__file__': 'x.py', 'bug': False})\n"
        "warnings.warn('not from IRIS')\n"
        "data.load_imagefolder('images', 32)  # warns of the line that is not JSON\n"
        "raise ValueError('a bug') if settings['bug'] else configurator.UsageError('no such run; train one')\n")
    result = subprocess.run([sys.executable, 'x.py'], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert 'x.py:4: UserWarning: not from IRIS' in result.stderr  # another library's warning keeps its source
    assert '\nwarning: images/metadata.jsonl: skipped 1 line(s)' in result.stderr and 'data.py' not in result.stderr
    assert result.stderr.endswith('\nerror: no such run; train one\n'), result.stderr
    result = subprocess.run([sys.executable, 'x.py', '--bug=True'], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and 'Traceback' in result.stderr and 'ValueError: a bug' in result.stderr


def test_a_checkpoint_of_the_other_kind_is_one_line(tmp_path):
    vae, generator = WaveletVAE(channels=(8, 16, 16)), Iris(_tiny_config())
    for name, model in (('vae', vae), ('flow', generator)):
        os.makedirs(tmp_path / name)
        save_checkpoint(str(tmp_path / name / 'ckpt.safetensors'), model, make_ema(model),
                        torch.optim.AdamW(model.parameters()), 1, {}, torch.Generator())
    with pytest.raises(UsageError, match='is a VAE checkpoint, not a generator'):
        load_generator(str(tmp_path / 'vae'))
    with pytest.raises(UsageError, match='is a generator checkpoint, not a VAE'):
        load_vae(str(tmp_path / 'flow'))


# -----------------------------------------------------------------------------
# the scripts, run as a user runs them: train_vae.py, train_flow.py, sample.py, distill.py


def _run(args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, args[0])] + args[1:], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# Runs one script once per argument list in a single process, as `python SCRIPT ARGS...` would
# run it (a fresh module namespace each time; SystemExit's message and an uncaught exception
# printed as the interpreter prints them), so that the imports are paid once per script, not
# once per run -> JSON [[exit code, stdout, stderr], ...]. For the runs that stop on bad input;
# a run that works gets a process of its own (_run).
RUN_EACH = """
import contextlib, io, json, os, runpy, sys
script, results = sys.argv[1], []
sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` puts the script's folder first
for args in json.load(sys.stdin):
    sys.argv, stdout, stderr, code = [script, *args], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name='__main__')
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())  # as the interpreter does: configure's hook, or a traceback
            code = 1
    results.append([code, stdout.getvalue(), stderr.getvalue()])
print(json.dumps(results))
"""


def _run_each(script, arg_lists, cwd):
    """-> a subprocess.CompletedProcess for each of arg_lists, all run in one process (RUN_EACH)."""
    result = subprocess.run([sys.executable, '-c', RUN_EACH, os.path.join(HERE, script)], input=json.dumps(arg_lists),
                            cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script}: the runner itself failed:\n{result.stderr[-2000:]}"
    return [subprocess.CompletedProcess([script, *args], code, stdout, stderr)
            for args, (code, stdout, stderr) in zip(arg_lists, json.loads(result.stdout.splitlines()[-1]), strict=True)]


@FULL
def test_train_vae_script_end_to_end_then_resume(tmp_path):
    tiny = ['--image_size=32', '--num_images=64', '--num_holdout=8', '--channels=(8, 16, 16)',
            '--batch_size=8', '--eval_interval=10', '--out_dir=run']
    result = _run(['train_vae.py', SHAPES_CONFIG, *tiny, '--max_steps=20', '--dtype=bfloat16'],
                  tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'held-out PSNR' in result.stdout and 'bfloat16 on cpu' in result.stdout
    assert 'vae: 100%' in result.stderr and 'nan' not in result.stderr  # no PSNR in the bar before it is measured
    out = tmp_path / 'run'
    assert {'ckpt.safetensors', 'config.json', 'log.csv', 'recon_000010.png', 'recon_000020.png'} <= set(
        os.listdir(out))
    tensors, meta = read_checkpoint(str(out / 'ckpt.safetensors'), prefixes=('ema.',))
    assert meta['step'] == 20 and meta['config']['image_size'] == 32
    assert not torch.equal(tensors['ema.latent_scale'], torch.ones(16))  # measured at the end
    vae = WaveletVAE(**meta['model_config'])
    vae.load_state_dict({k[4:]: v for k, v in tensors.items()})
    images, _ = make_shapes(4, 32, seed=9)
    assert reconstruct(vae, images).shape == images.shape

    result = _run(['train_vae.py', SHAPES_CONFIG, *tiny, '--max_steps=30', '--init_from=resume'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [int(line.split(',')[0]) for line in (out / 'log.csv').read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 29  # the log continues where it stopped

    result = _run(['train_vae.py', SHAPES_CONFIG, *tiny, '--max_steps=2', '--crop_size=16', '--out_dir=crops'],
                  tmp_path)  # trained on 16 px crops, evaluated on the whole 32 px images
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / 'crops' / 'recon_000002.png').size == (8 * 32, 2 * 32)
    for bad, message in [('--typo_key=1', "has no setting 'typo_key'"), ('--image_size=40', 'not a multiple of 16'),
                         ('--crop_size=24', 'not a multiple of 16'), ('--crop_size=128', 'larger than --image_size')]:
        result = _run(['train_vae.py', bad], tmp_path)
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr


@pytest.fixture(scope='session')
def tiny_runs(tmp_path_factory):
    """A tiny VAE and a tiny generator trained by the real scripts, shared by the tests below."""
    root = tmp_path_factory.mktemp('runs')
    result = _run(['train_vae.py', SHAPES_CONFIG, '--image_size=32', '--num_images=64', '--num_holdout=8',
                   '--channels=(8, 16, 16)', '--batch_size=8', '--max_steps=4', '--out_dir=vae'], root)
    assert result.returncode == 0, result.stderr[-2000:]
    result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--max_steps=3'], root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


TINY_FLOW = ['--vae_dir=vae', '--image_size=32', '--num_images=64', '--num_holdout=8', '--dim=32', '--heads=2',
             '--core_layers=1', '--batch_size=8', '--eval_interval=2', '--sample_steps=2', '--train_iters=(1, 2)',
             '--cache_dir=cache', '--out_dir=out-flow']


def test_train_flow_on_shapes_writes_everything_and_resumes(tiny_runs):
    out = tiny_runs / 'out-flow'
    written = {'ckpt.safetensors', 'config.json', 'log.csv', 'samples.txt', 'samples_000002.png', 'samples_000003.png'}
    assert written <= set(os.listdir(out))
    assert Image.open(out / 'samples_000003.png').size == (8 * 32, 32)
    _, meta = read_checkpoint(str(out / 'ckpt.safetensors'), prefixes=())
    assert meta['step'] == 3 and meta['model_config']['text_encoder'] == 'minilm'
    assert len(meta['config']['sample_prompts']) == 8
    result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--max_steps=5', '--init_from=resume'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'cache: 64 latents' in result.stdout and 'encoded' not in result.stdout  # the second run read the cache
    steps = [int(line.split(',')[0]) for line in (out / 'log.csv').read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 4
    result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--dim=48', '--init_from=resume'], tiny_runs)
    assert result.returncode != 0 and 'dim=32 there, 48 here' in result.stderr and 'Traceback' not in result.stderr


@FULL
def test_init_from_a_run_carries_its_weights_to_another_size_and_refuses_another_shape(tiny_runs):
    for folder, kind, same, other in [
            ('vae', 'VAE', lambda: WaveletVAE((8, 16, 16)), lambda: WaveletVAE((8, 16, 32))),
            ('out-flow', 'generator', lambda: Iris(IrisConfig(**read_checkpoint(
                str(tiny_runs / 'out-flow' / 'ckpt.safetensors'), prefixes=())[1]['model_config'])),
             lambda: Iris(IrisConfig(dim=48, heads=2, core_layers=1, patch_size=1)))]:
        expected, _ = checkpoint.read_ema_checkpoint(str(tiny_runs / folder), kind, '--init_from')
        model = same()
        checkpoint.start_from_run(str(tiny_runs / folder), model, kind)
        assert model.state_dict().keys() == expected.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
        with pytest.raises(UsageError, match=f"holds a {kind} of another shape .*(channels|dim)="):
            checkpoint.start_from_run(str(tiny_runs / folder), other(), kind)
    # the 32 px run continued at 64 px by the script: the timestep shift from the two runs' token counts
    # (not under out*/: the newest run there, which sample.py takes when told none, stays the 32 px one)
    result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--image_size=64', '--init_from=out-flow', '--shift=0',
                   '--max_steps=1', '--out_dir=continued-64'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'generator initialised from out-flow (its step ' in result.stdout
    _, meta = read_checkpoint(str(tiny_runs / 'continued-64' / 'ckpt.safetensors'), prefixes=())
    assert meta['config']['shift'] == 2.0 and meta['step'] == 1
    for bad, message in [(['--init_from=nowhere'], "is neither 'scratch', 'resume' nor a run folder"),
                         (['--init_from=out-flow', '--dim=48'], 'holds a generator of another shape (dim=32 there, '
                                                                '48 here')]:
        result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--out_dir=out-bad', *bad], tiny_runs)
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, \
            result.stderr[-1500:]


def test_shift_moves_training_and_sampling_times_towards_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    torch.testing.assert_close(shifted[5], torch.tensor(0.75))  # 3 * 0.5 / (1 + 2 * 0.5)
    torch.testing.assert_close(time_grid(4, 3.0), shift_time(torch.linspace(1, 0, 5), 3.0))


def _train_tiny_pokemon(data, max_steps, tiny_runs, tmp_path):
    """train_flow.py on config/pokemon.py with data ('--data_dir=...' or '--dataset=...'), every size tiny."""
    return _run(['train_flow.py', os.path.join(HERE, 'config', 'pokemon.py'), data, '--num_holdout=1',
                 '--image_size=32', '--patch_size=1', '--dim=32', '--heads=2', '--core_layers=1', '--batch_size=2',
                 f'--max_steps={max_steps}', '--train_iters=(2,)', '--sample_steps=1', f'--vae_dir={tiny_runs / "vae"}',
                 f'--cache_dir={tmp_path / "cache"}', f'--out_dir={tmp_path / "flow"}'], tmp_path)


@FULL
def test_train_flow_on_the_pokemon_config_with_a_local_folder(tiny_runs, tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    _write_folder(folder)
    result = _train_tiny_pokemon(f'--data_dir={folder}', 1, tiny_runs, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / 'flow' / 'ckpt.safetensors').exists()


@FULL
def test_train_flow_on_a_hub_data_set_in_a_local_parquet_folder(tiny_runs, tmp_path, monkeypatch):
    # reach-vb/pokemon-blip-captions as the Hub serves it (data/train-*.parquet: an image column
    # and a 'text' column), read by data.load_hub through datasets.load_dataset: every line
    # after the download runs, with a corrupt image among the rows
    import datasets
    images, captions = make_shapes(6, 40, seed=0)
    rows = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    table = datasets.Dataset.from_dict({'image': rows, 'text': captions}).cast_column('image', datasets.Image())
    table = table.cast_column('image', datasets.Image(decode=False))
    table = datasets.concatenate_datasets([table, datasets.Dataset.from_dict(
        {'image': [{'bytes': b'not an image', 'path': None}], 'text': ['broken']}, features=table.features)])
    (tmp_path / 'pokemon' / 'data').mkdir(parents=True)
    table.to_parquet(str(tmp_path / 'pokemon' / 'data' / 'train-00000-of-00001.parquet'))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))  # the subprocess's datasets cache, not the user's
    result = _train_tiny_pokemon(f'--dataset={tmp_path / "pokemon"}', 2, tiny_runs, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'skipped 1 unreadable image' in result.stderr and 'encoded 5 images' in result.stdout
    assert (tmp_path / 'flow' / 'samples_000002.png').exists()


@pytest.fixture(scope='session')
def vae_64(tmp_path_factory):
    """A tiny VAE at 64 px, the size from which the shapes and scenes analysers read real images
    reliably (the evals check), shared by the eval tests."""
    root = tmp_path_factory.mktemp('vae64')
    result = _run(['train_vae.py', SHAPES_CONFIG, '--num_images=64', '--num_holdout=8', '--channels=(8, 16, 16)',
                   '--batch_size=8', '--max_steps=2', '--out_dir=vae'], root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / 'vae'


@FULL
def test_eval_shapes_measures_each_r_and_adaptive_iterations(vae_64, tmp_path):
    result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--image_size=64', '--max_steps=2',
                   f'--vae_dir={vae_64}',
                   '--iteration_embedding=none', '--train_iters=(4,)', '--train_iters_mean=2.0'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    result = _run(['eval_shapes.py', '--out_dir=out-flow', '--num_prompts=8', '--iters_list=(1, 2)',
                   '--steps_list=(2,)', '--loss_iters=(1, 2)', '--exit_tolerance=1e30', '--inpaint=False',
                   '--batch_size=8'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / 'out-flow' / 'eval_shapes.json').read_text())
    losses = {row['name']: row for row in rows if row['table'] == 'held-out flow loss'}
    assert set(losses) == {'r = 1', 'r = 2', 'auto (tolerance 1e+30, at most 2)'}, result.stdout
    # a tolerance nothing can miss stops every sample after one iteration: r = 1 exactly
    auto = 'auto (tolerance 1e+30, at most 2)'
    assert losses[auto] == losses['r = 1'] | {'name': auto}
    adherence = {row['name']: row for row in rows if row['table'] == 'adherence'}
    assert adherence['real held-out images']['all 5'] >= 0.98 and 0 <= adherence['their VAE reconstructions']['all 4']
    assert [name for name in adherence if 'steps' in name] == ['2 euler steps, r = 1, cfg 4.0, shift 1.0',
                                                              '2 euler steps, r = 2, cfg 4.0, shift 1.0']
    assert Image.open(tmp_path / 'out-flow' / 'eval_iters.png').size == (8 * 64, 2 * 64)


@FULL
def test_eval_scenes_scores_seen_and_held_out_captions_at_each_r_adaptively_and_over_guidance(tiny_runs, vae_64,
                                                                                               tmp_path):
    result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--dataset=scenes', '--image_size=64', '--max_steps=2',
                   f'--vae_dir={vae_64}', '--iteration_embedding=none', '--train_iters=(4,)', '--train_iters_mean=2.0'],
                  tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    result = _run(['eval_scenes.py', '--out_dir=out-flow', '--num_prompts=12', '--iters_list=(1, 2)', '--steps=2',
                   '--exit_tolerance=1e30', '--cfg_list=(1.5, 9.0)', '--steps_list=(1,)', '--batch_size=8'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / 'out-flow' / 'eval_scenes.json').read_text())
    for split in ('held-out', 'seen'):
        named = {row['images']: row for row in rows if row['split'] == split}
        assert all(named['real scenes'][task] == 1.0 for task in TASKS), named['real scenes']
        sampled = [name for name in named if name.startswith(('r = ', 'auto'))]
        assert sampled == ['r = 1, 2 steps, cfg 4', 'r = 2, 2 steps, cfg 4', 'auto (tolerance 1e+30, at most 2), '
                           '2 steps, cfg 4', 'r = 2, 2 steps, cfg 1.5', 'r = 2, 2 steps, cfg 9',
                           'r = 2, 1 steps, cfg 4'], sampled  # the sweeps at the run's sample_iters
        # a tolerance nothing can miss stops every sample after one iteration: r = 1's images exactly
        auto, once = named[sampled[2]], named[sampled[0]]
        assert auto['mean r'] == 1.0 and all(auto[k] == once[k] for k in (*TASKS, 'overall'))
        for name in ('real scenes', *sampled):  # what went wrong adds up, and 'right' is the task's score
            for task, shares in named[name]['structure'].items():
                assert abs(sum(shares.values()) - 1) < 1e-9 and shares['right'] == named[name][task], (name, shares)
        assert named['real scenes']['structure']['position']['right'] == 1.0
        assert Image.open(tmp_path / 'out-flow' / f'eval_iters_{split}.png').size == (8 * 64, 2 * 64)
    losses = next(row for row in rows if row['images'].startswith('held-out flow loss'))
    assert all(math.isfinite(losses[f'r = {r}']) for r in (1, 2))
    # the seen captions follow the training rule, the held-out ones are combinations it never trained on
    assert not any(held_out(scene_attributes(2, i)) for i in range(12))
    assert all(scene['task'] == 'single object' or held_out(scene) for scene in
               (scene_attributes(1, i, test=True) for i in range(12)))
    result = _run(['eval_scenes.py', f'--out_dir={tiny_runs / "out-flow"}'], tmp_path)  # a shapes run
    assert result.returncode != 0 and 'was not trained on the scenes data' in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr


@FULL
def test_eval_real_measures_a_run_on_an_imagefolder(tiny_runs, tmp_path):
    # prepare.py's layout: train/ and test/ with a group and a style per image; style b only in the test split
    for split, seed, styles in (('train', 0, 'aa'), ('test', 1, 'ab')):
        (tmp_path / split).mkdir()
        images, captions = make_shapes(16, 32, seed=seed)
        for i in range(16):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(tmp_path / split / f"{i}.png")
        (tmp_path / split / 'metadata.jsonl').write_text(''.join(
            json.dumps({'file_name': f"{i}.png", 'text': captions[i], 'group': f"g{i % 2}", 'style': styles[i // 8]})
            + '\n' for i in range(16)))
    result = _run(['train_flow.py', SHAPES_CONFIG, f'--data_dir={tmp_path / "train"}', '--num_holdout=2',
                   '--image_size=32', '--dim=32', '--heads=2', '--core_layers=1', '--batch_size=4', '--max_steps=1',
                   '--train_iters=(2,)', '--sample_steps=1', f'--vae_dir={tiny_runs / "vae"}', '--out_dir=flow'],
                  tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    result = _run(['eval_real.py', '--out_dir=flow', '--steps_list=(2,)', '--loss_iters=(2,)', '--classifier_steps=2',
                   '--batch_size=8'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / 'flow' / 'eval_real.json').read_text())
    table = lambda name: [row for row in rows if row['table'] == name]  # noqa: E731
    (overall,), by_style = table('vae')[:1], table('vae')[1:]  # per style, 8 images each
    assert [(row['name'], row['images'], row['left_out']) for row in by_style] == [('a', 8, False), ('b', 8, True)]
    assert abs(sum(row['psnr'] for row in by_style) / 2 - overall['psnr']) <= 0.01  # per-image PSNRs, averaged
    assert [row['r'] for row in table('held-out flow loss')] == [2] and len(table('held-out flow loss')[0]['bands']) == 4
    assert [row.get('steps') for row in table('classifier')] == [None, 2]
    assert [len(row['generated']) for row in table('classifier by style')] == [1, 1]
    upscale = {row['name']: row for row in table('upscale')}
    upscaled = [name for name in upscale if name.startswith(('VAE round trip of the real image', 'IRIS, strength'))]
    assert len(upscaled) == 3 and all(upscale[name]['input_error'] <= 0.5 for name in upscaled)  # the input kept
    assert upscale['bicubic']['input_error'] > 0.5  # bicubic does not keep it: the check above can fail
    assert f"{overall['psnr']:.2f} dB" in result.stdout and '| b (left out of training) | 8 |' in result.stdout
    assert Image.open(tmp_path / 'flow' / 'eval_upscale.png').size == (6 * 32, 4 * 32)
    assert Image.open(tmp_path / 'flow' / 'eval_real.png').size == (2 * 32, 3 * 32)  # a column per group
    test_rows = {row['text']: row for row in map(json.loads, (tmp_path / 'test' / 'metadata.jsonl').open())}
    shown = (tmp_path / 'flow' / 'eval_real.txt').read_text().splitlines()
    assert [(test_rows[c]['group'], test_rows[c]['style']) for c in shown] == [('g0', 'a'), ('g1', 'b')]  # in turn
    result = _run(['train_control.py', f'--data_dir={tmp_path / "train"}', '--num_holdout=2', '--image_size=32',
                   '--base_dir=flow', '--batch_size=4', '--max_steps=1', '--sample_steps=1', '--out_dir=edges'],
                  tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    result = _run(['eval_real.py', '--out_dir=edges', '--sections=control', '--steps_list=(2,)'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    control = {row['name']: row['f1'] for row in json.loads((tmp_path / 'edges' / 'eval_real.json').read_text())}
    assert list(control) == ['control strength 0 (the base generator)', 'control strength 1',
                             'the real images after a VAE round trip (the ceiling)'], control
    assert all(0 <= f1 <= 1 for f1 in control.values()) and 'control strength 1 |' in result.stdout
    assert Image.open(tmp_path / 'edges' / 'eval_control.png').size == (6 * 32, 3 * 32)


def test_a_checkpoint_holding_a_tensor_of_another_shape_is_one_line(tiny_runs, tmp_path):
    tampered = tmp_path / 'out-tampered'
    shutil.copytree(tiny_runs / 'out-flow', tampered)
    path = tampered / 'ckpt.safetensors'
    with safe_open(str(path), framework='pt') as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors | {'ema.patch_embed.bias': torch.zeros(7)}, str(path), metadata=metadata)
    result = _run(['sample.py', f'--out_dir={tampered}', '--prompt=a red circle', '--steps=1', '--output=x.png'],
                  tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1].startswith(
        f"error: {path} does not fit the model its settings build (size mismatch for patch_embed.bias"), result.stderr


def test_sample_script_end_to_end(tiny_runs):
    result = _run(['sample.py', '--prompt=a red circle|a blue square', '--num_samples=2', '--steps=2', '--iters=3',
                   '--output=two.png'], tiny_runs)  # no --out_dir: the newest generator run
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tiny_runs / 'two.png').size == (2 * 32, 2 * 32)


@FULL
def test_sample_script_stops_bad_input_with_one_line(tiny_runs):
    cases = [('--prompt=a red circle|  ', 'prompt 2 of 2 is empty'),
             ('--text_encoder=openai/clip-vit-large-patch14', "trained with text encoder 'minilm'"),
             ('--size=40', 'not a multiple of 16'), ('--out_dir=nowhere', 'no generator checkpoint'),
             ('--size=16384', 'over the 64 Mpixel limit'),
             ('--output=missing_dir/x.png', 'folder missing_dir does not exist'),
             ('--output=x.txt', "'.txt' is not an image type")]
    for result, (_, message) in zip(_run_each('sample.py', [[bad] for bad, _ in cases], tiny_runs), cases):
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, result.stderr
    # far beyond the r <= 2 it trained with: it runs, says what that costs and shows its progress
    result = _run(['sample.py', '--prompt=a red circle', '--steps=1', '--iters=300', '--output=far.png'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '--iters=300 is 150x the most this run trained with (r=2): 300 Core iterations per image' in result.stderr
    assert 'sampling: 100%' in result.stderr and '300/300' in result.stderr


@pytest.mark.slow  # inductor compiles each r once: about 80 s per dtype on 2 cores
@pytest.mark.parametrize('dtype', DTYPES)
def test_train_flow_compiles_with_inductor_in_every_dtype(tiny_runs, dtype):
    result = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--max_steps=4', '--compile=True',
                   f'--dtype={dtype}', f'--out_dir=out-compiled-{dtype}'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tiny_runs / f'out-compiled-{dtype}' / 'log.csv').read_text()
    losses = [float(line.split(',')[1]) for line in log.splitlines()[1:]]
    assert len(losses) == 3 and np.isfinite(losses).all()  # rows for step 0, the checkpoint at 2 and the last step
    assert (tiny_runs / f'out-compiled-{dtype}' / 'samples_000004.png').exists()


@pytest.mark.slow  # two minutes: every script of the GPU check, small, on the CPU
def test_gpu_check_runs_every_script_on_the_cpu(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    images, captions = make_shapes(12, 64, seed=0)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f'{i}.png')
    (folder / 'metadata.jsonl').write_text(''.join(json.dumps({'file_name': f'{i}.png', 'text': c}) + '\n'
                                                   for i, c in enumerate(captions)))
    result = subprocess.run([sys.executable, os.path.join(HERE, 'check_gpu.py'), f'--data_dir={folder}', '--device=cpu',
                             "--dtypes=('float32',)", '--vae_max_steps=2', '--flow_max_steps=2',
                             '--distill_max_steps=1', '--timed_batch_size=2',
                             '--overrides=--image_size=64 --batch_size=4 --num_holdout=2'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count('  ok ') == 6 and 'GPU check passed' in result.stdout


def test_distill_script_then_one_step_sampling(tiny_runs):
    result = _run(['distill.py', SHAPES_CONFIG, '--teacher_dir=out-flow', '--cache_dir=cache',
                   '--out_dir=out-cd', '--batch_size=8', '--max_steps=3', '--eval_interval=2', '--iters=2',
                   '--dtype=float16'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tiny_runs / 'out-cd'
    assert {'ckpt.safetensors', 'log.csv', 'samples_000002.png', 'samples_000003.png'} <= set(os.listdir(out))
    assert Image.open(out / 'samples_000003.png').size == (8 * 32, 3 * 32)  # rows: 1, 2 and 4 steps
    result = _run(['sample.py', '--out_dir=out-cd', '--steps=1', '--prompt=a red circle', '--output=one.png',
                   '--dtype=bfloat16'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '1 consistency steps' in result.stdout and Image.open(tiny_runs / 'one.png').size == (32, 32)
    result = _run(['distill.py', '--teacher_dir=out-cd', '--out_dir=out-cd2'], tiny_runs)
    assert result.returncode != 0 and 'already a distilled student' in result.stderr


@FULL
def test_sample_script_edits_images_and_rejects_bad_edit_inputs(tiny_runs):
    images, _ = make_shapes(1, 32, seed=3)
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tiny_runs / 'before.png')
    hole = np.zeros((32, 32), dtype=np.uint8)
    hole[:16, :16] = 255
    Image.fromarray(hole).save(tiny_runs / 'hole.png')
    Image.fromarray(hole).resize((48, 40), Image.NEAREST).save(tiny_runs / 'hole_other_size.png')
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(tiny_runs / 'grey.png')
    (tiny_runs / 'broken.png').write_bytes(b'not an image')
    base = ['sample.py', '--out_dir=out-flow', '--prompt=a red circle', '--steps=2', '--iters=2',
            '--init_image=before.png']
    result = _run(base + ['--mask=hole.png', '--output=inpainted.png'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'at strength 1.0 inside hole.png' in result.stdout
    assert Image.open(tiny_runs / 'inpainted.png').size == (64, 32)
    result = _run(base + ['--strength=0', '--output=kept.png'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    vae = load_vae(str(tiny_runs / 'vae'))
    expected = to_uint8(vae.decode_latent(vae.encode_latent(to_float(images))))
    kept = torch.from_numpy(np.array(Image.open(tiny_runs / 'kept.png')))
    assert torch.equal(kept[:, 32:].permute(2, 0, 1), expected[0])
    result = _run(base + ['--mask=hole_other_size.png', '--output=x.png'], tiny_runs)
    assert result.returncode == 0 and 'resized to the image' in result.stderr
    cases = [(base[1:] + ['--init_image=missing.png'], 'cannot read --init_image'),
             (base[1:] + ['--init_image=broken.png'], 'cannot read --init_image'),
             (base[1:] + ['--strength=1.5'], 'between 0 (keep the image) and 1'),
             (base[1:] + ['--mask=grey.png'], 'grey pixels'),
             (base[1:] + ['--mask=broken.png'], 'cannot read --mask'),
             (['--out_dir=out-flow', '--mask=hole.png'], 'needs the --init_image')]
    for result, (_, message) in zip(_run_each('sample.py', [bad for bad, _ in cases], tiny_runs), cases):
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, result.stderr


@FULL
def test_control_adapter_trains_on_a_frozen_run_and_samples_from_a_picture(tiny_runs):
    args = ['train_control.py', os.path.join(HERE, 'config', 'shapes_edges.py'), '--base_dir=out-flow',
            '--num_images=64', '--batch_size=8', '--max_steps=3', '--eval_interval=2', '--sample_steps=2',
            '--cache_dir=cache', '--out_dir=out-edges']  # the image size, held-out set and r: the base run's
    result = _run(args, tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'training only the edges adapter' in result.stdout and 'cache: edges maps of 64 images' in result.stdout
    assert Image.open(tiny_runs / 'out-edges' / 'samples_000003.png').size == (8 * 32, 2 * 32)  # maps above images
    base, _ = read_checkpoint(str(tiny_runs / 'out-flow' / 'ckpt.safetensors'), prefixes=('ema.',))
    controlled, meta = read_checkpoint(str(tiny_runs / 'out-edges' / 'ckpt.safetensors'), prefixes=('ema.', 'model.'))
    assert meta['model_config']['control'] == 'edges'
    base_run = json.loads((tiny_runs / 'out-flow' / 'config.json').read_text())['config']
    settings = ('dataset', 'data_dir', 'image_size', 'num_holdout', 'train_iters', 'train_iters_mean', 'loss_weighting',
                'sample_iters')
    assert {k: meta['config'][k] for k in settings} == {k: base_run[k] for k in settings}
    assert all(torch.equal(controlled[k], v) for k, v in base.items())  # the base stayed frozen
    assert controlled['model.control_adapter.out.weight'].abs().sum() > 0  # the adapter learned
    images, _ = make_shapes(2, 32, seed=3)
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tiny_runs / 'shape.png')
    Image.fromarray(images[1, :, ::2, ::2].permute(1, 2, 0).numpy()).save(tiny_runs / 'small.png')
    Image.fromarray(images[1, :, :12, :12].permute(1, 2, 0).numpy()).save(tiny_runs / 'twelve.png')
    result = _run(['sample.py', '--out_dir=out-edges', '--control_image=shape.png', '--prompt=a red square',
                   '--steps=2', '--iters=2', '--output=controlled.png'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    grid = torch.from_numpy(np.array(Image.open(tiny_runs / 'controlled.png'))).permute(2, 0, 1)
    assert grid.shape == (3, 32, 64)
    assert torch.equal(grid[:1, :, :32] // 255, control_map(images[:1], 'edges')[0].byte())
    result = _run(['sample.py', '--out_dir=out-flow', '--upscale=small.png', '--prompt=a circle', '--steps=2',
                   '--iters=2', '--output=big.png'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    big = torch.from_numpy(np.array(Image.open(tiny_runs / 'big.png'))).permute(2, 0, 1)[:, :, 32:].float()
    small = torch.from_numpy(np.array(Image.open(tiny_runs / 'small.png'))).permute(2, 0, 1).float()
    assert big.shape == (3, 32, 32) and (F.avg_pool2d(big, 2) - small).abs().max() <= 0.5 + 1e-3
    cases = [(['--out_dir=out-flow', '--control_image=shape.png'], 'has no control adapter'),
             (['--out_dir=out-edges', '--control_image=missing.png'], 'cannot read --control_image'),
             (['--out_dir=out-flow', '--upscale=small.png'], '--upscale needs a --prompt'),
             (['--out_dir=out-flow', '--upscale=twelve.png', '--prompt=a'], 'twice the --upscale image side')]
    runs = _run_each('sample.py', [['--steps=1', *bad] for bad, _ in cases], tiny_runs)
    for result, (_, message) in zip(runs, cases):
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, result.stderr
    result = _run(['distill.py', '--teacher_dir=out-edges', '--out_dir=out-none'], tiny_runs)
    assert result.returncode != 0 and 'point --teacher_dir at its base run (out-flow)' in result.stderr
    cases = [([args[1], '--base_dir=', '--out_dir=out-none'], 'needs --base_dir'),
             (args[1:] + ['--data_dir=photos', '--out_dir=out-none'], 'caption_conflict needs'),  # shapes only
             (args[1:] + ['--caption_conflict=1.5', '--out_dir=out-none'], "'caption_conflict' must be from 0 to 1")]
    for result, (_, message) in zip(_run_each(args[0], [bad for bad, _ in cases], tiny_runs), cases):
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, result.stderr


@pytest.mark.parametrize('dtype', ['float32', pytest.param('float16', marks=FULL)])  # fp16: the GradScaler's state
def test_resume_from_a_checkpoint_is_bit_exact(tiny_runs, dtype):
    # straight to step 4 (checkpoints at 2 and 4), against: the step-2 checkpoint resumed to 4
    args = ['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--max_steps=4', '--eval_interval=2',
            f'--dtype={dtype}']
    result = _run(args + [f'--out_dir=out-straight-{dtype}'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    straight = tiny_runs / f'out-straight-{dtype}'
    kept = sorted(f for f in os.listdir(straight) if f.startswith('ckpt_'))
    assert kept == ['ckpt_000002.safetensors', 'ckpt_000004.safetensors']
    resumed = tiny_runs / f'out-resumed-{dtype}'
    resumed.mkdir()
    shutil.copy(straight / 'ckpt_000002.safetensors', resumed / 'ckpt.safetensors')
    result = _run(args + [f'--out_dir=out-resumed-{dtype}', '--init_from=resume'], tiny_runs)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, _ = read_checkpoint(str(straight / 'ckpt.safetensors'))
    got, meta = read_checkpoint(str(resumed / 'ckpt.safetensors'))
    assert meta['step'] == 4 and expected.keys() == got.keys() and meta['scaler'] == read_checkpoint(
        str(straight / 'ckpt.safetensors'), prefixes=())[1]['scaler']
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, differ


@FULL
def test_torchrun_two_processes_train_like_one(tiny_runs):
    # the same global batch of 8: one process, against 2 gloo processes x 2 accumulation steps of 2
    args = [os.path.join(HERE, 'train_flow.py'), SHAPES_CONFIG, *TINY_FLOW,
            '--max_steps=3', '--log_interval=1']
    one = subprocess.run([sys.executable, *args, '--out_dir=out-one'], cwd=tiny_runs, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args,
                          '--out_dir=out-two', '--gradient_accumulation_steps=2'],
                         cwd=tiny_runs, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = [[float(line.split(',')[1]) for line in (tiny_runs / run / 'log.csv').read_text().splitlines()[1:]]
              for run in ('out-one', 'out-two')]
    assert len(losses[0]) == 3 and np.allclose(losses[0], losses[1], rtol=0, atol=1e-5), losses
    weights = [read_checkpoint(str(tiny_runs / run / 'ckpt.safetensors'), prefixes=('model.',))[0]
               for run in ('out-one', 'out-two')]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-5)
    bad = _run(['train_flow.py', SHAPES_CONFIG, *TINY_FLOW, '--gradient_accumulation_steps=3'], tiny_runs)
    assert bad.returncode != 0 and 'does not split into 1 processes x 3' in bad.stderr
    vae_two = ['--image_size=32', '--num_images=64', '--num_holdout=8', '--channels=(8, 16, 16)', '--batch_size=8',
               '--max_steps=2']
    distill_two = ['--teacher_dir=out-flow', '--cache_dir=cache', '--batch_size=8', '--max_steps=2', '--iters=2',
                   '--gradient_accumulation_steps=2']
    for script, out, extra in [('train_vae.py', 'out-vae-two', vae_two), ('distill.py', 'out-cd-two', distill_two)]:
        result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                 os.path.join(HERE, script), SHAPES_CONFIG, *extra, f'--out_dir={out}'],
                                cwd=tiny_runs, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (script, result.stderr[-3000:])
        assert (tiny_runs / out / 'ckpt.safetensors').exists()
        assert len((tiny_runs / out / 'log.csv').read_text().splitlines()) == 3  # header, steps 0 and 1


@FULL
def test_divergence_and_impossible_settings_stop_with_one_line(tiny_runs):
    flow = [SHAPES_CONFIG, *TINY_FLOW, '--max_steps=20']
    cases = [(['--lr=1e30', '--warmup_steps=1', '--grad_clip=1e30'], 'loss is inf at step 1; lower --lr'),
             (['--batch_size=4096'], 'larger than the 64 training images'),
             (['--image_size=48', '--patch_size=2'], 'not a multiple of 32'),
             (['--loss_weighting=seed'], "setting 'loss_weighting' must be one of 'none', 'high_noise'"),
             (['--dtype=float8'], "setting 'dtype' must be one of 'auto', 'float32', 'bfloat16'"),
             (['--cooldown=1.5'], "setting 'cooldown' must be from 0 to 1, got 1.5"),
             (['--control=edges'], "train_flow.py has no setting 'control'")]
    # an out_dir each: a run's lock names its process, which lives on here after the run stops
    runs = _run_each('train_flow.py', [[*flow, *bad, f'--out_dir=out-bad-{i}'] for i, (bad, _) in enumerate(cases)],
                     tiny_runs)
    for result, (_, message) in zip(runs, cases):
        assert result.returncode != 0 and message in result.stderr, result.stderr[-1500:]
        assert 'Traceback' not in result.stderr


# -----------------------------------------------------------------------------
# configurator.py and config/


def _script_globals():
    return {'__file__': '/somewhere/train_vae.py', 'batch_size': 32, 'lr': 1e-3, 'out_dir': 'out',
            'compile': False, 'channels': (32, 64), 'torch': torch, 'DTYPES': ('auto', 'float32')}


def test_config_file_and_command_line_override_in_order(tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text("import math\nbatch_size = 8\nif script == 'train_vae':\n    lr = 3e-4\n"
                           "if script == 'train_flow':\n    nonsense_for_another_script = 1\n")
    g = _script_globals()
    settings = configure(g, [str(config_file), '--batch_size=16', '--out_dir=out-test', '--lr', '1',
                             '--channels=[8, 16]'])
    assert (g['batch_size'], g['lr'], g['out_dir'], g['channels']) == (16, 1.0, 'out-test', (8, 16))
    assert settings['batch_size'] == 16 and 'torch' not in settings and 'DTYPES' not in settings  # an import


@pytest.mark.parametrize('args,message', [
    (['--batch_sise=16'], "has no setting 'batch_sise'"),
    (['--DTYPES=()'], "has no setting 'DTYPES'"),
    (['--batch_size=1.5'], "'batch_size' .* must be int"),
    (['--compile=yes'], "'compile' .* must be bool"),
    (['--lr'], 'has no value'),
    (['no/such/config.py'], 'cannot read config file'),
    (['--lr=nan'], "'lr' .* must be float"),
    (['--lr=1e400'], "'lr' .* must be a finite number"),
    (['--lr=-0.1'], "'lr' .* must be a finite number, not negative"),
    (['--batch_size=100000000000000000000'], "'batch_size' .* below 2\\^63"),
    (['--batch_size=-3'], "'batch_size' .* from 0"),
])
def test_config_errors_are_one_line_messages(args, message):
    with pytest.raises(SystemExit, match=message) as e:
        configure(_script_globals(), args)
    assert '\n' not in str(e.value)


def test_config_checks_declared_choices_and_ranges_once_every_override_is_in(tmp_path):
    g = {'__file__': '/somewhere/train_flow.py', 'mixer': 'grfm', 'share': 0.5}
    declared = dict(choices=dict(mixer=('grfm', 'attention')), ranges=dict(share=(0, 1)))
    config_file = tmp_path / 'c.py'
    config_file.write_text("mixer = 'transformer'\n")
    configure(g, [str(config_file), '--mixer=attention', '--share=1'], **declared)  # the last value counts
    assert (g['mixer'], g['share']) == ('attention', 1.0)
    for args, message in [(['--mixer=' + 'x' * 10000], "'mixer' must be one of 'grfm', 'attention', got 'xxx"),
                          (['--share=1.5'], "'share' must be from 0 to 1, got 1.5")]:
        with pytest.raises(SystemExit, match=message) as e:
            configure({'__file__': '/somewhere/train_flow.py', 'mixer': 'grfm', 'share': 0.5}, args, **declared)
        assert len(str(e.value)) < 200


def test_a_config_files_settings_for_another_script_build_the_model_that_script_trains(tiny_runs):
    assert config_files(['config/a.py', '--lr', '1', '--seed=2', 'b.py']) == ['config/a.py', 'b.py']
    defaults = script_settings('train_flow', [])
    assert (defaults['model_size'], defaults['patch_size'], defaults['muon']) == ('tiny', 2, False)
    assert 'device' not in defaults and 'master' not in defaults  # not a literal; assigned after configure()
    quickstart = script_settings('train_flow', [SHAPES_CONFIG])
    assert (quickstart['muon'], quickstart['max_steps'], quickstart['train_iters']) == (True, 1600, (8,))
    model = build_generator(quickstart, 384)
    assert (model.config.dim, model.config.core_layers, model.config.mixer, model.config.state_init) == (
        96, 2, 'attention', 'noise')
    # a run trained with the tiny settings: the same settings build a model of its every tensor's shape
    trained = json.loads((tiny_runs / 'out-flow' / 'config.json').read_text())['config']
    state, _ = read_checkpoint(str(tiny_runs / 'out-flow' / 'ckpt.safetensors'), prefixes=('ema.',))
    rebuilt = build_generator(trained, 384).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k[4:]: v.shape for k, v in state.items()}


@FULL
def test_bench_measures_the_models_of_the_config_file_it_is_given(tmp_path):
    result = _run(['bench.py', SHAPES_CONFIG, '--sections=train', '--repeats=1'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    vae, flow = (' '.join(line.split()) for line in result.stdout.splitlines()
                 if line.strip().startswith(('train_vae', 'train_flow')))
    # config/shapes.py's batches, r, optimizer and steps, none of them train_vae.py's or train_flow.py's defaults
    assert vae.startswith('train_vae 32 x 64 px Muon + AdamW ') and ' ms 1000 ' in vae, result.stdout
    assert flow.startswith('train_flow 64 x 16 tokens, r = 2 Muon + AdamW ') and ' ms 1600 ' in flow, result.stdout


def test_config_values_are_literals_only_when_they_look_like_one():
    g = {'__file__': '/somewhere/sample.py', 'prompt': '', 'strength': -1.0, 'size': 0}
    long_prompt = 'a red apple on a plate, ' * 2000  # 48k characters: once a MemoryError in the parser
    configure(g, [f'--prompt={long_prompt}', '--strength=-1', '--size=64'])
    assert (g['prompt'], g['strength'], g['size']) == (long_prompt, -1.0, 64)  # -1: the default is a sentinel
    for text in ('(two apples', '-1 apples', '[' * 10000):
        configure(g, [f'--prompt={text}'])
        assert g['prompt'] == text


def test_config_file_with_an_unknown_key_is_an_error(tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text('learning_rate = 1e-3\n')
    with pytest.raises(SystemExit, match=f"no setting 'learning_rate' .*{config_file}"):
        configure(_script_globals(), [str(config_file)])


def _script_settings(script):
    """The names a script assigns at module level: its settings block and what follows."""
    with open(os.path.join(HERE, f'{script}.py')) as f:
        tree = ast.parse(f.read())
    return {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
            if isinstance(target, ast.Name)}


@pytest.mark.parametrize('config', ['shapes.py', 'scenes.py', 'pokemon.py', 'pokemon_long.py', 'emoji.py',
                                    'emoji_64.py', 'shapes_edges.py', 'emoji_edges.py'])
def test_every_config_file_sets_only_settings_each_stage_has(config):
    path, control = os.path.join(HERE, 'config', config), config.endswith('_edges.py')
    stage = config == 'emoji_64.py'  # one stage of config/emoji.py's generator: it distils nothing
    if control:  # an adapter's config points an old train_flow.py command at its own script
        with pytest.raises(SystemExit, match=f'python train_control.py config/{config}'):
            read_config_file(path, 'train_flow')
    for script in ('train_vae', *(() if control else ('train_flow',)), 'train_control', 'distill', 'sample',
                   'export_mobile', 'eval_shapes', 'eval_scenes', 'eval_real'):
        unknown = set(read_config_file(os.path.join(HERE, 'config', config), script)) - _script_settings(script)
        assert not unknown, (config, script, unknown)
    # every text-to-image setup distils too; a control adapter is an add-on to one, and distil.py leaves it alone
    assert bool(read_config_file(path, 'distill')) == (not control and not stage)
    assert bool(read_config_file(path, 'train_control')) == control


# -----------------------------------------------------------------------------
# metrics.py: the analyser on real images, the image metrics against closed forms


def test_shapes_analyser_reads_real_images():
    for size in (32, 64, 128):
        images, _ = make_shapes(200, size, seed=5)
        scores = adherence(images, [shape_attributes(5, i) for i in range(200)])
        assert scores['all 5'] >= 0.98, (size, scores)
    blank = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    assert analyse(blank)['shape'] is None  # nothing drawn: nothing read, no crash


@FULL
def test_scene_analyser_reads_true_renders_in_every_task():
    for size in (64, 96):
        for test in (False, True):
            images, _ = make_scenes(240, size, seed=7, test=test)
            found = [read_scene(image) for image in images]
            scores = geneval(found, [scene_attributes(7, i, test=test) for i in range(240)])
            assert min(scores.values()) >= 0.99, (size, test, scores)
    assert read_scene(torch.full((3, 64, 64), 128, dtype=torch.uint8)) == []


def test_geneval_rules_on_hand_made_detections():
    red_circle, blue_square = dict(shape='circle', colour='red', x=0.2, y=0.5), dict(
        shape='square', colour='blue', x=0.5, y=0.55)
    scene = lambda task, *objects, relation=None: dict(task=task, relation=relation, objects=[  # noqa: E731
        dict(shape=o[0], colour=o[1]) for o in objects])
    assert scene_correct([red_circle, blue_square], scene('two objects', ('circle', 'red'), ('square', 'red')))
    assert not scene_correct([red_circle], scene('two objects', ('circle', 'red'), ('square', 'red')))
    assert scene_correct([red_circle, blue_square], scene('counting', ('circle', 'red')))  # one circle: count 1
    assert not scene_correct([red_circle, red_circle, blue_square], scene('counting', *[('circle', 'red')] * 3))
    assert scene_correct([red_circle] * 3 + [blue_square], scene('counting', *[('circle', 'red')] * 3))
    assert scene_correct([red_circle, blue_square], scene('colours', ('square', 'blue')))
    assert not scene_correct([red_circle, blue_square], scene('colours', ('square', 'red')))
    swapped = scene('colour attribution', ('circle', 'blue'), ('square', 'red'))
    assert not scene_correct([red_circle, blue_square], swapped)  # both colours present, on the wrong objects
    assert scene_correct([red_circle, blue_square], scene('colour attribution', ('circle', 'red'), ('square', 'blue')))
    pair = (('circle', 'red'), ('square', 'blue'))
    assert scene_correct([red_circle, blue_square], scene('position', *pair, relation='left of'))
    assert not scene_correct([red_circle, blue_square], scene('position', *pair, relation='right of'))
    assert not scene_correct([red_circle, blue_square], scene('position', *pair, relation='above'))  # 0.05 < margin
    below = dict(blue_square, y=0.5 + metrics.POSITION_MARGIN + 0.01)
    assert scene_correct([red_circle, below], scene('position', *pair, relation='above'))
    assert structure([red_circle, blue_square], scene('position', *pair, relation='right of')) == 'reversed'
    assert structure([red_circle, blue_square], swapped) == 'reversed'
    assert structure([red_circle, below], scene('position', *pair, relation='left of')) == 'right'
    assert structure([red_circle, blue_square], scene('position', *pair, relation='above')) == 'neither'
    assert structure([red_circle], scene('colour attribution', *pair)) == 'types missing'
    scores = geneval([[red_circle], []], [scene('colours', ('square', 'blue')), scene('counting', *pair)])
    assert scores == {'counting': 0, 'colours': 0, 'overall': 0}
    scores = geneval([[blue_square], [red_circle] * 2], [scene('colours', ('square', 'blue')),
                                                         scene('counting', *pair)])
    assert scores == {'counting': 1, 'colours': 1, 'overall': 1}


def test_ssim_is_one_on_itself_and_the_closed_form_on_flat_images():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    assert abs(ssim(x, x) - 1) < 1e-12
    noisy = (x.float() + 40 * torch.randn(x.shape)).clamp(0, 255).to(torch.uint8)
    assert ssim(noisy, x) < 0.9
    a, b = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8), torch.full((1, 3, 16, 16), 140, dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2  # flat images: no variance, so SSIM is its luminance term alone
    assert abs(ssim(a, b) - (2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1)) < 1e-12


def test_frechet_distance_matches_the_two_by_two_closed_form():
    torch.manual_seed(0)
    a = torch.randn(500, 2) @ torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    b = torch.randn(400, 2) @ torch.tensor([[0.7, -0.3], [0.2, 1.0]]) + torch.tensor([1.0, -2.0])
    cov_a, cov_b = torch.cov(a.T.double()), torch.cov(b.T.double())
    product = cov_a @ cov_b  # its eigenvalues are positive: Tr sqrt = sqrt(tr + 2 sqrt(det)) for 2x2
    trace_root = torch.sqrt(product.trace() + 2 * torch.sqrt(torch.linalg.det(product)))
    expected = (a.double().mean(0) - b.double().mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    assert abs(frechet_distance(a, b) - expected.item()) < 1e-9
    assert abs(frechet_distance(a, a)) < 1e-9


@FULL
def test_group_classifier_learns_a_rare_group_and_balanced_accuracy_weighs_groups_equally():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, -1])  # -1: a group the classifier never learned, left out
    predicted = torch.tensor([0, 0, 0, 0, 1, 0, 0])
    balanced, plain = metrics.accuracy(predicted, labels)
    assert balanced == (1.0 + 0.5) / 2 and abs(plain - 5 / 7) < 1e-7
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=torch.uint8)
    groups = torch.tensor([0] * 400 + [1] * 2 + [2] * 2)  # 200:1:1, like People & Body against the rest
    images = torch.full((len(groups), 3, 32, 32), 255, dtype=torch.uint8)
    images[:, :, 8:24, 8:24] = colours[groups][:, :, None, None]  # a coloured square on white
    classifier = metrics.train_classifier(images, groups, 3, size=16, steps=100)
    assert metrics.accuracy(metrics.read(classifier, images)[0], groups)[0] == 1.0


# -----------------------------------------------------------------------------
# mobile.py (export_mobile.py, run_mobile.py): each export run by its runtime against PyTorch


def _exportable_generator(**overrides):
    return _wake_up(Iris(_tiny_config(fft_impl='dft', **overrides))).eval().requires_grad_(False)


def _check_generator_export(tmp_path, backend, formats, control='', text_layers=0):
    import mobile
    from mobile import MobileGenerator, load_part
    model = _exportable_generator(control=control, text_layers=text_layers)
    z, t, text, mask = _inputs()
    methods = mobile.generator_methods(model, z, t, text, mask)
    assert ('control' in methods) == bool(control)
    mobile.export_pte(methods, str(tmp_path / 'generator.pte'), backend)
    if 'onnx' in formats:
        mobile.export_onnx(methods, str(tmp_path), 'generator')
    noise_started = copy.deepcopy(model)  # the same weights, the Core started from Huginn's noise
    noise_started.config.state_init = 'noise'
    for fmt in formats:
        execute = load_part(str(tmp_path), 'generator', fmt, torch.float32, mobile.input_names(methods))
        exported = MobileGenerator(execute, batch=2, state_init='prelude')
        for iters in (1, 3):  # the core is exported once; r is chosen when it runs
            with torch.no_grad():
                reference = model(z, t, text, mask, iters)
            error = (exported(z, t, text, mask, iters) - reference).abs().max() / reference.abs().max()
            assert error < 1e-4, (fmt, iters, error)
        with torch.no_grad():  # the same seed draws the same s_0 in both
            torch.manual_seed(7)
            reference = noise_started(z, t, text, mask, 2)
            torch.manual_seed(7)
            drawn = MobileGenerator(execute, batch=2, state_init='noise')(z, t, text, mask, 2)
        assert (drawn - reference).abs().max() / reference.abs().max() < 1e-4, fmt
        assert not torch.allclose(drawn, exported(z, t, text, mask, 2), atol=1e-3), "s_0 = noise should matter"
        with torch.no_grad():  # adaptive iterations, as the app runs them
            reference, reference_used = model.velocity(z, t, model.encode_prompt(text, mask), 8, exit_tolerance=0.5)
        adaptive, used = exported.velocity(z, t, exported.encode_prompt(text, mask), 8, exit_tolerance=0.5)
        error = (adaptive - reference).abs().max() / reference.abs().max()
        assert error < 1e-4 and torch.equal(used, reference_used), (fmt, error)
        assert reference_used.max() < 8, "the tolerance should stop some sample early"
        if control:  # the adapter's methods: the hint of one map (as the app has), injected in both branches
            maps = control_map(make_shapes(1, 16 * z.shape[-1], seed=1)[0], control)
            with torch.no_grad():
                reference = model(z, t, text, mask, 2, control_map=maps.expand(len(z), -1, -1, -1))
            hint = exported.encode_control(maps).expand(len(z), -1, -1)
            error = (exported.velocity(z, t, exported.encode_prompt(text, mask), 2, hint)[0] - reference).abs().max()
            assert error / reference.abs().max() < 1e-4, (fmt, error)


@FULL
def test_generator_exports_to_executorch_and_onnx_and_matches_pytorch(tmp_path, caplog):
    pytest.importorskip('executorch', reason='pip install -r requirements-export.txt')
    with caplog.at_level(logging.WARNING):
        # with a control adapter and a text stage
        _check_generator_export(tmp_path, 'portable', ['pte', 'onnx'], control='edges', text_layers=1)
    assert not caplog.records, f"the export logs what a user cannot act on: {caplog.records[0].getMessage()}"


@pytest.mark.slow  # about a minute: XNNPACK's lowering passes are slow on a graph this fragmented
def test_generator_exports_with_the_xnnpack_delegate_and_matches_pytorch(tmp_path):
    pytest.importorskip('executorch', reason='pip install -r requirements-export.txt')
    _check_generator_export(tmp_path, 'xnnpack', ['pte'])


@FULL
def test_vae_decoder_export_matches_pytorch(tmp_path):
    pytest.importorskip('executorch', reason='pip install -r requirements-export.txt')
    import mobile
    from mobile import load_part
    torch.manual_seed(0)
    vae = WaveletVAE(channels=(8, 16, 16)).eval()
    z = torch.randn(1, 16, 2, 2)
    methods = {'forward': (mobile.Method(vae, lambda m, x: m.decode_latent(x)), dict(z=z))}
    mobile.export_pte(methods, str(tmp_path / 'vae_decoder.pte'), 'portable')
    with torch.no_grad():
        reference = vae.decode_latent(z)
    decoder = load_part(str(tmp_path), 'vae_decoder', 'pte', torch.float32, mobile.input_names(methods))
    image = decoder('forward', z=z)[0]
    assert image.shape == (1, 3, 32, 32)
    assert (image - reference).abs().max() < 1e-4 * reference.abs().max()


@FULL
def test_executorch_export_of_a_torch_fft_model_says_to_use_dft(tmp_path):
    import mobile
    model = _wake_up(Iris(_tiny_config(fft_impl='torch'))).eval()
    methods = mobile.generator_methods(model, *_inputs())
    with pytest.raises(UsageError, match="fft_impl='dft'"):
        mobile.export_pte(methods, str(tmp_path / 'generator.pte'), 'portable')


def test_missing_export_package_is_one_clear_line(monkeypatch):
    import mobile
    monkeypatch.setitem(sys.modules, 'executorch', None)  # makes `import executorch` fail
    with pytest.raises(UsageError, match='pip install -r requirements-export.txt'):
        mobile.require_export_packages()


@pytest.mark.parametrize('precision,tolerance', [('fp16', 1e-2), ('int8', 5e-2)])
def test_reduced_precision_copy_for_export_stays_close(precision, tolerance):
    import mobile
    model = _exportable_generator()
    z, t, text, mask = _inputs()
    methods = mobile.in_precision(mobile.generator_methods(model, z, t, text, mask), precision)
    converted = {id(method.module) for method, _ in methods.values()}
    assert len(converted) == 1 and id(model) not in converted  # one copy, shared by the three methods
    assert next(model.parameters()).dtype == torch.float32 and type(model.core[0].ffn.net[0].weight) is nn.Parameter
    copy_ = methods['core'][0].module
    if precision == 'fp16':
        assert not any(type(m) is nn.LayerNorm for m in copy_.modules())  # ExecuTorch's fp16 layer_norm is wrong
        assert all(x.dtype == torch.float16 for x in methods['core'][1].values() if x.is_floating_point())
    else:
        assert all(type(m.weight) is not nn.Parameter for m in copy_.modules() if isinstance(m, nn.Linear))
    dtype = torch.float16 if precision == 'fp16' else torch.float32
    with torch.no_grad():
        reference = model(z, t, text, mask, 2)
        output = copy_(z.to(dtype), t.to(dtype), text.to(dtype), mask, 2)
    assert output.dtype == dtype
    assert (output.float() - reference).abs().max() < tolerance * reference.abs().max()


@FULL
def test_int8_onnx_export_quantises_every_matmul_and_stays_close(tmp_path):
    pytest.importorskip('onnxruntime', reason='pip install -r requirements-export.txt')
    import mobile
    import onnx
    from mobile import MobileGenerator, load_part
    model = _exportable_generator()
    z, t, text, mask = _inputs()
    methods = mobile.generator_methods(model, z, t, text, mask)
    paths = mobile.export_onnx(methods, str(tmp_path), 'generator')
    fp32_bytes = os.path.getsize(tmp_path / 'generator_core.onnx')
    for path in paths:  # as export_mobile.py --precision=int8 does
        mobile.quantize_onnx(path)
    core = onnx.load(str(tmp_path / 'generator_core.onnx'))
    weights = {tensor.name: tensor.dims for tensor in core.graph.initializer}
    float_matmuls = [node.name for node in core.graph.node  # x W with W a weight; the DFT's F x stays exact
                     if node.op_type in ('MatMul', 'Gemm') and len(weights.get(node.input[1], ())) == 2]
    assert not float_matmuls and any(node.op_type == 'MatMulInteger' for node in core.graph.node)
    assert os.path.getsize(tmp_path / 'generator_core.onnx') < 0.7 * fp32_bytes
    exported = MobileGenerator(load_part(str(tmp_path), 'generator', 'onnx', torch.float32,
                                         mobile.input_names(methods)), batch=2, state_init='prelude')
    with torch.no_grad():
        reference = model(z, t, text, mask, 2)
    assert (exported(z, t, text, mask, 2) - reference).abs().max() < 5e-2 * reference.abs().max()


@FULL
def test_an_export_without_a_format_is_one_line(tmp_path):
    for args, message in ((['export_mobile.py', '--pte=False', '--onnx=False'], '--pte=False and --onnx=False'),
                          (['export_mobile.py', '--pte=False', '--precision=fp16'],
                           'fp16 has no ONNX files, so keep --pte=True')):
        result = _run(args, tmp_path)
        assert result.returncode and result.stderr.strip() == f"error: nothing to export: {message}", result.stderr
    (tmp_path / 'mobile.json').write_text(json.dumps(dict(pte=False, onnx=True, sample_prompt='a red circle',
                                                          steps=2, iters=2, cfg_scale=4.0)))
    result = _run(['run_mobile.py', f'--export_dir={tmp_path}'], tmp_path)  # the default format is pte
    assert result.returncode and 'was exported with --pte=False; run it with --format=onnx' in result.stderr
    assert result.stderr.count('\n') == 1, result.stderr


def test_saved_tokenizer_pads_to_the_exported_length_like_the_encoder(tmp_path):
    import mobile
    from mobile import MobileTextEncoder
    encoder = load_text_encoder('minilm')
    mobile.save_tokenizer(encoder, str(tmp_path / 'tokenizer.json'))
    prompts = ['a large red circle in the center on a blue background', '']
    execute = lambda method, **inputs: [encoder.model(**inputs).last_hidden_state]  # noqa: E731
    tokens, mask = MobileTextEncoder(execute, str(tmp_path / 'tokenizer.json'))(prompts)
    reference, reference_mask = encoder(prompts)
    assert tokens.shape[1] == 77 and mask.shape == (2, 77)
    length = reference.shape[1]
    assert torch.equal(mask[:, :length], reference_mask) and not mask[:, length:].any()
    assert torch.allclose(tokens[:, :length][reference_mask], reference[reference_mask], atol=1e-5)


# -----------------------------------------------------------------------------
# fuzz: every entry script, bad input, one error line


ENTRY_SCRIPTS = ('train_vae.py', 'train_flow.py', 'train_control.py', 'distill.py', 'sample.py', 'eval_shapes.py',
                 'eval_scenes.py', 'eval_real.py', 'export_mobile.py', 'run_mobile.py', 'bench.py', 'check_gpu.py')


CHOICE_SETTINGS = ('init_from', 'loss_weighting', 'mixer', 'model_size', 'dtype', 'precision', 'backend', 'sections',
                   'format', 'sampler', 'control', 'iteration_embedding', 'state_init')


READ_PATHS = {'train_vae.py': ('data_dir',), 'train_flow.py': ('vae_dir', 'data_dir'),
              'train_control.py': ('base_dir', 'data_dir'), 'distill.py': ('teacher_dir',),
              'sample.py': ('out_dir', 'init_image'), 'eval_shapes.py': ('out_dir',), 'eval_scenes.py': ('out_dir',),
              'eval_real.py': ('out_dir',),
              'export_mobile.py': ('out_dir',), 'run_mobile.py': ('export_dir',), 'check_gpu.py': ('data_dir',)}


def _settings_block(script):
    """A script's settings block (name -> default) and the settings its configure() call says must be positive."""
    source = open(os.path.join(HERE, script)).read()
    block = source.split('# ' + '-' * 77)[1]
    defaults = {}
    for node in ast.parse(block).body:
        if isinstance(node, ast.Assign):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # device = 'cuda' if ... else 'cpu'
                pass
    positive = ()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'configure':
            positive = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == 'positive'), ())
    return defaults, positive


def _bad_values(name, default, positive):
    """Values the configurator or the script must refuse for this setting."""
    if type(default) is bool:
        return ['maybe', '2']
    if type(default) in (int, float):
        values = ['abc', 'nan', 'inf', '-inf', '1e999', '9' * 30, 'ünïcödé', 'x' * 10000]
        values += ['1.5'] if type(default) is int else []
        values += ['-3'] if default >= 0 else []
        values += ['0'] if name in positive else []
        return values
    if type(default) is tuple:
        return ['(', "('a',)", '[[1], 2]'] + (['()', '(0,)'] if name in positive else [])
    if name in CHOICE_SETTINGS:
        return ['nonsense', 'ünïcödé', 'x' * 10000]
    return []


def _fuzz_cases(tmp_path, seed=0, per_script=4):
    rng = random.Random(seed)
    corrupt_run = tmp_path / 'corrupt-run'
    corrupt_run.mkdir()
    (corrupt_run / 'ckpt.safetensors').write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    (corrupt_run / 'config.json').write_text('{"text_encoder": "minilm"')
    empty_file, broken_config = tmp_path / 'empty.png', tmp_path / 'broken.py'
    empty_file.write_bytes(b'')
    broken_config.write_text('batch_size = (\n')
    cases = []
    for script in ENTRY_SCRIPTS:
        defaults, positive = _settings_block(script)
        pool = [f'--{name}={value}' for name, default in defaults.items()
                for value in _bad_values(name, default, positive)]
        cases += [(script, arg) for arg in rng.sample(pool, per_script)]
        cases += [(script, '--no_such_setting=1'), (script, str(broken_config)), (script, 'config/no_such_file.py')]
        if script in ('train_vae.py', 'train_flow.py', 'train_control.py', 'distill.py'):  # where a run writes
            cases += [(script, f'--out_dir={"x" * 10000}'), (script, f'--out_dir={empty_file}')]
        if script in ('sample.py', 'run_mobile.py'):  # where a user names the image written
            cases += [(script, '--output=missing_dir/x.png'), (script, '--output=x.txt')]
        for name in READ_PATHS.get(script, ()):
            cases += [(script, f'--{name}={tmp_path / "missing"}'), (script, f'--{name}={"x" * 10000}')]
            cases += [(script, f'--{name}={empty_file if name == "init_image" else corrupt_run}')]
    return cases


def _one_error_line_each(script, args, cwd):
    """-> [(arg, stopped with exactly one error line and no traceback, the output's end)]."""
    runs = _run_each(script, [[arg] for arg in args], cwd)
    return [(arg, run.returncode != 0 and sum('error:' in line for line in output.splitlines()) == 1
             and 'Traceback' not in output, output[-600:])
            for arg, run in zip(args, runs) for output in [run.stdout + run.stderr]]


@FULL
def test_fuzz_every_entry_script_stops_bad_input_with_one_error_line(tmp_path):
    cases = _fuzz_cases(tmp_path)
    by_script = {script: [arg for s, arg in cases if s == script] for script in ENTRY_SCRIPTS}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda item: [(item[0], *r) for r in _one_error_line_each(*item, tmp_path)],
                           by_script.items())
    results = [r for per_script in results for r in per_script]
    assert len(results) == len(cases)
    failures = [f"{script} {arg[:80]}:\n{output}" for script, arg, ok, output in results if not ok]
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n\n".join(failures)
    assert len(cases) >= 80
    assert not list(tmp_path.glob('out*')), "a run that stopped before its work left its out_dir behind"


# -----------------------------------------------------------------------------
# web/: the page in headless Chromium, against the Python ONNX pipeline (browser.py)


# -----------------------------------------------------------------------------
# iris.ipynb and internals.py


def test_the_notebook_is_committed_without_outputs():
    with open(os.path.join(HERE, 'iris.ipynb')) as f:  # plain JSON: the smoke tier installs no notebook packages
        notebook = json.load(f)
    code = [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']
    assert code and all(not cell['outputs'] and cell['execution_count'] is None for cell in code)
    assert any('TINY = False' in ''.join(cell['source']) for cell in code)  # the setting the test below turns on


@FULL
def test_the_notebook_runs_every_cell_on_the_cpu_and_draws_its_figures(tmp_path):
    nbformat = pytest.importorskip('nbformat', reason='pip install -r requirements-notebook.txt')
    nbclient = pytest.importorskip('nbclient', reason='pip install -r requirements-notebook.txt')
    pytest.importorskip('onnxruntime', reason='pip install -r requirements-export.txt')
    notebook = nbformat.read(os.path.join(HERE, 'iris.ipynb'), as_version=4)
    for cell in notebook.cells:
        cell.source = cell.source.replace('TINY = False', 'TINY = True').replace(
            "else 'out-notebook'", f"else {str(tmp_path / 'out')!r}")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': HERE}}).execute()  # raises on any cell's error
    images = [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.get('outputs', [])
              if 'image/png' in output.get('data', {})]
    assert len(images) == 4  # loss curves, wavelet view, the r sweep, inside (no distilled student here)
    assert (tmp_path / 'out' / 'internals.png').exists()
    printed = ''.join(output.get('text', '') for cell in notebook.cells for output in cell.get('outputs', []))
    assert 'state change per iteration:' in printed and 'in all' in printed and 'no distilled student' in printed
    assert 'layer 1: gate g per iteration' in printed and 'decay gamma per head' in printed  # a GRFM Core's numbers


def test_internals_record_what_the_core_does_at_each_iteration():
    torch.manual_seed(0)
    model = _wake_up(Iris(_tiny_config(core_layers=2)).eval())
    text, mask = torch.randn(1, 5, 24), torch.ones(1, 5, dtype=torch.bool)
    z = torch.randn(1, 16, 6, 8)
    record = internals.record_step(model, z, 0.5, Prompt(text, mask), iters=3)
    assert len(record.states) == 6 and len(record.gates) == 6 and len(record.fourier) == 6  # 3 iterations x 2 layers
    # the state change, against the states written out by running the Core by hand
    encoded = model.encode_prompt(text, mask)
    e, c = model.prelude_forward(z, torch.full((1,), 0.5), encoded[1])
    states = [e]  # s_0 = e, then each iteration conditioned on its progress i / r
    for i in range(3):
        modulations = [m[0] for m in model.core_condition(c, torch.full((1, 1), i / 3))]
        states.append(model.core_iteration(states[-1], e, modulations, encoded[0].unbind(0), mask, (6, 8),
                                           [layer.mixer.prepare((6, 8)) for layer in model.core]))
    expected = torch.stack([(b - a).norm() / a.norm() for a, b in zip(states, states[1:])])
    torch.testing.assert_close(internals.state_changes(record), expected, rtol=1e-4, atol=1e-6)
    gates = internals.gate_maps(record, 2, (6, 8))
    assert gates.shape == (3, 2, 6, 8) and ((gates > 0) & (gates < 1)).all()
    energy = internals.fourier_energy(record)
    assert energy.shape == (6, 5) and torch.allclose(energy.sum(1), torch.ones(6))  # max(|ky|, |kx|) <= 4 on 6x8
    decay = internals.decay_by_distance(model, distances=5)
    assert decay.shape == (2, model.config.heads, 5) and (decay[..., 0] == 1).all() and (decay.diff(dim=-1) < 0).all()
    view = internals.wavelet_view(make_shapes(1, 32, seed=0)[0][0])
    assert view['LL'].shape == (16, 16, 3) and 0 <= view['LL'].min() and view['HH'].max() <= 1


@pytest.fixture(scope='session')
def web_export(tmp_path_factory):
    """-> export(sampler): a small run's ONNX files, as export_mobile.py writes them, for a
    teacher ('euler', with guidance: the generator at batch 2) or a distilled student
    ('consistency', batch 1), each exported on first use. Its text encoder is a one-layer BERT
    behind MiniLM's real tokenizer, so the page tokenises as the app would."""
    pytest.importorskip('onnxruntime', reason='pip install -r requirements-export.txt')
    if browser.missing():
        pytest.skip(browser.missing())
    import mobile
    from transformers import BertConfig, BertModel
    shared = str(tmp_path_factory.mktemp('shared'))
    torch.manual_seed(0)
    encoder = load_text_encoder('minilm')
    mobile.save_tokenizer(encoder, os.path.join(shared, 'tokenizer.json'))
    bert = BertModel(BertConfig(vocab_size=encoder.tokenizer.vocab_size, hidden_size=24, num_hidden_layers=1,
                                num_attention_heads=3, intermediate_size=48), add_pooling_layer=False).eval()
    ids = torch.ones(1, 77, dtype=torch.long)
    text_encoder = mobile.Method(bert, lambda m, i, a: m(input_ids=i, attention_mask=a).last_hidden_state)
    mobile.export_onnx({'forward': (text_encoder, dict(input_ids=ids, attention_mask=ids))}, shared, 'text_encoder')
    vae = WaveletVAE(channels=(8, 16, 16)).eval()
    mobile.export_onnx({'forward': (mobile.Method(vae, lambda m, z: m.decode_latent(z)),
                                    dict(z=torch.randn(1, 16, 4, 4)))}, shared, 'vae_decoder')
    exported = {}

    def export(sampler, state_init='prelude'):
        if (sampler, state_init) not in exported:
            folder = str(shutil.copytree(shared, tmp_path_factory.mktemp(sampler) / 'export'))
            batch, steps = {'euler': (2, 25), 'consistency': (1, 2)}[sampler]
            z, t, text, mask = _inputs(batch, side=4, text_len=77)
            torch.manual_seed(0)  # weights large enough that the generator, not the noise, decides the picture
            generator = wake_up(Iris(_tiny_config(fft_impl='dft')), std=0.2).eval().requires_grad_(False)
            methods = mobile.generator_methods(generator, z, t, text, mask)
            mobile.export_onnx(methods, folder, 'generator')
            inputs = {'text_encoder': {'forward': ['input_ids', 'attention_mask']},
                      'generator': mobile.input_names(methods), 'vae_decoder': {'forward': ['z']}}
            mobile.save_manifest(folder, dict(precision='fp32', dtype='float32', onnx=True, image_size=64,
                                              latent_channels=16, generator_batch=batch, state_init=state_init,
                                              control='', text_tokens=77,
                                              sampler=sampler, steps=steps, iters=2, cfg_scale=4.0, shift=1.0,
                                              sample_prompt='a large red circle in the center', untrained=True,
                                              inputs=inputs))
            exported[sampler, state_init] = folder
        return exported[sampler, state_init]
    return export


@pytest.mark.parametrize('sampler,state_init', [('euler', 'noise'),
                                                pytest.param('consistency', 'prelude', marks=FULL)])
def test_the_web_page_draws_what_the_python_onnx_pipeline_draws(web_export, sampler, state_init):
    import mobile
    from tokenizers import Tokenizer
    folder = web_export(sampler, state_init)
    manifest = mobile.read_manifest(folder)
    prompt, noise = 'a small blue square at the top left', mobile.initial_noise(manifest, seed=3)
    settings = {k: manifest[k] for k in ('steps', 'cfg_scale', 'iters', 'shift', 'sampler')}
    torch.manual_seed(5)  # a noise-started Core's s_0 at each step, drawn as Iris.velocity draws it
    image, _ = mobile.generate(mobile.exported_parts(folder, manifest, 'onnx'), [prompt], noise, **settings,
                               generator=torch.Generator().manual_seed(4))
    expected = to_uint8(image)[0].permute(1, 2, 0).numpy()
    assert expected.std() > 10  # a picture, not a flat colour that any pipeline would match
    torch.manual_seed(5)
    tokens = (manifest['image_size'] // 16) ** 2  # patch 1
    core_start = [torch.randn(manifest['generator_batch'], tokens, _tiny_config().dim)
                  for _ in range(manifest['steps'])]
    with browser.web_page(folder) as (page, _):
        backend = page.evaluate('window.iris.ready.then((p) => [p.backend, p.threads, self.crossOriginIsolated])')
        assert backend == ['wasm', 2, True]  # headless Chromium has no GPU adapter; serve.py's headers allow threads
        browser.draw_with_noise(page, noise, torch.Generator().manual_seed(4), manifest['steps'],  # generate's seed
                                core_start if state_init == 'noise' else None,
                                prompt=prompt, iters=manifest['iters'], cfgScale=manifest['cfg_scale'])
        drawn = browser.canvas_pixels(page)
        assert drawn.shape == expected.shape
        assert np.abs(drawn.astype(int) - expected).max() <= 2, "the page's image differs from the Python pipeline's"
        if sampler == 'euler':  # tokenizers.js and the page's padding and truncation against the Rust tokenizer
            tokenizer = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
            for text in ('', 'Café déjà-vu, 😀 "quoted" RED circle!', 'a circle ' * 60):
                encoding = tokenizer.encode(text)
                assert page.evaluate('(t) => window.iris.ready.then((p) => p.tokenize(t))', text) == dict(
                    ids=encoding.ids, mask=encoding.attention_mask), text


@FULL
def test_the_web_page_says_what_is_wrong_in_one_line(web_export, tmp_path):
    folder = shutil.copytree(web_export('consistency'), tmp_path / 'export')
    (folder / 'generator_core.onnx').unlink()
    with browser.web_page(str(folder)) as (page, _):
        # the page fills in the run's sample prompt once it is ready: type only after that
        page.wait_for_selector('#draw:enabled')
        for prompt, message in (('  ', 'error: the prompt is empty: write what to draw'),
                                ('a red circle', 'generator_core.onnx: 404')):
            page.fill('#prompt', prompt)  # as a person would: type, then press Draw
            page.click('#draw')
            page.wait_for_function("(m) => document.getElementById('error').textContent.includes(m)", arg=message)
            shown = page.evaluate("document.getElementById('error').textContent")
            assert message in shown and '\n' not in shown, shown
            with pytest.raises(Exception, match=message.split(': ', 1)[1]):  # and draw() rejects with it
                page.evaluate('(p) => window.iris.draw({prompt: p})', prompt)
    result = subprocess.run([sys.executable, os.path.join(HERE, 'web', 'serve.py'), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode and result.stderr.strip().startswith('error: ') and 'no mobile.json' in result.stderr
