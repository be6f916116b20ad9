"""
Train the IRIS generator (model.py) with rectified flow (flow.py): stage 2.

    python train_flow.py config/shapes.py                        # CPU quickstart, after train_vae.py config/shapes.py
    python train_flow.py config/shapes.py --data_dir=my_images   # a local imagefolder of captioned images
    python train_flow.py config/pokemon.py                       # the seed's Pokemon setup (GPU and the Hub)
    python train_flow.py config/shapes.py --init_from=resume     # continue from out_dir
    python train_flow.py config/emoji.py config/emoji_64.py     # real pictures: at 64 px first, then
    python train_flow.py config/emoji.py                        # at 128 px from that run (init_from)
    torchrun --standalone --nproc_per_node=2 train_flow.py config/shapes.py          # 2 processes, one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train_flow.py config/pokemon.py                         # and node_rank=1 on the second machine

The images and captions are encoded once (cache.py); each step then draws a batch of
cached latents and caption tokens, swaps the caption for the empty prompt with
probability cfg_dropout (for classifier-free guidance), draws the core's iteration count
r from train_iters, and regresses the velocity. Writes to out_dir: ckpt.safetensors +
config.json, log.csv (loss, the loss in four bands of t, lr) and samples_<step>.png (the
same held-out prompts and noise every time, so the grids show progress). A control adapter
on a finished run trains with train_control.py.
"""
import os
import time

import torch
from tqdm import tqdm

from cache import load_training_set
from checkpoint import check_init_from, load_checkpoint, lock_out_dir, save_checkpoint, start_from_run
from configurator import configure
from data import save_grid
from flow import WEIGHTINGS, own_random_numbers, shift_time, text_to_image
from model import CHOICES, SIZES, build_generator, count_parameters
from precision import DTYPES, mixed_precision, resolve_dtype
from text import Prompt, load_text_encoder
from training import (LossBands, LossLog, all_sum, caption_batch, draw_iters, ema_update, generator_step, lr_at,
                      make_ema, make_optimizer, micro_batches, setup_distributed, stop_if_diverged, wrap_distributed)
from vae import check_image_size, load_vae

# -----------------------------------------------------------------------------
out_dir = 'out-flow'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.safetensors) or a finished run's folder
vae_dir = 'out-vae'  # a finished train_vae.py run
text_encoder = 'minilm'  # 'minilm' (offline default) or a CLIP name/folder, e.g. 'openai/clip-vit-large-patch14'
cache_dir = 'data/cache'
eval_interval = 500  # sample grid and checkpoint
log_interval = 10
# data
dataset = 'shapes'
data_dir = ''  # a local imagefolder (images + metadata.jsonl); when set it wins over dataset
image_size = 64
num_images = 20000  # shapes only
num_holdout = 256
# model: a size from model.SIZES, with any of these overriding it when non-zero
model_size = 'tiny'
dim = 0
heads = 0
core_layers = 0
patch_size = 2  # image_size must be a multiple of 16 * patch_size
mixer = 'grfm'  # the Core's token mixer (model.IrisConfig, as the next settings)
train_iters = (4, 6, 8, 10, 12)  # r is drawn from these each step
train_iters_mean = 0.0  # > 0: r drawn from Huginn's heavy tail with this mean instead, at most max(train_iters)
iteration_embedding = 'progress'  # what the Core is told of its iteration
state_init = 'prelude'  # the Core's start
text_layers = 0  # a text stage: transformer layers over the text encoder's tokens, trained with the rest
backprop_iters = 0  # backpropagate through the last k core iterations only (0 = all)
loop_distill = 0.0  # > 0: ELT's intra-loop self-distillation with this weight (flow.flow_loss)
# rectified flow
loss_weighting = 'high_noise'  # the seed's t / (1 - t + 0.05), which leans on the noisy end; 'none' is SD3's
shift = 0.0  # SD3's timestep shift (flow.shift_time), in training and sampling; 0: that of the run this one starts
# from (init_from, resume) times sqrt(tokens now / tokens then), 1 from scratch
cfg_dropout = 0.1
# the sample grids
sample_steps = 25
sample_iters = 8
cfg_scale = 4.0
# optimisation
batch_size = 64  # images per optimizer step, over all processes and accumulation steps
gradient_accumulation_steps = 1  # split each process's share into this many forward/backward passes
max_steps = 10000
lr = 3e-4
min_lr = 3e-5
warmup_steps = 200
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
                                       'patch_size', 'train_iters', 'sample_steps', 'sample_iters', 'batch_size',
                                       'gradient_accumulation_steps', 'max_steps', 'lr'),
                   choices=dict(model_size=tuple(SIZES), **{k: CHOICES[k] for k in ('mixer', 'iteration_embedding',
                                                                                   'state_init')},
                                loss_weighting=WEIGHTINGS, dtype=DTYPES),
                   ranges=dict(loop_distill=(0, 10), cooldown=(0, 1)))
