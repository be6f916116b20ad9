"""
What an IRIS run learned of real images, measured on the test split it never saw
(config/emoji.py's Twemoji, or any imagefolder whose metadata.jsonl gives each image a
"group"):

    python eval_real.py config/emoji.py                           # the train_flow.py run, 25 steps
    python eval_real.py config/emoji.py --out_dir=out-emoji-cd    # its distilled student, 1, 2 and 4 steps
    python eval_real.py --out_dir=out-emoji-3styles --test_dir=data/emoji/128/test   # per style, one left out

1. The VAE: PSNR and SSIM (Wang et al. 2004) of the test images after the round trip.
2. The generator's held-out rectified-flow loss, SD3's validation loss: the test latents
   and captions at fixed noise, at the middle of each quarter of t, for r = 2, 4, 8, 16.
3. Conditioning, with no pretrained weights: a small CNN learns the training split's
   Unicode groups (smileys, people, animals & nature, ...) here, then reads the real test
   images (its ceiling) and images generated from the same test captions. Also the Fréchet
   distance between real and generated test images in that CNN's features: a "classifier
   Fréchet distance", not FID (no Inception network), comparable only within this eval.
4. Copying: each generated image's nearest training image in those features, against the
   real test images' own nearest training images.
5. Super-resolution (flow.upscale), 2x: each test image's 2x2 means as the input, against
   the real image: PSNR, SSIM and sharpness (the energy of the Haar detail subbands LH, HL,
   HH relative to the real image's: 1 is as sharp as the real one), for bicubic, the VAE
   round trip of bicubic, the VAE round trip of the real image with the input's LL put back
   (IRIS's ceiling), and IRIS from the bicubic latent at each of upscale_strengths.
6. A control run only (train_control.py): each test caption with its own image's
   control map, at control strength 0 (the base generator) and 1: the F1 of the output's
   map against the control (metrics.control_f1), the VAE round trip of the real images as
   the ceiling.
Where the test split's metadata gives each image a "style" (data/emoji/prepare.py does), 1 and 3
are also reported per style; a style the run never trained on is marked as left out: train on
three styles (prepare.py --styles=twemoji,noto,fluent) and point --test_dir at the four styles'
test split to measure how a model carries over to a style it never saw.
It writes eval_real.png in out_dir: rows of test captions' real image, generated image and
the nearest training image to it; eval_upscale.png and eval_control.png for 5 and 6; and every
row of its tables as a dict to eval_real.json.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from cache import encode_images
from checkpoint import load_generator
from configurator import configure
from data import control_map, load_imagefolder, map_image, save_grid, to_float, to_uint8
from flow import held_out_loss, keep_input, text_to_image, upscale
from metrics import accuracy, control_f1, frechet_distance, nearest_distance, read, sharpness, ssim, train_classifier
from precision import mixed_precision, resolve_dtype
from text import load_text_encoder
from vae import load_vae, psnr, reconstruct

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py / distill.py run; '' = the newest generator checkpoint under out*/
test_dir = ''  # '' = the folder 'test' beside the run's data_dir (prepare.py's layout)
steps_list = (25,)  # sampling steps to measure; a distilled student: (1, 2, 4)
iters = 0  # core iterations for sampling (0 = the run's sample_iters)
loss_iters = (2, 4, 8, 16)  # r for the held-out flow loss
cfg_scale = 4.0
sections = 'vae,loss,classifier,upscale,control'  # what to measure (control: for a control run only)
upscale_strengths = (0.3, 0.5)  # img2img strengths for super-resolution
classifier_size = 64  # the CNN reads images at this side
classifier_steps = 3000
batch_size = 64
seed = 0
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
# -----------------------------------------------------------------------------
configure(globals(), positive=('steps_list', 'loss_iters', 'classifier_size', 'classifier_steps', 'batch_size'))
torch.manual_seed(seed)  # what torch's global generator draws: a noise-started Core's s_0


def load_split(folder, image_size):
    """-> images, captions, and each image's group and style from metadata.jsonl (None where it names none)."""
    images, captions = load_imagefolder(folder, image_size)
    with open(os.path.join(folder, 'metadata.jsonl')) as f:
        rows = {row['text']: row for row in map(json.loads, f)}
    return images, captions, [rows.get(c, {}).get('group') for c in captions], [rows.get(c, {}).get('style')
                                                                              for c in captions]


