"""
IRIS smoke and reference tests:  python -m pytest -q test_iris.py

Each test checks real behaviour against an independent reference (the 2x2 Haar formulas
written out, a loss that must fall on a real batch, a checkpoint that must restore
bit-exactly), on data the tests make themselves: nothing is downloaded.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configurator import configure
from model import (SIZES, Attention, FourierMixer, Iris, IrisConfig, RecurrentMixer, SpatialMixer, count_parameters,
                   irfft2_dft, linear_scan, rfft2_dft, window_attention)
from data import load_data, load_hub, load_imagefolder, make_shapes, to_float
from training import load_checkpoint, make_ema, read_checkpoint, save_checkpoint
from vae import WaveletVAE, psnr, reconstruct, vae_loss
from wavelet import dwt, idwt

HERE = os.path.dirname(os.path.abspath(__file__))

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


def test_vae_training_steps_lower_the_loss_on_a_real_batch():
    torch.manual_seed(0)
    images, _ = make_shapes(16, 32, seed=3)
    x = to_float(images)
    vae = WaveletVAE(channels=(16, 32, 32))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        wavelet_hat, mean, logvar = vae(x)
        loss, _ = vae_loss(wavelet_hat, x, mean, logvar)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


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
    """adaLN-Zero starts every gate and the output at zero; give them small random values
    so that every pathway changes the output, as after some training."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


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
    re, im = rfft2_dft(x)
    torch.testing.assert_close(re, spectrum.real, rtol=0, atol=1e-5)
    torch.testing.assert_close(im, spectrum.imag, rtol=0, atol=1e-5)
    noise = torch.randn_like(spectrum)  # irfft2 must also ignore DC/Nyquist imaginary parts as torch does
    expected = torch.fft.irfft2(noise, s=(h, w), dim=(1, 2), norm='ortho')
    torch.testing.assert_close(irfft2_dft(noise.real, noise.imag, w), expected, rtol=0, atol=1e-5)
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


def _sequential_scan(a, b, reverse=False):
    if reverse:
        return _sequential_scan(a.flip(1), b.flip(1)).flip(1)
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize('tokens', [1, 7, 16, 17, 100, 1024, 4096])
@pytest.mark.parametrize('reverse', [False, True])
def test_parallel_scan_matches_a_sequential_loop_forward_and_backward(tokens, reverse):
    torch.manual_seed(tokens)
    a = (0.5 + 0.5 * torch.rand(2, tokens, 8)).requires_grad_()  # decays near 1 carry state far
    b = torch.randn(2, tokens, 8).requires_grad_()
    weight = torch.randn(2, tokens, 8)
    h = linear_scan(a, b, reverse)
    expected = _sequential_scan(a, b, reverse)
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-4)
    grads = torch.autograd.grad((h * weight).sum(), (a, b))
    expected_grads = torch.autograd.grad((expected * weight).sum(), (a, b))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-4)
    with torch.no_grad():  # the autograd-free path that export traces
        torch.testing.assert_close(linear_scan(a, b, reverse), expected, rtol=0, atol=1e-4)


def test_recurrent_mixer_runs_half_the_channels_each_way():
    torch.manual_seed(0)
    mixer = RecurrentMixer(8, 2)
    x = torch.randn(1, 12, 8)
    out = mixer(x)
    changed = x.clone()
    changed[:, -1] += 1  # the last token reaches every earlier one, but only backwards
    diff = (mixer(changed) - out).abs()[0, :-1]
    assert diff[:, :4].max() == 0 and diff[:, 4:].min() > 0


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


@pytest.mark.parametrize('backprop_iters', [0, 2])
def test_gradients_reach_every_parameter(backprop_iters):
    model = _wake_up(Iris(_tiny_config(backprop_iters=backprop_iters)))
    model(*_inputs(), iters=4).square().mean().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_outputs_finite_at_one_and_sixteen_iterations():
    model = _wake_up(Iris(_tiny_config())).eval()
    with torch.no_grad():
        for iters in (1, 16):
            assert torch.isfinite(model(*_inputs(), iters=iters)).all()


def test_core_conditioning_changes_with_the_iteration_index():
    model = _wake_up(Iris(_tiny_config()))
    torch.manual_seed(2)
    s, e, c_base = torch.randn(2, 16, 48), torch.randn(2, 16, 48), torch.randn(2, 48)
    context, cross_mask = torch.randn(2, 5, 48), torch.ones(2, 1, 1, 5, dtype=torch.bool)
    steps = [model.core_iteration(s, e, c_base, i, 8, (4, 4), context, cross_mask) for i in (0, 1, 7)]
    assert (steps[0] - steps[1]).abs().max() > 1e-3 and (steps[1] - steps[2]).abs().max() > 1e-3


@pytest.mark.parametrize('name,target', [('tiny', 19e6), ('small', 47e6), ('base', 135e6)])
def test_model_sizes_match_the_seed_within_ten_percent(name, target):
    counts = count_parameters(SIZES[name]())
    assert abs(counts['total'] - target) <= 0.1 * target, counts
    assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')


# -----------------------------------------------------------------------------
# configurator.py


def _script_globals():
    return {'__file__': '/somewhere/train_vae.py', 'batch_size': 32, 'lr': 1e-3, 'out_dir': 'out',
            'compile': False, 'channels': (32, 64), 'torch': torch}


