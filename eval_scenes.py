"""
GenEval on procedural scenes: draw one image per caption and score it by GenEval's rules for
its task (metrics.geneval), at each Core iteration count r, with adaptive iterations, and
over the guidance scale and the sampling steps. Two sets of captions:

  held-out  combinations training never saw (seed 1, as train_flow.py's held-out set): does
            the model generalise what it learned?
  seen      combinations of the training rule in new layouts (seed 2): did it learn to read
            the caption's structure at all?

    python eval_scenes.py --out_dir=out-scenes-flow                       # r = 1 ... 32, both sets
    python eval_scenes.py --out_dir=out-scenes-flow --exit_tolerance=0.1   # and adaptive, at most 32
    python eval_scenes.py --out_dir=out-scenes-flow --iters_list="(4,)" --cfg_list="(1.5, 3, 6, 9)" \
        --steps_list="(10, 50)"                        # the guidance and the steps, at the run's r
    python eval_scenes.py --validate_only=True                            # the analyser on real scenes

The analyser is scored first on the real scenes and their VAE reconstructions (the ceiling a
generator can reach through this VAE); it stops the eval if it reads fewer than 99% of the
real ones right. A second table splits each row's position and colour-attribution captions by
what went wrong (metrics.structure): a named type not drawn, or both drawn with the relation
(the colours) reversed, as a model that reads the caption as a bag of words draws it half the
time. Every row is also written to out_dir/eval_scenes.json, one dict per row.
"""
import json
import os
import time

import numpy as np
import torch

from cache import encode_images
from checkpoint import load_generator
from configurator import configure
from data import save_grid
from flow import held_out_loss, text_to_image
from metrics import STRUCTURE, geneval, read_scene, structure_shares
from precision import mixed_precision, resolve_dtype
from procedural import TASKS, make_scenes, scene_attributes
from text import load_text_encoder
from vae import load_vae, reconstruct

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py run on dataset='scenes'; '' = the newest generator checkpoint under out*/
num_prompts = 384  # captions per set, 64 of each task
splits = ('held-out', 'seen')  # which sets of captions to score (above)
iters_list = (1, 2, 4, 8, 16, 32)  # core iterations r to compare
exit_tolerance = 0.0  # > 0: also adaptive iterations (model.iterate_core), at most max(iters_list)
steps = 25  # Euler steps
cfg_scale = 4.0
cfg_list = ()  # guidance scales to sweep, each at the run's sample_iters and `steps`
steps_list = ()  # Euler step counts to sweep, each at the run's sample_iters and cfg_scale
seed = 0
validate_only = False
batch_size = 128
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
# -----------------------------------------------------------------------------
configure(globals(), positive=('num_prompts', 'iters_list', 'steps', 'batch_size'))
if not splits or not set(splits) <= {'held-out', 'seen'}:
    raise SystemExit(f"error: splits must name 'held-out' and/or 'seen', got {splits!r}")
# empty by default, so configure() knows no type for their items
if any(type(c) not in (int, float) or c <= 0 for c in cfg_list) or any(type(s) is not int or s < 1 for s in steps_list):
    raise SystemExit(f"error: cfg_list must hold numbers above 0 and steps_list counts of at least 1, got "
                     f"{cfg_list!r} and {steps_list!r}"[:300])
torch.manual_seed(seed)  # what torch's global generator draws: a noise-started Core's s_0
SEEDS = {'held-out': (1, True), 'seen': (2, False)}  # (data seed, test combinations)


def print_row(row):
    cells = [f"{100 * row[k]:.1f}" if k in row else '' for k in (*TASKS, 'overall')]
    more = [f"{row['mean r']:.1f}" if 'mean r' in row else '', f"{row['s / image']:.3f}" if 's / image' in row else '']
    print(f"| {row['split']} | {row['images']} | " + " | ".join(cells + more) + " |", flush=True)


rows = []


def record(split, images, scores, **more):
    rows.append(dict(split=split, images=images, **scores, **more))
    print_row(rows[-1])


def score(images, scenes):
    """geneval's scores, and under 'structure' why position and colour attribution fail."""
    found = [read_scene(image) for image in images]
    return dict(geneval(found, scenes), structure=structure_shares(found, scenes))


def print_structure(split):
    """The structure of each row of `split`: its position and colour-attribution captions whose
    two named types are missing, or drawn with the relation (colours) right, reversed, neither."""
    tasks = ('position', 'colour attribution')
    print("\n| captions | images | " + " | ".join(f"{task}: {o}" for task in tasks for o in STRUCTURE) + " |\n"
          + "|---" * (2 + 2 * len(STRUCTURE)) + "|")
    for row in rows:
        if row['split'] == split and 'structure' in row:
            print(f"| {split} | {row['images']} | " + " | ".join(
                f"{100 * row['structure'][task][o]:.1f}" if task in row['structure'] else '' for task in tasks
                for o in STRUCTURE) + " |")