rows = []  # every table row as a dict, written to out_dir/eval_real.json at the end


def record(table, name, **values):
    rows.append(dict(table=table, name=name, **values))
    return rows[-1]


def per_style(table, measure):
    """Rows of `table`, one per style of the test split (where it has several), of
    measure(mask of the style's images) -> its numbers; a style training never saw is marked."""
    names = sorted(set(test_styles) - {None})
    styles = []
    for style in names if len(names) > 1 else ():
        mask = torch.tensor([s == style for s in test_styles])
        styles.append(record(table, style, images=int(mask.sum()), left_out=style not in train_styles, **measure(mask)))
    return styles


def style_cells(row):
    return f"| {row['name']}{' (left out of training)' if row['left_out'] else ''} | {row['images']} |"


def figure_columns():
    """The test images eval_real.png shows: one per group the classifier knows, in name order, the
    styles taken in turn (so the figure shows every style, a left-out one too), each its first there."""
    styles = sorted(set(test_styles), key=str)
    shown = []
    for column, group in enumerate(g for g in test_labels.unique().tolist() if g >= 0):
        in_group = test_labels == group
        in_style = in_group & torch.tensor([s == styles[column % len(styles)] for s in test_styles])
        shown.append((in_style if in_style.any() else in_group).nonzero()[0, 0])
    return torch.stack(shown)


@torch.no_grad()
def generate(model, vae, encoder, captions, noise, steps, sample=text_to_image, **more):
    """sample (text_to_image or upscale) in batches; more: its other arguments, tensors with a row per caption."""
    sampler = run.get('sampler', 'euler')
    with mixed_precision(resolve_dtype(dtype, device), device)[0]:
        return torch.cat([sample(model, vae, encoder, prompts=captions[i:i + batch_size], noise=noise[i:i + batch_size],
                                 steps=steps, cfg_scale=cfg_scale, iters=iters, sampler=sampler,
                                 generator=torch.Generator().manual_seed(seed + 1),
                                 **{k: v[i:i + batch_size] if torch.is_tensor(v) else v for k, v in more.items()})
                          for i in range(0, len(captions), batch_size)])


def eval_upscale(model, vae, encoder, real, recon, captions, noise, steps):
    small = F.avg_pool2d(real.float(), 2).round().to(torch.uint8)  # the 2x2 means: the Haar LL subband / 2
    bicubic = to_uint8(F.interpolate(to_float(small), scale_factor=2, mode='bicubic', align_corners=False))
    ceiling = keep_input(recon, small)  # IRIS's output, were the generator to redraw the real image exactly
    iris = [(f"IRIS, strength {strength:g}, {steps} steps, r = {iters}",
             generate(model, vae, encoder, captions, noise, steps, sample=upscale, small=small, strength=strength))
            for strength in upscale_strengths]
    methods = [('bicubic', bicubic), ('VAE round trip of bicubic', reconstruct(vae, bicubic)),
            ('VAE round trip of the real image, the input put back (the ceiling)', ceiling), *iris]
    print(f"\n| {small.shape[-1]} -> {real.shape[-1]} px, {len(real)} test images | PSNR | SSIM | sharpness | "
          f"2x2 means - input, max |\n|---|---|---|---|---|")
    for name, images in methods:
        row = record('upscale', name, psnr=psnr(images, real), ssim=ssim(images, real),
                     sharpness=sharpness(images, real),
                     input_error=(F.avg_pool2d(images.float(), 2) - small.float()).abs().max().item())
        print(f"| {name} | {row['psnr']:.2f} dB | {row['ssim']:.4f} | {row['sharpness']:.3f} | "
              f"{row['input_error']:.2f} |", flush=True)
    print(f"| real {real.shape[-1]} px images | | 1 | 1 | |")
    shown = slice(0, 6)
    save_grid(torch.cat([small[shown].repeat_interleave(2, -1).repeat_interleave(2, -2), bicubic[shown],
                         iris[0][1][shown], real[shown]]), os.path.join(out_dir, 'eval_upscale.png'), columns=6)
    print(f"rows of {out_dir}/eval_upscale.png: the {small.shape[-1]} px input (pixels doubled), bicubic, IRIS at "
          f"strength {upscale_strengths[0]:g}, the real image")


