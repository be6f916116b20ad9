"""
Train the WaveletVAE (vae.py): stage 1 of IRIS.

    python train_vae.py config/shapes.py                       # CPU quickstart, a few minutes
    python train_vae.py config/shapes.py --data_dir=my_images  # a local imagefolder instead
    python train_vae.py config/pokemon.py                      # the seed's Pokemon setup (GPU)
    python train_vae.py config/shapes.py --init_from=resume    # continue from out_dir
    python train_vae.py config/emoji.py                        # on random 64 px crops of 128 px images
    python train_vae.py config/emoji.py --init_from=out-emoji-vae --out_dir=out-emoji-vae-2   # from a run
    torchrun --standalone --nproc_per_node=2 train_vae.py config/shapes.py

Loss: L1 + MSE in pixels + a wavelet L1 that weights the detail subbands (LH, HL, HH) more,
because blur lives there + a small KL that keeps the latent smooth enough to generate in.
Writes to out_dir: ckpt.safetensors + config.json, log.csv, recon_<step>.png (held-out
originals above their reconstructions). At the end it measures the latent shift/scale
the generator will use and prints the held-out PSNR.
"""
import math
import os
import time

import torch
from tqdm import tqdm

from checkpoint import check_init_from, load_checkpoint, lock_out_dir, save_checkpoint, start_from_run
from configurator import configure
from data import load_data, save_grid, to_float
from precision import DTYPES, mixed_precision, resolve_dtype
from training import (LossLog, all_sum, backward, ema_update, lr_at, make_ema, make_optimizer, micro_batches,
                      optimizer_step, setup_distributed, stop_if_diverged, sync_gradients, wrap_distributed)
from vae import WaveletVAE, check_image_size, psnr, reconstruct, vae_loss

# -----------------------------------------------------------------------------
out_dir = 'out-vae'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.safetensors) or a finished run's folder
eval_interval = 500  # held-out PSNR, a reconstruction grid and a checkpoint
log_interval = 10
# data
dataset = 'shapes'  # 'shapes' or 'scenes' (procedural, offline) or a Hub data set name
data_dir = ''  # a local imagefolder (images + metadata.jsonl); when set it wins over dataset
image_size = 64
crop_size = 0  # > 0: train on random crops of this side (a multiple of 16), evaluate and use at image_size
num_images = 20000  # shapes only; a folder or Hub set uses all its images
num_holdout = 256
# model
channels = (32, 64, 128)
latent_channels = 16
blocks_per_stage = 1
# loss
wavelet_weight = 1.0
high_freq_weight = 2.0  # weight of LH, HL, HH relative to LL in the wavelet loss
kl_weight = 1e-6
mse_weight = 4.0  # pixel MSE on top of pixel L1
# optimisation
batch_size = 32  # images per optimizer step, over all processes and accumulation steps
gradient_accumulation_steps = 1
max_steps = 2000
lr = 1e-3
min_lr = 1e-4
warmup_steps = 100
cooldown = 0.0  # > 0: lr held, then linear to min_lr over this last fraction of the steps (training.lr_at); 0: cosine
weight_decay = 0.0
muon = False  # Muon on the hidden weight matrices, AdamW on the rest (training.Muon)
grad_clip = 1.0
ema_decay = 0.999
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
compile = False
# -----------------------------------------------------------------------------
config = configure(globals(), positive=('eval_interval', 'log_interval', 'image_size', 'num_images', 'num_holdout',
                                       'channels', 'latent_channels', 'blocks_per_stage', 'batch_size',
                                       'gradient_accumulation_steps', 'max_steps', 'lr'),
                   choices=dict(dtype=DTYPES), ranges=dict(cooldown=(0, 1)))
check_init_from(init_from)
try:
    check_image_size(image_size, image_size)
    check_image_size(crop_size or image_size, crop_size or image_size)
except ValueError as e:
    raise SystemExit(f"error: --image_size or --crop_size: {e}") from None
if crop_size > image_size:
    raise SystemExit(f"error: --crop_size={crop_size} is larger than --image_size={image_size}; crop to less")
rank, world_size, device = setup_distributed(device)
master = rank == 0  # logs, grids and checkpoints
shares = micro_batches(batch_size, rank, world_size, gradient_accumulation_steps)
if master:
    lock_out_dir(out_dir)
torch.manual_seed(seed)
dtype = resolve_dtype(dtype, device)
autocast, scaler = mixed_precision(dtype, device)


@torch.no_grad()
def measure_latent_stats(model, images, batch=64, limit=4096):
    means = []  # in fp32, as cache.py encodes the training set with them
    for i in range(0, min(len(images), limit), batch):
        means.append(model.encode(to_float(images[i:i + batch]).to(device))[0])
    z = torch.cat(means).transpose(0, 1).flatten(1)  # (16, everything)
    return z.mean(dim=1), z.std(dim=1)


