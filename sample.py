"""
Generate images with a trained IRIS generator and write them as one PNG grid.

    python sample.py --iters 4                       # newest run under out*/, its held-out prompts
    python sample.py config/shapes.py --prompt "a large red circle in the center on a blue background"
    python sample.py --prompt "a red circle|a blue square" --num_samples 4 --steps 10 --seed 1
    python sample.py --out_dir out-shapes-flow --iters 16 --cfg_scale 6 --output out-shapes-flow/r16.png
    python sample.py --out_dir out-shapes-cd --steps 2     # a distill.py student: 1-4 steps, no cfg
    python sample.py --init_image photo.png --strength 0.6 --prompt "..."      # img2img (SDEdit)
    python sample.py --init_image photo.png --mask hole.png --prompt "..."     # inpainting

--iters is the number of Core iterations r (more compute, usually better images; any
value works, not only those seen in training); --steps the number of Euler steps, or of
consistency steps for a distilled student (whose guidance is baked in: --cfg_scale is
ignored).
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image

from configurator import configure
from data import save_grid, to_float, to_square_rgb
from flow import text_to_image
from model import load_generator
from text import load_text_encoder
from training import mixed_precision, resolve_dtype
from vae import check_image_size, latent_keep_mask, load_vae

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py run; '' = the newest generator checkpoint under out*/
prompt = ''  # one prompt, or several separated by '|'; '' = the run's held-out sample prompts
num_samples = 1  # images per prompt
steps = 25
iters = 8
cfg_scale = 4.0
shift = 1.0  # > 1 spends more steps at high noise (SD3's resolution shift)
seed = 0
size = 0  # image side in pixels; 0 = the training size
output = ''  # the PNG to write; '' = out_dir/sample.png
# editing with the same model
init_image = ''  # img2img: start from this image instead of pure noise (the grid shows it first)
strength = -1.0  # how far init_image is noised: 0 keeps it, 1 ignores it; -1 = 0.75, or 1 with a mask
mask = ''  # inpainting: an image the size of init_image, white where to repaint, black where to keep
text_encoder = ''  # '' = the checkpoint's; a different one is refused
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'auto' (bf16 on sm80+ GPUs, fp16 on older ones, fp32 on a CPU), 'float32', 'bfloat16' or 'float16'
# -----------------------------------------------------------------------------
configure(globals(), positive=('num_samples', 'steps', 'iters', 'shift'))


def open_image(path, what):
    try:
        image = Image.open(path)
        image.load()  # PIL reads lazily: make a truncated file fail here, not deep inside a resize
        return image
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read --{what} {path} ({type(e).__name__}); give a PNG or JPEG file") from None


def load_edit(vae, init_image, mask, size):
    """init_image (and mask) -> the picture (1, 3, S, S) uint8, its latent and the latent keep-mask."""
    image = open_image(init_image, 'init_image')
    picture = torch.from_numpy(np.asarray(to_square_rgb(image, size))).permute(2, 0, 1)[None]
    keep = None
    if mask:
        hole = open_image(mask, 'mask').convert('L')
        if hole.size != image.size:
            warnings.warn(f"mask {hole.size[0]}x{hole.size[1]} resized to the image's {image.size[0]}x{image.size[1]}")
            hole = hole.resize(image.size, Image.NEAREST)
        levels = np.asarray(hole)
        grey = ((levels > 15) & (levels < 240)).mean()
        if grey > 0.01:
            raise SystemExit(f"error: --mask has {100 * grey:.0f}% grey pixels; make it black (keep) and white (repaint)")
        keep = latent_keep_mask(torch.from_numpy(np.asarray(to_square_rgb(hole, size))[:, :, 0] > 127)[None, None])
    with torch.no_grad():
        init = vae.encode_latent(to_float(picture).to(device))
    return picture, init, None if keep is None else keep.to(device)


model, run, out_dir = load_generator(out_dir, device)
if text_encoder and text_encoder != model.config.text_encoder:
    raise SystemExit(f"error: {out_dir} was trained with text encoder '{model.config.text_encoder}', not '{text_encoder}'; "
                     f"drop --text_encoder or train with it")
prompts = prompt.split('|') if prompt else run['sample_prompts']
empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
if empty:
    raise SystemExit(f"error: prompt {empty[0]} of {len(prompts)} is empty; write what to draw "
                     f"(separate several prompts with '|')")
if mask and not init_image:
    raise SystemExit("error: --mask needs the --init_image it applies to")
if strength == -1:
    strength = 1.0 if mask or not init_image else 0.75
elif not 0 <= strength <= 1:
    raise SystemExit(f"error: --strength must be between 0 (keep the image) and 1 (ignore it), got {strength}")
autocast, _ = mixed_precision(resolve_dtype(dtype, device), device)
size = size or run['image_size']
try:
    check_image_size(size, size, 16 * model.config.patch_size)
except ValueError as e:
    raise SystemExit(f"error: --size: {e}") from None

encoder = load_text_encoder(model.config.text_encoder, device)
vae = load_vae(run['vae_dir'], device)
init, keep = None, None
if init_image:
    picture, init, keep = load_edit(vae, init_image, mask, size)
prompts = [p for p in prompts for _ in range(num_samples)]
noise = torch.randn(len(prompts), model.config.latent_channels, size // 16, size // 16,
                    generator=torch.Generator().manual_seed(seed)).to(device)
sampler = run.get('sampler', 'euler')  # a distill.py student samples in 1-4 consistency steps
with autocast:
    images = text_to_image(model, vae, encoder, prompts, noise, steps, cfg_scale, iters, shift, sampler,
                           torch.Generator().manual_seed(seed + 1), init, strength, keep)
if init_image:
    images = torch.cat([picture, images])  # before, then after
output = output or os.path.join(out_dir, 'sample.png')
save_grid(images, output, columns=num_samples if num_samples > 1 and not init_image else min(8, len(images)))
settings = f"{size}x{size}, {steps} {sampler} steps, r={iters}" + ('' if sampler == 'consistency' else f", cfg {cfg_scale}")
if init_image:
    settings += f", from {init_image} at strength {strength}" + (f" inside {mask}" if mask else '')
print(f"wrote {len(images)} images ({settings}) to {output}")
