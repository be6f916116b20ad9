"""
Train a control adapter (model.ControlAdapter) on a finished train_flow.py run: the run's
generator is loaded and frozen, only the adapter learns to draw the caption in the layout
a control map gives (its edges or its silhouette, data.control_map).

    python train_control.py config/shapes_edges.py    # after the quickstart: out-shapes-vae, out-shapes-flow
    python train_control.py config/emoji_edges.py     # after config/emoji.py's VAE and generator
    python train_control.py config/shapes_edges.py --control=silhouette --out_dir=out-shapes-silhouette
    python train_control.py config/shapes_edges.py --init_from=resume

Each step's images bring their own control maps, cached like the latents (cache.py). On
the shapes data, caption_conflict swaps that share of the captions for ones that name
another type, size and position than the image's: the map then has to win over the words.
The VAE, the text encoder and the timestep shift are the base run's, and so are the data,
r and the loss weighting unless set. Writes to out_dir what train_flow.py writes:
ckpt.safetensors + config.json, log.csv and samples_<step>.png, whose top half shows the
control maps the bottom half was drawn from.
"""
import os
import time

import torch
from tqdm import tqdm

from cache import encode_captions, load_control_maps, load_training_set
from checkpoint import generator_from, load_checkpoint, lock_out_dir, read_ema_checkpoint, save_checkpoint
from configurator import configure
from data import CONTROLS, map_image, save_grid
from flow import WEIGHTINGS, own_random_numbers, shift_time, text_to_image
from model import count_parameters
from precision import DTYPES, mixed_precision, resolve_dtype
from procedural import conflicting_shape_captions
from text import Prompt, load_text_encoder
from training import (LossBands, LossLog, all_sum, caption_batch, draw_iters, ema_update, generator_step, lr_at,
                      make_ema, micro_batches, setup_distributed, stop_if_diverged, wrap_distributed)
from vae import load_vae

# -----------------------------------------------------------------------------
out_dir = 'out-control'
init_from = 'scratch'  # 'scratch' (a new adapter) or 'resume' (from out_dir/ckpt.safetensors)
base_dir = ''  # the finished train_flow.py run whose generator the adapter steers
control = 'edges'  # what the adapter reads: 'edges' or 'silhouette' (data.control_map)
caption_conflict = 0.0  # shapes only: the share of captions that name another type, size and position
cache_dir = 'data/cache'
eval_interval = 500  # sample grid and checkpoint
log_interval = 10
# data and rectified flow: what is left at '', 0, () or -1 is the base run's
dataset = ''  # 'shapes', 'scenes' or a Hub data set
data_dir = ''  # a local imagefolder (images + metadata.jsonl); when set it wins over dataset
image_size = 0
num_images = 0  # shapes and scenes only
num_holdout = 0
train_iters = ()  # r is drawn from these each step
train_iters_mean = -1.0  # > 0: r drawn from Huginn's heavy tail with this mean instead, at most max(train_iters)
loss_weighting = ''  # flow.flow_loss
cfg_dropout = 0.1  # ControlNet trains with many empty captions, so the layout is read from the map
# the sample grids
sample_steps = 25
sample_iters = 0  # 0 = the base run's
cfg_scale = 4.0
# optimisation
batch_size = 64  # images per optimizer step, over all processes and accumulation steps
gradient_accumulation_steps = 1
max_steps = 5000
lr = 1e-3
min_lr = 1e-4
warmup_steps = 50
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.999
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
# -----------------------------------------------------------------------------
config = configure(globals(), positive=('eval_interval', 'log_interval', 'sample_steps', 'batch_size',
                                       'gradient_accumulation_steps', 'max_steps', 'lr'),
                   choices=dict(init_from=('scratch', 'resume'), control=CONTROLS,
                                loss_weighting=('', *WEIGHTINGS), dtype=DTYPES),
                   ranges=dict(caption_conflict=(0, 1)))
if not base_dir:
    raise SystemExit("error: train_control.py needs --base_dir, the finished train_flow.py run the adapter steers")
base_state, base_meta = read_ema_checkpoint(base_dir, 'generator', '--base_dir')  # read once
base = base_meta['config']
if not (dataset or data_dir):
    dataset, data_dir = base['dataset'], base['data_dir']
image_size, num_images = image_size or base['image_size'], num_images or base['num_images']
num_holdout, sample_iters = num_holdout or base['num_holdout'], sample_iters or base['sample_iters']
train_iters, loss_weighting = train_iters or tuple(base['train_iters']), loss_weighting or base['loss_weighting']
train_iters_mean = base.get('train_iters_mean', 0.0) if train_iters_mean < 0 else train_iters_mean
if any(type(r) is not int or r < 1 for r in train_iters):
    raise SystemExit(f"error: setting 'train_iters' must hold counts of at least 1, got {train_iters!r}")
config.update(dataset=dataset, data_dir=data_dir, image_size=image_size, num_images=num_images, num_holdout=num_holdout,
              sample_iters=sample_iters, train_iters=train_iters, train_iters_mean=train_iters_mean,
              loss_weighting=loss_weighting)
if caption_conflict and (dataset != 'shapes' or data_dir):
    raise SystemExit("error: caption_conflict needs the shapes data set, whose captions can be rewritten; "
                     "set --caption_conflict=0")
rank, world_size, device = setup_distributed(device)
master = rank == 0  # logs, grids and checkpoints; every process draws the same random numbers
shares = micro_batches(batch_size, rank, world_size, gradient_accumulation_steps)
if master:
    lock_out_dir(out_dir)
torch.manual_seed(seed)
dtype = resolve_dtype(dtype, device)
autocast, scaler = mixed_precision(dtype, device)