(train_images, _), (holdout_images, _) = load_data(dataset, data_dir, image_size, num_images, num_holdout, seed=0)
print(f"data: {len(train_images)} training and {len(holdout_images)} held-out images at {image_size}x{image_size}")
if batch_size > len(train_images):
    raise SystemExit(f"error: batch_size {batch_size} is larger than the {len(train_images)} training images; "
                     f"lower --batch_size")

# channels_last: faster convolutions on a CPU
model = WaveletVAE(channels, latent_channels, blocks_per_stage)
if init_from not in ('scratch', 'resume'):
    start_from_run(init_from, model, 'VAE')
model = model.to(device, memory_format=torch.channels_last)
ema = make_ema(model)
print(f"WaveletVAE: encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M, "
      f"decoder {sum(p.numel() for p in model.decoder.parameters()) / 1e6:.2f}M parameters; {dtype} on {device}")
optimizer = make_optimizer(model, lr, weight_decay, muon, ends=(model.encoder[0], model.decoder[-1]))
data_generator = torch.Generator().manual_seed(seed)
ckpt_path = os.path.join(out_dir, 'ckpt.safetensors')
start_step = 0
if init_from == 'resume':
    start_step = load_checkpoint(ckpt_path, model, ema, optimizer, data_generator, scaler)['step']
train_model = wrap_distributed(model, world_size)
train_model = torch.compile(train_model) if compile else train_model
if master:
    log = LossLog(os.path.join(out_dir, 'log.csv'), ['loss', 'pixel', 'wavelet', 'kl', 'lr', 'holdout_psnr'],
                  resume_step=start_step if init_from == 'resume' else None)


def random_crops(images):
    """A crop_size crop of each image at its own random place (all of it without crop_size):
    the VAE is fully convolutional, so what it learns on crops serves the whole image, at
    (crop_size / image_size)^2 of the cost (Stable Diffusion's VAE trains on 256 px crops)."""
    if not crop_size:
        return images
    corners = torch.randint(image_size - crop_size + 1, (len(images), 2), generator=data_generator).tolist()
    return torch.stack([image[:, y:y + crop_size, x:x + crop_size] for image, (y, x) in zip(images, corners)])


def evaluate_and_save(step):
    recon = reconstruct(ema, holdout_images)
    save_grid(torch.cat([holdout_images[:8], recon[:8]]), os.path.join(out_dir, f"recon_{step:06d}.png"))
    save_checkpoint(ckpt_path, model, ema, optimizer, step, config, data_generator, scaler)
    return psnr(recon, holdout_images)


bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc='vae', dynamic_ncols=True,
           disable=not master)
start_time, score = time.time(), float('nan')
for step in bar:
    for group in optimizer.param_groups:
        group['lr'] = lr_at(step, max_steps, warmup_steps, lr, min_lr, cooldown)
    x = to_float(random_crops(train_images[torch.randint(len(train_images), (batch_size,), generator=data_generator)]))
    x = x.to(device)
    loss_sum = torch.zeros(())
    for micro, share in enumerate(shares):  # this process's micro-batches (all of x when alone)
        with sync_gradients(train_model, last=micro == len(shares) - 1):
            with autocast:
                wavelet_hat, mean, logvar = train_model(x[share])
            loss, parts = vae_loss(wavelet_hat.float(), x[share], mean.float(), logvar.float(), wavelet_weight,
                                   high_freq_weight, kl_weight, mse_weight)
            backward(loss * len(share), scaler, world_size, batch_size)
        loss_sum += loss.detach().float().cpu() * len(share)
    loss = all_sum(loss_sum) / batch_size
    stop_if_diverged(loss, step)
    optimizer_step(model, optimizer, scaler, grad_clip)
    ema_update(ema, model, step, ema_decay)
    if master and (step + 1) % eval_interval == 0 and step + 1 < max_steps:  # the last one follows the latent stats
        score = evaluate_and_save(step + 1)
    if master and (step % log_interval == 0 or step + 1 == max_steps):
        log.write(step, loss=loss.item(), lr=optimizer.param_groups[0]['lr'], holdout_psnr=score, **parts)
        shown = dict(loss=f"{loss.item():.4f}")
        if not math.isnan(score):  # no PSNR before the first evaluation
            shown['psnr'] = f"{score:.2f}"
        bar.set_postfix(shown)

if master:
    # the generator trains on (z - shift) / scale: measure them once, on the training images
    shift, scale = measure_latent_stats(ema, train_images)
    for m in (model, ema):
        m.latent_shift.copy_(shift)
        m.latent_scale.copy_(scale)
    score = evaluate_and_save(max_steps)
    print(f"latent shift {shift.mean().item():+.3f} (mean over channels), scale {scale.mean().item():.3f}")
    print(f"held-out PSNR {score:.2f} dB on {len(holdout_images)} images; "
          f"{(time.time() - start_time) / 60:.1f} min; checkpoint {ckpt_path}")
if world_size > 1:
    torch.distributed.destroy_process_group()
