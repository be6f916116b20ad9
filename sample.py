"""
Generate images with a trained IRIS generator and write them as one PNG grid.

    python sample.py                                 # newest run under out*/, its held-out prompts, its best r
    python sample.py config/shapes.py --prompt "a large red circle in the center on a blue background"
    python sample.py --prompt "a red circle|a blue square" --num_samples 4 --steps 10 --seed 1
    python sample.py --out_dir out-shapes-flow --iters 16 --cfg_scale 6 --output out-shapes-flow/r16.png
    python sample.py --exit_tolerance 0.1 --iters 32    # adaptive: each image stops iterating by itself
    python sample.py --out_dir out-shapes-cd --steps 2     # a distill.py student: 1-4 steps, no cfg
    python sample.py --init_image photo.png --strength 0.6 --prompt "..."      # img2img (SDEdit)
    python sample.py --init_image photo.png --mask hole.png --prompt "..."     # inpainting
    python sample.py config/shapes_edges.py --control_image photo.png --prompt "..."  # photo.png's edges
    python sample.py config/emoji.py --upscale small.png --prompt "..."        # 2x super-resolution

--iters is the number of Core iterations r (more compute, usually better images; any
value works, not only those seen in training; by default the run's own best, its
sample_iters), or with --exit_tolerance the most it may use: each image then stops when an
iteration changes the Core's state by less than that fraction (model.iterate_core), and the
mean it used is printed. --steps is the number of
Euler steps, or of consistency steps for a distilled student (whose guidance is baked in:
--cfg_scale is ignored).

--control_image takes an ordinary image and extracts from it the signal the run's adapter was
trained on (its edges or its silhouette, data.control_map), so a photo, a drawing or a
generated image all work; the grid shows that map first. --upscale draws an image twice
the side of the given one whose 2x2 block means are that image (flow.upscale).
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import load_generator
from configurator import UsageWarning, configure
from data import MAX_PIXELS, check_output, control_map, image_tensor, map_image, open_image, save_grid, to_float
from flow import text_to_image, upscale as super_resolve
from precision import mixed_precision, resolve_dtype
from text import load_text_encoder
from vae import check_image_size, latent_keep_mask, load_vae

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py run; '' = the newest generator checkpoint under out*/
prompt = ''  # one prompt, or several separated by '|'; '' = the run's held-out sample prompts
num_samples = 1  # images per prompt
steps = 25
iters = 0  # Core iterations r; 0 = the run's sample_iters
exit_tolerance = 0.0  # > 0: adaptive iterations, at most iters
cfg_scale = 4.0
shift = 0.0  # > 1 spends more steps at high noise (SD3's resolution shift, flow.shift_time); 0 = the run's own
seed = 0
size = 0  # image side in pixels; 0 = the training size
output = ''  # the PNG to write; '' = out_dir/sample.png
# editing with the same model
init_image = ''  # img2img: start from this image instead of pure noise (the grid shows it first)
strength = -1.0  # how far init_image (or upscale) is noised: 0 keeps it, 1 ignores it; -1 = 0.75, 1 with a mask,
# 0.3 to upscale (low noise keeps the layout; eval_real.py compares strengths)
mask = ''  # inpainting: an image the size of init_image, white where to repaint, black where to keep
# spatial control and super-resolution
control_image = ''  # an image whose edges (or silhouette) a control run's adapter follows (train_control.py)
control_strength = 1.0  # 0 = the base generator, 1 = as trained, more = follow the control harder
upscale = ''  # an image of half the output side: draw it at twice the size (needs --prompt)
text_encoder = ''  # '' = the checkpoint's; a different one is refused
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
# -----------------------------------------------------------------------------
configure(globals(), positive=('num_samples', 'steps'))
torch.manual_seed(seed)  # what torch's global generator draws: a noise-started Core's s_0


def read_edit(init_image, mask, size):
    """init_image (and mask) -> the picture (1, 3, S, S) uint8 and the latent keep-mask (None without a mask)."""
    image = open_image(init_image, 'init_image')
    picture = image_tensor(image, size)
    keep = None
    if mask:
        hole = open_image(mask, 'mask').convert('L')
        if hole.size != image.size:
            warnings.warn(f"mask {hole.size[0]}x{hole.size[1]} resized to the image's {image.size[0]}x{image.size[1]}",
                          UsageWarning)
            hole = hole.resize(image.size, Image.NEAREST)
        levels = np.asarray(hole)
        grey = ((levels > 15) & (levels < 240)).mean()
        if grey > 0.01:
            raise SystemExit(f"error: --mask has {100 * grey:.0f}% grey pixels; "
                             f"make it black (keep) and white (repaint)")
        keep = latent_keep_mask(image_tensor(hole, size)[:, :1] > 127).to(device)
    return picture, keep


if output:
    check_output(output)
model, run, out_dir = load_generator(out_dir, device)
iters = iters or run['sample_iters']
if text_encoder and text_encoder != model.config.text_encoder:
    raise SystemExit(f"error: {out_dir} was trained with text encoder '{model.config.text_encoder}', "
                     f"not '{text_encoder}'; drop --text_encoder or train with it")
prompts = prompt.split('|') if prompt else run['sample_prompts']
empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
if empty:
    raise SystemExit(f"error: prompt {empty[0]} of {len(prompts)} is empty; write what to draw "
                     f"(separate several prompts with '|')")
if mask and not init_image:
    raise SystemExit("error: --mask needs the --init_image it applies to")
if upscale and (init_image or not prompt):
    raise SystemExit("error: --upscale needs a --prompt that describes the image, and no --init_image")
if control_image and not model.config.control:
    raise SystemExit(f"error: {out_dir} has no control adapter; train one "
                     f"(python train_control.py config/shapes_edges.py) and pass its --out_dir")
if strength == -1:
    strength = 0.3 if upscale else 1.0 if mask or not init_image else 0.75
elif not 0 <= strength <= 1:
    raise SystemExit(f"error: --strength must be between 0 (keep the image) and 1 (ignore it), got {strength}")
autocast, _ = mixed_precision(resolve_dtype(dtype, device), device)
if upscale:
    small = open_image(upscale, 'upscale')
    size = 2 * min(small.size)
    small = image_tensor(small, size // 2)
size = size or run['image_size']
# Far outside training a setting costs much: say how much
trained_iters = max(run['train_iters'])
if iters > 4 * trained_iters and not exit_tolerance:
    warnings.warn(f"--iters={iters} is {iters / trained_iters:.0f}x the most this run trained with "
                  f"(r={trained_iters}): {steps * iters} Core iterations per image, where r={trained_iters} takes "
                  f"{steps * trained_iters}", UsageWarning)
if steps > 200:
    warnings.warn(f"--steps={steps} is {steps / 25:.0f}x the default 25 steps and takes {steps / 25:.0f}x as long",
                  UsageWarning)
try:
    check_image_size(size, size, 16 * model.config.patch_size)
except ValueError as e:
    raise SystemExit(f"error: {'twice the --upscale image side' if upscale else '--size'}: {e}") from None
if size * size > MAX_PIXELS:
    raise SystemExit(f"error: --size={size} is over the {MAX_PIXELS // 2**20} Mpixel limit of an image; choose a "
                     f"smaller one (this run trained at {run['image_size']})")
if size > 2 * run['image_size']:
    warnings.warn(f"--size={size} is {size / run['image_size']:.0f}x the side this run trained at: "
                  f"{(size / run['image_size']) ** 2:.0f}x the tokens per Core iteration, at a scale it never saw",
                  UsageWarning)

# The user's pictures are read before the slow loads below, so that a bad one stops at once
init, keep, maps = None, None, None
if init_image:
    picture, keep = read_edit(init_image, mask, size)
if control_image:
    maps = control_map(image_tensor(open_image(control_image, 'control_image'), size), model.config.control)

encoder = load_text_encoder(model.config.text_encoder, device)
vae = load_vae(run['vae_dir'], device)
if init_image:
    with torch.no_grad():
        init = vae.encode_latent(to_float(picture).to(device))
prompts = [p for p in prompts for _ in range(num_samples)]
noise = torch.randn(len(prompts), model.config.latent_channels, size // 16, size // 16,
                    generator=torch.Generator().manual_seed(seed)).to(device)
sampling = dict(steps=steps, cfg_scale=cfg_scale, iters=iters, shift=shift or run.get('shift', 1.0),
                sampler=run.get('sampler', 'euler'),  # a distill.py student samples in 1-4 consistency steps
                generator=torch.Generator().manual_seed(seed + 1))
# A bar over Core iterations, not sampling steps: one step can hold thousands (--iters)
bar = tqdm(total=steps * iters, desc='sampling', unit='iter', dynamic_ncols=True)
used = []  # the iterations each sample ran, per network evaluation


def count_iterations(iterations):  # (B,); the batch runs until its last sample stops
    used.append(iterations)
    bar.update(int(iterations.max()))


sampling.update(exit_tolerance=exit_tolerance, record_iters=count_iterations)
with autocast:
    if upscale:
        images = super_resolve(model, vae, encoder, small=small.expand(len(prompts), -1, -1, -1), prompts=prompts,
                               noise=noise, strength=strength, **sampling)
    else:
        images = text_to_image(model, vae, encoder, prompts, noise, init=init, strength=strength, keep=keep,
                               control_map=maps.expand(len(prompts), -1, -1, -1) if control_image else None,
                               control_strength=control_strength, **sampling)
if init_image:
    images = torch.cat([picture, images])  # before, then after
if upscale:  # the input, enlarged without interpolation, then the result
    images = torch.cat([small.repeat_interleave(2, -1).repeat_interleave(2, -2), images])
if control_image:
    images = torch.cat([map_image(maps), images])
bar.close()
output = output or os.path.join(out_dir, 'sample.png')
edited = init_image or upscale or control_image
save_grid(images, output, columns=num_samples if num_samples > 1 and not edited else min(8, len(images)))
sampler = sampling['sampler']
if exit_tolerance:
    mean = torch.cat(used).mean().item()
    settings = f"{size}x{size}, {steps} {sampler} steps, r={mean:.1f} on average (at most {iters})"
else:
    settings = f"{size}x{size}, {steps} {sampler} steps, r={iters}"
settings += '' if sampler == 'consistency' else f", cfg {cfg_scale}"
if init_image or upscale:
    settings += f", from {init_image or upscale} at strength {strength}" + (f" inside {mask}" if mask else '')
if control_image:
    settings += f", following the {model.config.control} of {control_image} at strength {control_strength}"
print(f"wrote {len(images)} images ({settings}) to {output}")
