"""
GenEval on procedural scenes: draw one image per held-out caption (combinations training
never saw) and score it by GenEval's rules for its task (metrics.geneval), at each Core
iteration count r and with adaptive iterations.

    python eval_scenes.py --out_dir=out-scenes-flow                       # r = 1 ... 32
    python eval_scenes.py --out_dir=out-scenes-flow --exit_tolerance=0.1   # and adaptive, at most 32
    python eval_scenes.py --validate_only=True                            # the analyser on real scenes

The analyser is scored first on the real held-out scenes and their VAE reconstructions
(the ceiling a generator can reach through this VAE); it stops the eval if it reads fewer
than 99% of the real ones right.
"""
import os
import time

import numpy as np
import torch

from cache import encode_images
from configurator import configure
from data import TASKS, make_scenes, save_grid, scene_attributes
from flow import held_out_loss, text_to_image
from metrics import geneval
from text import load_text_encoder
from checkpoint import load_generator
from precision import mixed_precision, resolve_dtype
from vae import load_vae, reconstruct

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py run on dataset='scenes'; '' = the newest generator checkpoint under out*/
num_prompts = 384  # held-out captions, 64 of each task (seed 1, as train_flow.py's held-out set)
iters_list = (1, 2, 4, 8, 16, 32)  # core iterations r to compare
exit_tolerance = 0.0  # > 0: also adaptive iterations (model.iterate_core), at most max(iters_list)
steps = 25  # Euler steps
cfg_scale = 4.0
seed = 0
validate_only = False
batch_size = 128
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
# -----------------------------------------------------------------------------
configure(globals(), positive=('num_prompts', 'iters_list', 'steps', 'batch_size'))
torch.manual_seed(seed)  # what torch's global generator draws: a noise-started Core's s_0


def row(name, scores, *more):
    cells = [f"{100 * scores[k]:.1f}" if k in scores else '' for k in (*TASKS, 'overall')] + [str(m) for m in more]
    return f"| {name} | " + " | ".join(cells) + " |"


header = "| images | " + " | ".join(TASKS) + " | overall"
scenes = [scene_attributes(1, i, test=True) for i in range(num_prompts)]  # train_flow.py's held-out seed
if validate_only:
    print(header + " |\n" + "|---" * 8 + "|")
    for size in (64, 96, 128):
        print(row(f"real, {size} px", geneval(make_scenes(num_prompts, size, seed=1, test=True)[0], scenes)))
    raise SystemExit
model, run, out_dir = load_generator(out_dir, device)
if run.get('dataset') != 'scenes' or run.get('data_dir'):
    raise SystemExit(f"error: {out_dir} was not trained on the scenes data; train with --dataset=scenes "
                     f"(config/scenes.py)")
real, captions = make_scenes(num_prompts, run['image_size'], seed=1, test=True)
print(header + " | mean r | s / image |\n" + "|---" * 10 + "|")
check = geneval(real, scenes)
print(row('real held-out scenes', check, '', ''))
if min(check.values()) < 0.99:
    raise SystemExit(f"error: the analyser reads a task of the real scenes under 99% right at {run['image_size']} px; "
                     f"it cannot be trusted on samples")
vae = load_vae(run['vae_dir'], device)
print(row('their VAE reconstructions (the ceiling)', geneval(reconstruct(vae, real), scenes), '', ''))
encoder = load_text_encoder(model.config.text_encoder, device)
autocast = mixed_precision(resolve_dtype(dtype, device), device)[0]
noise = torch.randn(num_prompts, model.config.latent_channels, run['image_size'] // 16, run['image_size'] // 16,
                    generator=torch.Generator().manual_seed(seed)).to(device)
settings = [(r, 0.0) for r in iters_list] + ([(max(iters_list), exit_tolerance)] if exit_tolerance else [])
rows_by_iters = []
for iters, tolerance in settings:
    start = time.time()
    used = []
    with torch.no_grad(), autocast:
        images = torch.cat([text_to_image(model, vae, encoder, captions[i:i + batch_size], noise[i:i + batch_size],
                                          steps=steps, cfg_scale=cfg_scale, iters=iters, shift=run.get('shift', 1.0),
                                          exit_tolerance=tolerance, progress=used.append)
                            for i in range(0, num_prompts, batch_size)])
    used = torch.cat(used).mean().item()
    name = f"auto (tolerance {tolerance:g}, at most {iters})" if tolerance else f"r = {iters}"
    print(row(f"{name}, {steps} steps, cfg {cfg_scale}", geneval(images, scenes), f"{used:.1f}",
              f"{(time.time() - start) / num_prompts:.3f}"), flush=True)
    if not tolerance and iters <= 16:
        rows_by_iters.append(images[:8])
if rows_by_iters:
    save_grid(torch.cat(rows_by_iters), os.path.join(out_dir, 'eval_iters.png'))
    with open(os.path.join(out_dir, 'eval_iters.txt'), 'w') as f:
        f.write('\n'.join(captions[:8]) + '\n')
    print(f"grid: {out_dir}/eval_iters.png, one row per r in {[r for r in iters_list if r <= 16]}, the same captions "
          f"({out_dir}/eval_iters.txt) and noise")
latents = encode_images(vae, real, batch_size).to(device)  # as cache.py encodes the training set
with torch.no_grad(), autocast:
    prompt = encoder(captions).to(device)
    print("\n| held-out flow loss | " + " | ".join(f"r = {r}" for r in iters_list) + " |\n"
          + "|---" * (len(iters_list) + 1) + "|")
    print("| mean over t = 1/8, 3/8, 5/8, 7/8 | " + " | ".join(
        f"{np.mean(held_out_loss(model, latents, prompt, r, batch_size, seed)):.4f}" for r in iters_list) + " |")