encoder = load_text_encoder(base['text_encoder'], device)
vae = load_vae(base['vae_dir'], device)
data_settings = dict(dataset=dataset, data_dir=data_dir, image_size=image_size, num_images=num_images,
                     num_holdout=num_holdout)
data = load_training_set(data_settings, vae, base['vae_dir'], encoder, cache_dir)
latents, caption_rows = data['latents'], data['caption_ids']  # image i's caption is row caption_rows[i] of captions
captions = Prompt(data['tokens'], data['mask'])  # each distinct caption once
if batch_size > len(latents):
    raise SystemExit(f"error: batch_size {batch_size} is larger than the {len(latents)} training images; "
                     f"lower --batch_size")
if caption_conflict:  # a second table: each image's colours with another layout, which its control map overrules
    # the training set is data.load_data's make_shapes(num_images, seed=0)
    tokens, mask, conflict_rows = encode_captions(encoder, conflicting_shape_captions(num_images, seed=0))
    conflict_rows += len(captions.text)
    length = max(captions.text.shape[1], tokens.shape[1])
    captions = Prompt(*map(torch.cat, zip(captions.padded(length), Prompt(tokens, mask).padded(length))))
null_prompt = encoder([""]).to('cpu').padded(captions.text.shape[1])  # the unconditional branch's: [CLS] [SEP]
model = generator_from(base_state, base_meta, base_dir, device, control=control)
model.train().control_adapter.requires_grad_(True)  # the base generator stays frozen
control_maps, sample_maps = load_control_maps(data_settings, control, cache_dir)
sample_prompts = data['holdout_captions'][:8]
sample_maps = sample_maps[:len(sample_prompts)].float().to(device)
sample_noise = torch.randn(len(sample_prompts), *latents.shape[1:], generator=torch.Generator().manual_seed(seed))
sample_noise = sample_noise.to(device)
# the base run's shift, moved by the token ratio when the adapter trains at another size
shift = base.get('shift', 1.0) * (image_size / model.config.patch_size) / (base['image_size'] / base['patch_size'])
config.update(shift=shift, vae_dir=base['vae_dir'], text_encoder=base['text_encoder'],
              patch_size=model.config.patch_size)  # what sample.py reads from a run

ema = make_ema(model)
if master:
    counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in count_parameters(model).items())
    print(f"generator of {base_dir}: {counts}; {dtype} on {device}; training only the {control} adapter")
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                              betas=(0.9, 0.99), fused=True)
data_generator = torch.Generator().manual_seed(seed)
ckpt_path = os.path.join(out_dir, 'ckpt.safetensors')
start_step = 0
if init_from == 'resume':
    start_step = load_checkpoint(ckpt_path, model, ema, optimizer, data_generator, scaler)['step']
train_model = wrap_distributed(model, world_size)
if master:
    log = LossLog(os.path.join(out_dir, 'log.csv'), ['loss'] + LossBands.names + ['lr'],
                  resume_step=start_step if init_from == 'resume' else None)
    with open(os.path.join(out_dir, 'samples.txt'), 'w') as f:
        f.write('\n'.join(sample_prompts) + '\n')


def sample_and_save(step):
    with autocast, own_random_numbers(seed, device):
        images = text_to_image(ema, vae, encoder, sample_prompts, sample_noise, steps=sample_steps, cfg_scale=cfg_scale,
                               iters=sample_iters, shift=shift, control_map=sample_maps)
    save_grid(torch.cat([map_image(sample_maps), images]), os.path.join(out_dir, f"samples_{step:06d}.png"))
    save_checkpoint(ckpt_path, model, ema, optimizer, step, config | dict(sample_prompts=sample_prompts),
                    data_generator, scaler)


bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc='control', dynamic_ncols=True,
           disable=not master)
bands = LossBands(device)
start_time = time.time()
for step in bar:
    for group in optimizer.param_groups:
        group['lr'] = lr_at(step, max_steps, warmup_steps, lr, min_lr)
    # the whole step's batch, noise and times, the same in every process, which trains on its shares
    index = torch.randint(len(latents), (batch_size,), generator=data_generator)
    rows = caption_rows[index]
    if caption_conflict:
        rows = torch.where(torch.rand(batch_size, generator=data_generator) < caption_conflict,
                           conflict_rows[index], rows)
    prompt = caption_batch(captions, rows, null_prompt, cfg_dropout, data_generator)
    iters = draw_iters(train_iters, train_iters_mean, data_generator)
    t = shift_time(torch.sigmoid(torch.randn(batch_size)), shift)  # SD3's logit-normal: most steps at mid noise
    eps = torch.randn(batch_size, *latents.shape[1:])
    per_sample = generator_step(model, optimizer, scaler, autocast, latents[index], prompt, t, eps, iters, shares,
                                control_maps[index].float(), world_size, grad_clip, loss_weighting,
                                network=train_model)
    bands.add(t[torch.cat(shares)], per_sample)
    ema_update(ema, model, step, ema_decay)
    save = (step + 1) % eval_interval == 0 or step + 1 == max_steps
    if save or step % log_interval == 0:
        loss = all_sum(per_sample.sum()) / batch_size
        stop_if_diverged(loss, step)  # before a save: a checkpoint never holds a diverged model
        means = bands.read()
        if master:
            log.write(step, loss=loss.item(), lr=optimizer.param_groups[0]['lr'], **means)
        bar.set_postfix(loss=f"{loss.item():.4f}", r=iters)
    if master and save:
        sample_and_save(step + 1)

if master:
    print(f"{(time.time() - start_time) / 60:.1f} min; checkpoint {ckpt_path}; "
          f"samples {out_dir}/samples_{max_steps:06d}.png")
if world_size > 1:
    torch.distributed.destroy_process_group()