def eval_control(model, vae, encoder, real, recon, captions, noise, steps):
    kind = model.config.control
    maps = control_map(real, kind)
    print(f"\n| {kind} of the test image, its caption, {steps} steps, r = {iters} | {kind} F1 |\n|---|---|")
    for strength in (0.0, 1.0):
        images = generate(model, vae, encoder, captions, noise, steps, control_map=maps.to(device),
                          control_strength=strength)
        row = record('control', f"control strength {strength:g}{' (the base generator)' if strength == 0 else ''}",
                     f1=control_f1(control_map(images, kind), maps).mean().item())
        print(f"| {row['name']} | {row['f1']:.3f} |", flush=True)
    row = record('control', 'the real images after a VAE round trip (the ceiling)',
                 f1=control_f1(control_map(recon, kind), maps).mean().item())
    print(f"| {row['name']} | {row['f1']:.3f} |", flush=True)
    save_grid(torch.cat([map_image(maps[:6]), images[:6], real[:6]]),
              os.path.join(out_dir, 'eval_control.png'), columns=6)
    print(f"rows of {out_dir}/eval_control.png: the control, IRIS at strength 1, the real test image")


sections = sections.split(',')
unknown = set(sections) - {'vae', 'loss', 'classifier', 'upscale', 'control'}
if unknown:
    raise SystemExit(f"error: unknown section(s) {', '.join(sorted(unknown))}; pick from vae,loss,classifier,upscale,"
                     f"control")
autocast, _ = mixed_precision(resolve_dtype(dtype, device), device)  # a bad --dtype stops here, before any work
model, run, out_dir = load_generator(out_dir, device)
test_dir = test_dir or os.path.join(os.path.dirname(run.get('data_dir', '').rstrip('/')), 'test')
if not os.path.isfile(os.path.join(test_dir, 'metadata.jsonl')):
    raise SystemExit(f"error: no test split at '{test_dir}' for {out_dir}; train on an imagefolder with a sibling "
                     f"'test' folder (python data/emoji/prepare.py) or pass --test_dir")
size = run['image_size']
train_images, _, train_groups, train_styles = load_split(run['data_dir'], size)
test_images, test_captions, test_groups, test_styles = load_split(test_dir, size)
if None in train_groups or None in test_groups:
    raise SystemExit("error: every metadata.jsonl line needs a \"group\" for the classifier")
names = sorted(set(train_groups))
train_labels = torch.tensor([names.index(g) for g in train_groups])
test_labels = torch.tensor([names.index(g) if g in names else -1 for g in test_groups])
vae = load_vae(run['vae_dir'], device)
encoder = load_text_encoder(model.config.text_encoder, device)
iters = iters or run['sample_iters']
noise = torch.randn(len(test_captions), model.config.latent_channels, size // 16, size // 16,
                    generator=torch.Generator().manual_seed(seed)).to(device)
print(f"{out_dir}: {len(train_images)} training and {len(test_images)} test images at {size} px\n")

# the VAE round trip of the test images: the vae section's figure, upscale's ceiling and control's
recon = reconstruct(vae, test_images) if {'vae', 'upscale', 'control'} & set(sections) else None
if 'vae' in sections:
    row = record('vae', 'test split', psnr=psnr(recon, test_images), ssim=ssim(recon, test_images))
    print(f"VAE round trip on the test split: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}\n", flush=True)
    styles = per_style('vae', lambda m: dict(psnr=psnr(recon[m], test_images[m]), ssim=ssim(recon[m], test_images[m])))
    if styles:
        print("| style | test images | PSNR | SSIM |\n|---|---|---|---|\n" + "\n".join(
            f"{style_cells(row)} {row['psnr']:.2f} dB | {row['ssim']:.4f} |" for row in styles) + "\n", flush=True)

if 'loss' in sections:
    latents = encode_images(vae, test_images, batch_size).to(device)  # as cache.py encodes the training set
    with autocast:
        prompt = encoder(test_captions).to(device)
        losses = {r: held_out_loss(model, latents, prompt, r, batch_size, seed) for r in loss_iters}
    print("| held-out flow loss | t = 0.125 | 0.375 | 0.625 | 0.875 | mean |\n|---|---|---|---|---|---|")
    for r, bands in losses.items():
        row = record('held-out flow loss', f"r = {r}", r=r, bands=[float(b) for b in bands], mean=float(np.mean(bands)))
        print(f"| r = {r} | " + " | ".join(f"{b:.4f}" for b in bands) + f" | {row['mean']:.4f} |", flush=True)