print("| captions | images | " + " | ".join(TASKS) + " | overall | mean r | s / image |\n" + "|---" * 11 + "|")
if validate_only:
    for split in splits:
        scenes = [scene_attributes(SEEDS[split][0], i, SEEDS[split][1]) for i in range(num_prompts)]
        for size in (64, 96, 128):
            record(split, f"real, {size} px", score(make_scenes(num_prompts, size, *SEEDS[split])[0], scenes))
    raise SystemExit
model, run, out_dir = load_generator(out_dir, device)
if run.get('dataset') != 'scenes' or run.get('data_dir'):
    raise SystemExit(f"error: {out_dir} was not trained on the scenes data; train with --dataset=scenes "
                     f"(config/scenes.py)")
vae = load_vae(run['vae_dir'], device)
encoder = load_text_encoder(model.config.text_encoder, device)
autocast = mixed_precision(resolve_dtype(dtype, device), device)[0]
size = run['image_size']
noise = torch.randn(num_prompts, model.config.latent_channels, size // 16, size // 16,
                    generator=torch.Generator().manual_seed(seed)).to(device)
# (r, adaptive tolerance, cfg, steps) of each row: the r sweep, then cfg and steps at the run's r
settings = [(r, 0.0, cfg_scale, steps) for r in iters_list]
settings += [(max(iters_list), exit_tolerance, cfg_scale, steps)] if exit_tolerance else []
settings += [(run['sample_iters'], 0.0, cfg, steps) for cfg in cfg_list]
settings += [(run['sample_iters'], 0.0, cfg_scale, s) for s in steps_list]
for split in splits:
    scenes = [scene_attributes(SEEDS[split][0], i, SEEDS[split][1]) for i in range(num_prompts)]
    real, captions = make_scenes(num_prompts, size, *SEEDS[split])
    record(split, 'real scenes', score(real, scenes))
    if min(rows[-1][task] for task in TASKS) < 0.99:
        raise SystemExit(f"error: the analyser reads a task of the real {split} scenes under 99% right at {size} px; "
                         f"it cannot be trusted on samples")
    record(split, 'their VAE reconstructions (the ceiling)', score(reconstruct(vae, real), scenes))
    grid_rows = []
    for iters, tolerance, cfg, step_count in settings:
        start, used = time.time(), []
        with torch.no_grad(), autocast:
            images = torch.cat([text_to_image(model, vae, encoder, captions[i:i + batch_size],
                                              noise[i:i + batch_size], steps=step_count, cfg_scale=cfg, iters=iters,
                                              shift=run.get('shift', 1.0), exit_tolerance=tolerance,
                                              record_iters=used.append)
                                for i in range(0, num_prompts, batch_size)])
        name = f"auto (tolerance {tolerance:g}, at most {iters})" if tolerance else f"r = {iters}"
        record(split, f"{name}, {step_count} steps, cfg {cfg:g}", score(images, scenes), r=iters,
               tolerance=tolerance, cfg=cfg, steps=step_count, **{'mean r': torch.cat(used).mean().item(),
                                                                 's / image': (time.time() - start) / num_prompts})
        if not tolerance and (cfg, step_count) == (cfg_scale, steps) and iters <= 16:
            grid_rows.append(images[:8])
    print_structure(split)
    if grid_rows:
        save_grid(torch.cat(grid_rows), os.path.join(out_dir, f'eval_iters_{split}.png'))
        with open(os.path.join(out_dir, f'eval_iters_{split}.txt'), 'w') as f:
            f.write('\n'.join(captions[:8]) + '\n')
        print(f"grid: {out_dir}/eval_iters_{split}.png, one row per r in {[r for r in iters_list if r <= 16]}, the "
              f"same captions ({out_dir}/eval_iters_{split}.txt) and noise")
    if split == 'held-out':
        latents = encode_images(vae, real, batch_size).to(device)  # as cache.py encodes the training set
        with torch.no_grad(), autocast:
            prompt = encoder(captions).to(device)
            losses = {r: float(np.mean(held_out_loss(model, latents, prompt, r, batch_size, seed))) for r in iters_list}
        rows.append(dict(split=split, images='held-out flow loss, mean over t = 1/8, 3/8, 5/8, 7/8',
                         **{f"r = {r}": loss for r, loss in losses.items()}))
        print("\n| held-out flow loss | " + " | ".join(f"r = {r}" for r in iters_list) + " |\n"
              + "|---" * (len(iters_list) + 1) + "|\n| mean over t = 1/8, 3/8, 5/8, 7/8 | "
              + " | ".join(f"{loss:.4f}" for loss in losses.values()) + " |\n", flush=True)
with open(os.path.join(out_dir, 'eval_scenes.json'), 'w') as f:
    json.dump(rows, f, indent=1)
print(f"rows: {out_dir}/eval_scenes.json")