check_init_from(init_from)
try:
    check_image_size(image_size, image_size, 16 * patch_size)
except ValueError as e:
    raise SystemExit(f"error: --image_size with --patch_size={patch_size}: {e}") from None
rank, world_size, device = setup_distributed(device)
master = rank == 0  # logs, grids and checkpoints; every process draws the same random numbers
shares = micro_batches(batch_size, rank, world_size, gradient_accumulation_steps)
if master:
    lock_out_dir(out_dir)
torch.manual_seed(seed)
dtype = resolve_dtype(dtype, device)
autocast, scaler = mixed_precision(dtype, device)

encoder = load_text_encoder(text_encoder, device)
vae = load_vae(vae_dir, device)
data_settings = dict(dataset=dataset, data_dir=data_dir, image_size=image_size, num_images=num_images,
                     num_holdout=num_holdout)
data = load_training_set(data_settings, vae, vae_dir, encoder, cache_dir)
latents, caption_rows = data['latents'], data['caption_ids']  # image i's caption is row caption_rows[i] of captions
captions = Prompt(data['tokens'], data['mask'])  # each distinct caption once
if batch_size > len(latents):
    raise SystemExit(f"error: batch_size {batch_size} is larger than the {len(latents)} training images; "
                     f"lower --batch_size")
null_prompt = encoder([""]).to('cpu').padded(captions.text.shape[1])  # the unconditional branch's: [CLS] [SEP]
sample_prompts = data['holdout_captions'][:8]
sample_noise = torch.randn(len(sample_prompts), *latents.shape[1:], generator=torch.Generator().manual_seed(seed))
sample_noise = sample_noise.to(device)

model = build_generator(config, encoder.width)
start_run = start_from_run(init_from, model, 'generator') if init_from not in ('scratch', 'resume') else None
model = model.to(device)
ema = make_ema(model)
if master:
    counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in count_parameters(model).items())
    sizes = {k: config[k] for k in ('dim', 'heads', 'core_layers') if config[k]}  # what overrides model_size's
    print(f"generator {model_size} {sizes or ''}: {counts}; {dtype} on {device}")
optimizer = make_optimizer(model, lr, weight_decay, muon, ends=(model.patch_embed, model.unpatchify))
data_generator = torch.Generator().manual_seed(seed)
ckpt_path = os.path.join(out_dir, 'ckpt.safetensors')
start_step = 0
if init_from == 'resume':
    resumed = load_checkpoint(ckpt_path, model, ema, optimizer, data_generator, scaler)
    start_step, start_run = resumed['step'], resumed['config']
if not shift:  # the square root of the token ratio is the ratio of the token grids' sides
    shift = 1.0 if start_run is None else start_run.get('shift', 1.0) * (image_size / patch_size) / (
        start_run['image_size'] / start_run['patch_size'])
config['shift'] = shift  # as sampled from this run
if compile:
    model.compile_core()
train_model = wrap_distributed(model, world_size)
if master:
    log = LossLog(os.path.join(out_dir, 'log.csv'), ['loss'] + LossBands.names + ['lr'],
                  resume_step=start_step if init_from == 'resume' else None)
    with open(os.path.join(out_dir, 'samples.txt'), 'w') as f:
        f.write('\n'.join(sample_prompts) + '\n')

def sample_and_save(step):
    with autocast, own_random_numbers(seed, device):
        images = text_to_image(ema, vae, encoder, sample_prompts, sample_noise, steps=sample_steps, cfg_scale=cfg_scale,
                               iters=sample_iters, shift=shift)
    save_grid(images, os.path.join(out_dir, f"samples_{step:06d}.png"))
    save_checkpoint(ckpt_path, model, ema, optimizer, step, config | dict(sample_prompts=sample_prompts),
                    data_generator, scaler)


bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc='flow', dynamic_ncols=True,
           disable=not master)
bands = LossBands(device)
start_time = time.time()
for step in bar:
    for group in optimizer.param_groups:
        group['lr'] = lr_at(step, max_steps, warmup_steps, lr, min_lr, cooldown)
    # the whole step's batch, noise and times, the same in every process, which trains on its shares
    index = torch.randint(len(latents), (batch_size,), generator=data_generator)
    prompt = caption_batch(captions, caption_rows[index], null_prompt, cfg_dropout, data_generator)
    iters = draw_iters(train_iters, train_iters_mean, data_generator)
    t = shift_time(torch.sigmoid(torch.randn(batch_size)), shift)  # SD3's logit-normal: most steps at mid noise
    eps = torch.randn(batch_size, *latents.shape[1:])
    per_sample = generator_step(model, optimizer, scaler, autocast, latents[index], prompt, t, eps, iters, shares,
                                world_size=world_size, grad_clip=grad_clip, weighting=loss_weighting,
                                loop_distill=loop_distill, network=train_model)  # on the device, read when logged
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