if 'classifier' in sections:
    classifier = train_classifier(train_images, train_labels, len(names), classifier_size, classifier_steps,
                                  batch_size, seed)
    _, train_features = read(classifier, train_images)
    predicted, real_features = read(classifier, test_images)
    real_nearest, _ = nearest_distance(real_features, train_features)
    real_accuracy = accuracy(predicted, test_labels)
    predicted_by_steps = {0: predicted}  # 0: the real images
    largest = (test_labels == test_labels.mode().values).float().mean()
    print(f"\ngroup classifier: {len(names)} groups, balanced accuracy = the mean of the per-group recalls (chance "
          f"{100 / len(test_labels.unique()):.1f}%); {100 * largest:.1f}% of the test split is its largest group\n")
    print("| images | balanced accuracy | accuracy | of real balanced accuracy | classifier Fréchet distance | "
          "nearest training image, median distance |\n|---|---|---|---|---|---|")
    record('classifier', 'real test images', balanced_accuracy=real_accuracy[0], accuracy=real_accuracy[1],
           frechet_distance=0.0, nearest_median=real_nearest.median().item())
    print(f"| real test images | {100 * real_accuracy[0]:.1f} | {100 * real_accuracy[1]:.1f} | 100% | 0 | "
          f"{real_nearest.median():.3f} |", flush=True)
    for steps in steps_list:
        generated = generate(model, vae, encoder, test_captions, noise, steps)
        predicted, features = read(classifier, generated)
        predicted_by_steps[steps] = predicted
        nearest, which = nearest_distance(features, train_features)
        acc = accuracy(predicted, test_labels)
        row = record('classifier', f"{steps} {run.get('sampler', 'euler')} steps, r = {iters}", steps=steps,
                     balanced_accuracy=acc[0], accuracy=acc[1],
                     frechet_distance=frechet_distance(real_features, features), nearest_median=nearest.median().item())
        print(f"| {row['name']} | {100 * acc[0]:.1f} | {100 * acc[1]:.1f} | {100 * acc[0] / real_accuracy[0]:.0f}% | "
              f"{row['frechet_distance']:.3f} | {row['nearest_median']:.3f} |", flush=True)
        if steps == steps_list[-1]:
            shown = figure_columns()
            save_grid(torch.cat([test_images[shown], generated[shown], train_images[which[shown]]]),
                      os.path.join(out_dir, 'eval_real.png'), columns=len(shown))
            with open(os.path.join(out_dir, 'eval_real.txt'), 'w') as f:
                f.write('\n'.join(test_captions[i] for i in shown) + '\n')
    print(f"\nrows of {out_dir}/eval_real.png: real test image, generated from its caption "
          f"({out_dir}/eval_real.txt), nearest training image")

    def balanced(mask):  # the real images' balanced accuracy, then each of steps_list's
        real, *made = (accuracy(p[mask], test_labels[mask])[0] for p in predicted_by_steps.values())
        return dict(real=real, generated=made)
    styles = per_style('classifier by style', balanced)
    if styles:
        print("\n| style | test images | real, balanced accuracy | " + " | ".join(
            f"{steps} steps (of real)" for steps in steps_list) + " |\n" + "|---" * (3 + len(steps_list)) + "|")
        for row in styles:
            print(f"{style_cells(row)} {100 * row['real']:.1f} | " + " | ".join(
                f"{100 * a:.1f}" + (f" ({100 * a / row['real']:.0f}%)" if row['real'] else "")
                for a in row['generated']) + " |", flush=True)

if 'upscale' in sections:
    eval_upscale(model, vae, encoder, test_images, recon, test_captions, noise, steps_list[-1])

if 'control' in sections and model.config.control:
    eval_control(model, vae, encoder, test_images, recon, test_captions, noise, steps_list[-1])
with open(os.path.join(out_dir, 'eval_real.json'), 'w') as f:
    json.dump(rows, f, indent=1)
print(f"\nrows: {out_dir}/eval_real.json")
