"""
Prompt adherence on the procedural shapes: generate one image per held-out caption and
read back what was drawn with a deterministic analyser (no learned model to trust).

    python eval_shapes.py                                    # newest generator run, r and steps sweeps
    python eval_shapes.py --out_dir=out-shapes-flow --iters_list="(4,)" --steps_list="(25,)"
    python eval_shapes.py --validate_only=True               # the analyser on real images only
    python eval_shapes.py --out_dir=out-shapes-cd --steps_list="(1,2,4)" --iters_list="(4,8)"   # a distilled student
    python eval_shapes.py config/shapes_edges.py              # a control adapter: follows the control or the caption?

The analyser (metrics.py) reads background and shape colour, shape type, position and size
back from the pixels. Before it scores any sample it is scored on real data-set images, and
the eval stops if it reads fewer than 98% of those right. Every row is also written to
out_dir/eval_shapes.json, one dict per row.
"""
import json
import os
import time

import numpy as np
import torch

from cache import encode_images
from checkpoint import load_generator
from configurator import configure
from data import control_map, map_image, save_grid
from flow import held_out_loss, text_to_image
from metrics import ATTRIBUTES, adherence, analyse, control_f1
from precision import mixed_precision, resolve_dtype
from procedural import COLOURS, POSITIONS, RADII, SHAPES, make_shapes, shape_attributes, shape_caption
from text import load_text_encoder
from vae import latent_keep_mask, load_vae, reconstruct

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py / distill.py run; '' = the newest generator checkpoint under out*/
num_prompts = 256  # held-out captions (seed 1, as train_flow.py's held-out set)
iters_list = (2, 4, 8, 16)  # core iterations r to compare, each with steps_list[-1] Euler steps
loss_iters = (1, 2, 4, 8, 16, 32)  # r for the held-out flow loss
exit_tolerance = 0.0  # > 0: also adaptive iterations (model.iterate_core), at most max(loss_iters)
steps_list = (4, 10, 25)  # Euler steps to compare, each at the run's sample_iters
cfg_scale = 4.0
shift = 0.0  # > 1 spends more Euler steps at high noise, where the layout is decided; 0 = the run's own (train_flow.py)
seed = 0
validate_only = False
inpaint = True  # also measure inpainting: repaint each held-out shape as another colour and type
batch_size = 128
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
# -----------------------------------------------------------------------------
configure(globals(), positive=('num_prompts', 'iters_list', 'loss_iters', 'steps_list', 'batch_size'))
torch.manual_seed(seed)  # what torch's global generator draws: a noise-started Core's s_0


rows = []  # every table row as a dict, written to out_dir/eval_shapes.json at the end


def record(table, name, values, line):
    """Keep one row of `table` and print it: line, or the adherence cells of `values`."""
    rows.append(dict(table=table, name=name, **values))
    print(line)


def adherence_row(name, scores, seconds=None):
    cells = [f"{100 * scores[k]:.1f}" for k in (*ATTRIBUTES, 'all 4', 'all 5')]
    more = {} if seconds is None else {'s / image': seconds}
    record('adherence', name, scores | more,
           f"| {name} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.3f}'} |")


@torch.no_grad()
def generate(model, vae, encoder, captions, noise, steps, iters, sampler, control_strength=1.0, **per_caption):
    """per_caption: text_to_image's init, keep or control_map, one row per caption."""
    generator = torch.Generator().manual_seed(seed + 1)
    batches = range(0, len(captions), batch_size)
    with mixed_precision(resolve_dtype(dtype, device), device)[0]:
        return torch.cat([text_to_image(model, vae, encoder, captions[i:i + batch_size], noise[i:i + batch_size],
                                        steps=steps, cfg_scale=cfg_scale, iters=iters, shift=shift, sampler=sampler,
                                        generator=generator, control_strength=control_strength,
                                        **{k: v[i:i + batch_size] for k, v in per_caption.items()}) for i in batches])


def inpainting_task(a, index, image_size):
    """Shape `index` (attributes a) repainted as another colour and type, same place and size:
    (the new attributes, the pixel mask (1, S, S) of a square that covers the old shape)."""
    colours = [c for c in COLOURS if c not in (a['colour'], a['background'])]
    new = dict(a, colour=colours[index % len(colours)], shape=SHAPES[(SHAPES.index(a['shape']) + 1) % len(SHAPES)])
    (fx, fy), _ = POSITIONS[a['position']]
    cx, cy = (fx + a['jitter'][0]) * image_size, (fy + a['jitter'][1]) * image_size
    half = 1.2 * RADII[a['size']] * a['jitter'][2] * image_size
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    hole = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    return new, torch.from_numpy(hole)[None]