def test_config_file_and_command_line_override_in_order(tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text("import math\nbatch_size = 8\nif script == 'train_vae':\n    lr = 3e-4\n"
                           "if script == 'train_flow':\n    nonsense_for_another_script = 1\n")
    g = _script_globals()
    settings = configure(g, [str(config_file), '--batch_size=16', '--out_dir=out-test', '--lr', '1', '--channels=[8, 16]'])
    assert (g['batch_size'], g['lr'], g['out_dir'], g['channels']) == (16, 1.0, 'out-test', (8, 16))
    assert settings['batch_size'] == 16 and 'torch' not in settings


@pytest.mark.parametrize('args,message', [
    (['--batch_sise=16'], "has no setting 'batch_sise'"),
    (['--batch_size=1.5'], "'batch_size' .* must be int"),
    (['--compile=yes'], "'compile' .* must be bool"),
    (['--lr'], 'has no value'),
    (['no/such/config.py'], 'cannot read config file'),
])
def test_config_errors_are_one_line_messages(args, message):
    with pytest.raises(SystemExit, match=message) as e:
        configure(_script_globals(), args)
    assert '\n' not in str(e.value)


def test_config_file_with_an_unknown_key_is_an_error(tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text('learning_rate = 1e-3\n')
    with pytest.raises(SystemExit, match=f"no setting 'learning_rate' .*{config_file}"):
        configure(_script_globals(), [str(config_file)])

# -----------------------------------------------------------------------------
# data.py


def test_shapes_are_deterministic_and_captioned():
    images, captions = make_shapes(6, 32, seed=5)
    again, captions_again = make_shapes(4, 32, seed=5)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    assert torch.equal(images[:4], again) and captions[:4] == captions_again  # item i does not depend on N
    assert all(c.startswith('a ') and c.endswith(' background') for c in captions)
    assert not torch.equal(make_shapes(4, 32, seed=6)[0], again)


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


def test_imagefolder_loader_converts_odd_images_and_skips_corrupt_ones(tmp_path):
    captions = _write_folder(tmp_path)
    with pytest.warns(UserWarning, match='skipped 2 unreadable'):
        images, loaded = load_imagefolder(str(tmp_path), 32)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(loaded) == sorted(captions)


def test_load_data_holds_out_a_disjoint_split(tmp_path):
    _write_folder(tmp_path)
    with pytest.warns(UserWarning):
        (train, train_captions), (held, held_captions) = load_data('shapes', str(tmp_path), 32, 0, num_holdout=2)
    assert len(train) == 3 and len(held) == 2 and not set(train_captions) & set(held_captions)


def test_missing_folder_and_offline_hub_fail_fast_with_a_clear_message(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='no metadata.jsonl'):
        load_imagefolder(str(tmp_path), 32)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty-hf-cache'))  # nothing cached
    monkeypatch.setattr('data._hub_reachable', lambda: False)
    start = time.time()
    with pytest.raises(SystemExit, match='--data_dir'):
        load_hub('someone/some-captioned-images', 32)
    assert time.time() - start < 30  # the real client retries for minutes when left alone

# -----------------------------------------------------------------------------
# training.py and train_vae.py


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = WaveletVAE(channels=(8, 16, 32))
    ema, optimizer, generator = make_ema(model), torch.optim.AdamW(model.parameters()), torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    wavelet_hat, mean, logvar = model(x)
    vae_loss(wavelet_hat, x, mean, logvar)[0].backward()
    optimizer.step()
    path = str(tmp_path / 'ckpt.safetensors')
    save_checkpoint(path, model, ema, optimizer, 7, {'lr': 1.0}, generator)
    expected_draws = (torch.rand(3), torch.rand(3, generator=generator))

    restored = WaveletVAE(channels=(8, 16, 32))
    restored_ema = make_ema(restored)
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    restored_generator = torch.Generator()
    assert load_checkpoint(path, restored, restored_ema, restored_optimizer, restored_generator) == 7
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()['state'][0]['exp_avg_sq'], restored_optimizer.state_dict()['state'][0]['exp_avg_sq'])
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert torch.equal(torch.rand(3, generator=restored_generator), expected_draws[1])
    with pytest.raises(SystemExit, match='holds a model built with'):
        other = WaveletVAE(channels=(8, 16, 16))
        load_checkpoint(path, other, make_ema(other), torch.optim.AdamW(other.parameters()), torch.Generator())
    with pytest.raises(SystemExit, match='no checkpoint at'):
        read_checkpoint(str(tmp_path / 'missing.safetensors'))


def _run(args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, args[0])] + args[1:], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_train_vae_script_end_to_end_then_resume(tmp_path):
    tiny = ['--image_size=32', '--num_images=64', '--num_holdout=8', '--channels=(8, 16, 16)',
            '--batch_size=8', '--eval_interval=10', '--out_dir=run']
    result = _run(['train_vae.py', os.path.join(HERE, 'config', 'shapes.py'), *tiny, '--max_steps=20'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'held-out PSNR' in result.stdout
    out = tmp_path / 'run'
    assert {'ckpt.safetensors', 'config.json', 'log.csv', 'recon_000010.png', 'recon_000020.png'} <= set(os.listdir(out))
    tensors, meta = read_checkpoint(str(out / 'ckpt.safetensors'), prefixes=('ema.',))
    assert meta['step'] == 20 and meta['config']['image_size'] == 32
    assert not torch.equal(tensors['ema.latent_scale'], torch.ones(16))  # measured at the end
    vae = WaveletVAE(**meta['model_config'])
    vae.load_state_dict({k[4:]: v for k, v in tensors.items()})
    images, _ = make_shapes(4, 32, seed=9)
    assert reconstruct(vae, images).shape == images.shape

    result = _run(['train_vae.py', os.path.join(HERE, 'config', 'shapes.py'), *tiny, '--max_steps=30', '--init_from=resume'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [int(line.split(',')[0]) for line in (out / 'log.csv').read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 29  # the log continues where it stopped

    for bad, message in [('--typo_key=1', "has no setting 'typo_key'"), ('--image_size=40', 'not a multiple of 16')]:
        result = _run(['train_vae.py', bad], tmp_path)
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr
