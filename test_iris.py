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
from PIL import Image

from configurator import configure
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