def eval_inpainting(model, run, vae, encoder, attributes, real, steps, iters, sampler):
    S = run['image_size']
    tasks = [inpainting_task(a, i, S) for i, a in enumerate(attributes)]
    new_attributes, holes = [t[0] for t in tasks], torch.stack([t[1] for t in tasks])
    init = encode_images(vae, real, batch_size).to(device)
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    images = generate(model, vae, encoder, [shape_caption(a) for a in new_attributes], noise, steps, iters, sampler,
                      init=init, keep=latent_keep_mask(holes).to(device))
    outside = ~holes.expand(-1, 3, -1, -1)
    mse = [(images[i].float() - real[i].float())[outside[i]].square().mean() for i in range(len(real))]
    kept_psnr = float(np.mean([10 * np.log10(255.0 ** 2 / max(m.item(), 1e-10)) for m in mse]))
    save_grid(torch.cat([real[:8], (real[:8] * ~holes[:8]).to(torch.uint8), images[:8]]),
              os.path.join(out_dir, 'eval_inpainting.png'))
    return adherence(images, new_attributes), kept_psnr


def control_partners(attributes):
    """For each held-out caption, the next held-out image whose shape type and position both
    differ from the caption's: whichever the generator follows then shows."""
    n = len(attributes)
    partners = [next((j % n for j in range(i + 1, i + n) if attributes[j % n]['shape'] != a['shape']
                      and attributes[j % n]['position'] != a['position']), None) for i, a in enumerate(attributes)]
    if None in partners:
        raise SystemExit(f"error: {n} held-out images are too few to give every caption a control of another shape "
                         f"and place; raise --num_prompts")
    return partners


def eval_control(model, vae, encoder, attributes, captions, real, noise, steps, iters, sampler):
    """A control run's adapter on held-out pairs: the caption of one image, the control map
    of another. Prints, at control strength 0 (the base generator, bit for bit) and 1, how
    often the analyser reads the control image's type and position, the caption's colours
    and the caption's type and position, and the F1 of the output's own map against the
    control (control_f1), with the VAE round trip of the control images as the ceiling."""
    kind = model.config.control
    partners = control_partners(attributes)
    sources = real[partners]
    maps = control_map(sources, kind)
    ceiling = control_f1(control_map(reconstruct(vae, sources), kind), maps).mean()
    print(f"\n| {kind} of another held-out image, {steps} steps, r = {iters} | control's type | control's position "
          f"| control's type and position | caption's colours | caption's type and position | {kind} F1 |\n"
          + "|---" * 7 + "|")
    for strength in (0.0, 1.0):
        images = generate(model, vae, encoder, captions, noise, steps, iters, sampler, control_strength=strength,
                          control_map=maps.to(device))
        found = [analyse(image) for image in images]
        layout = lambda f, a: f['shape'] == a['shape'] and f['position'] == a['position']  # noqa: E731
        follows = np.mean([layout(f, attributes[j]) for f, j in zip(found, partners)])
        follows_each = [np.mean([f[k] == attributes[j][k] for f, j in zip(found, partners)])
                        for k in ('shape', 'position')]
        colours = np.mean([f['background'] == a['background'] and f['colour'] == a['colour']
                           for f, a in zip(found, attributes)])
        captions_layout = np.mean([layout(f, a) for f, a in zip(found, attributes)])
        f1 = control_f1(control_map(images, kind), maps).mean()
        cells = "".join(f"{100 * x:.1f} | " for x in (*follows_each, follows, colours, captions_layout))
        values = dict(zip(("control's type", "control's position", "control's type and position", "caption's colours",
                           "caption's type and position"), map(float, (*follows_each, follows, colours,
                                                                        captions_layout))), f1=float(f1))
        record('control', f"strength {strength:g}", values,
               f"| strength {strength:g}{' (the base generator)' if strength == 0 else ''} | {cells}{f1:.3f} |")
    record('control', 'VAE round trip', dict(f1=float(ceiling)),
           f"| the control images after a VAE round trip (the F1 ceiling) | | | | | | {ceiling:.3f} |")
    save_grid(torch.cat([sources[:8], map_image(maps[:8]), images[:8]]),
              os.path.join(out_dir, 'eval_control.png'))
    print(f"grid: {out_dir}/eval_control.png, rows: the control's source image, its {kind}, the result for the caption "
          f"of another image ({out_dir}/eval_control.txt)")
    with open(os.path.join(out_dir, 'eval_control.txt'), 'w') as f:
        f.write('\n'.join(captions[:8]) + '\n')


print("| images | " + " | ".join(ATTRIBUTES) + " | all 4 | all 5 | s / image |\n" + "|---" * 9 + "|")
if validate_only:
    for size in (64, 128):
        real = make_shapes(1024, size, seed=2)[0]
        adherence_row(f"real, {size} px", adherence(real, [shape_attributes(2, i) for i in range(1024)]))
    raise SystemExit
model, run, out_dir = load_generator(out_dir, device)
shift = shift or run.get('shift', 1.0)
if run.get('dataset') != 'shapes' or run.get('data_dir'):
    raise SystemExit(f"error: {out_dir} was not trained on the shapes data; eval_shapes.py can only read shapes back")
attributes = [shape_attributes(1, i) for i in range(num_prompts)]  # train_flow.py's held-out seed
captions = [shape_caption(a) for a in attributes]
real = make_shapes(num_prompts, run['image_size'], seed=1)[0]
check = adherence(real, attributes)
adherence_row('real held-out images', check)
if check['all 5'] < 0.98:
    raise SystemExit(f"error: the analyser reads only {100 * check['all 5']:.1f}% of real images right; "
                     f"it cannot be trusted on samples at {run['image_size']} px")
vae = load_vae(run['vae_dir'], device)
adherence_row('their VAE reconstructions', adherence(reconstruct(vae, real), attributes))
encoder = load_text_encoder(model.config.text_encoder, device)
latents = encode_images(vae, real, batch_size).to(device)  # as cache.py encodes the training set
with mixed_precision(resolve_dtype(dtype, device), device)[0]:
    prompt = encoder(captions).to(device)
    print("\n| held-out flow loss | t = 0.125 | 0.375 | 0.625 | 0.875 | mean | mean r |\n" + "|---" * 7 + "|")
    adaptive = [(max(loss_iters), exit_tolerance)] if exit_tolerance else []
    for r, tolerance in [(r, 0.0) for r in loss_iters] + adaptive:
        used = []
        bands = held_out_loss(model, latents, prompt, r, batch_size, seed, tolerance, used.append)
        used = torch.cat(used).mean().item()
        name = f"auto (tolerance {tolerance:g}, at most {r})" if tolerance else f"r = {r}"
        values = dict(zip(('t = 0.125', 't = 0.375', 't = 0.625', 't = 0.875'), map(float, bands)))
        record('held-out flow loss', name, values | {'mean': float(np.mean(bands)), 'mean r': used},
               f"| {name} | " + " | ".join(f"{b:.4f}" for b in bands) + f" | {np.mean(bands):.4f} | {used:.1f} |")
print()
noise = torch.randn(num_prompts, model.config.latent_channels, run['image_size'] // 16, run['image_size'] // 16,
                    generator=torch.Generator().manual_seed(seed)).to(device)
sampler = run.get('sampler', 'euler')
settings = [(steps_list[-1], r) for r in iters_list] + [(s, run['sample_iters']) for s in steps_list[:-1]]
by_iters = []  # the first 8 captions at each r of iters_list: one row each
for steps, iters in settings:
    start = time.time()
    images = generate(model, vae, encoder, captions, noise, steps, iters, sampler)
    name = f"{steps} {sampler} steps, r = {iters}"
    name += '' if sampler == 'consistency' else f", cfg {cfg_scale}, shift {shift}"
    adherence_row(name, adherence(images, attributes), (time.time() - start) / num_prompts)
    if (steps, iters) == settings[0]:
        save_grid(images[:32], os.path.join(out_dir, 'eval_samples.png'))
    if len(by_iters) < len(iters_list):  # settings start with the r sweep
        by_iters.append(images[:8])
save_grid(torch.cat(by_iters), os.path.join(out_dir, 'eval_iters.png'), columns=min(8, num_prompts))
print(f"grid: {out_dir}/eval_iters.png, one row per r in {iters_list}, the same captions and noise")
if model.config.control:
    eval_control(model, vae, encoder, attributes, captions, real, noise, steps_list[-1], run['sample_iters'], sampler)
if inpaint:
    steps, iters = steps_list[-1], run['sample_iters']
    scores, kept_psnr = eval_inpainting(model, run, vae, encoder, attributes, real, steps, iters, sampler)
    adherence_row(f"inpainting a new colour and type, {steps} steps, r = {iters}", scores)
    record('inpainting', 'PSNR outside the hole', dict(psnr=kept_psnr),
           f"\ninpainting: PSNR of the region outside the hole against the original: {kept_psnr:.2f} dB "
           f"(grid: {out_dir}/eval_inpainting.png, rows: original, hole, result)")
with open(os.path.join(out_dir, 'eval_shapes.json'), 'w') as f:
    json.dump(rows, f, indent=1)
print(f"rows: {out_dir}/eval_shapes.json")
