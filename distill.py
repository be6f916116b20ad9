"""
Consistency distillation (Song et al. 2023, arXiv 2303.01469): a train_flow.py teacher
becomes a student that samples in 1-4 steps. Stage 3.

    python distill.py config/shapes.py                           # after train_flow.py config/shapes.py
    python distill.py config/shapes.py --init_from=resume
    python sample.py --out_dir=out-shapes-cd --steps 2           # sample the student
    torchrun --standalone --nproc_per_node=2 distill.py config/shapes.py

The student starts as the teacher's EMA weights and keeps its recurrent core (r = iters);
the target network is an EMA of the student. Each step draws x_0 and a caption, a time
pair t_n < t_(n+1) of an N-step grid and x_(t_(n+1)); the teacher takes one guided Euler
step to x_(t_n), and the student learns to agree with the target across it:

    loss = pseudo-Huber( f_student(x_(t_(n+1)), t_(n+1)),  f_target(x_(t_n), t_n) ),
    f(x_t, t) = x_t - t v(x_t, t),  so f(x, 0) = x: the boundary condition holds exactly.

The teacher's guidance (teacher_cfg) is baked into the student, which then needs one
forward per step. Writes to out_dir: ckpt.safetensors (the target network is the EMA
slot that sample.py loads), config.json, log.csv and samples_<step>.png (1, 2 and 4 steps).
"""
import copy
import os
import time

import torch
from tqdm import tqdm

from cache import load_training_set
from checkpoint import load_checkpoint, load_generator, lock_out_dir, save_checkpoint
from configurator import configure
from data import save_grid
from flow import consistency_loss, own_random_numbers, text_to_image, time_grid
from precision import DTYPES, mixed_precision, resolve_dtype
from text import Prompt, load_text_encoder
from training import (LossLog, all_sum, backward, ema_update, lr_at, make_ema, micro_batches, optimizer_step,
                      setup_distributed, stop_if_diverged, sync_gradients, wrap_distributed)
from vae import load_vae

# -----------------------------------------------------------------------------
out_dir = 'out-cd'
teacher_dir = 'out-flow'  # a finished train_flow.py run
init_from = 'scratch'  # 'scratch' (from the teacher) or 'resume' (from out_dir)
cache_dir = 'data/cache'
eval_interval = 250  # sample grids and checkpoint
log_interval = 10
schedule_steps = 16  # N: the teacher's Euler grid, one step of it per training example
teacher_cfg = 4.0  # guidance scale baked into the student
teacher_iters = 0  # core iterations of the teacher (0 = its run's sample_iters)
iters = 0  # core iterations of the student, in training and sampling (0 = teacher_iters)
target_decay = 0.95  # EMA of the student that gives the targets (CM's mu)
batch_size = 64  # examples per optimizer step, over all processes and accumulation steps
gradient_accumulation_steps = 1
max_steps = 2000
lr = 1e-4
min_lr = 1e-5
warmup_steps = 100
grad_clip = 1.0
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: 'float32', 'bfloat16', 'float16' or 'auto' (precision.resolve_dtype)
# -----------------------------------------------------------------------------
config = configure(globals(), positive=('eval_interval', 'log_interval', 'schedule_steps', 'batch_size',
                                       'gradient_accumulation_steps', 'max_steps', 'lr'),
                   choices=dict(init_from=('scratch', 'resume'), dtype=DTYPES))
rank, world_size, device = setup_distributed(device)
master = rank == 0  # logs, grids and checkpoints
shares = micro_batches(batch_size, rank, world_size, gradient_accumulation_steps)
if master:
    lock_out_dir(out_dir)
torch.manual_seed(seed)
dtype = resolve_dtype(dtype, device)
autocast, scaler = mixed_precision(dtype, device)

teacher, run, teacher_dir = load_generator(teacher_dir, device)
if run.get('sampler') == 'consistency':
    raise SystemExit(f"error: {teacher_dir} is already a distilled student; point --teacher_dir at a train_flow.py run")
if teacher.config.control:  # the student learns from uncontrolled teacher steps, which would leave the adapter behind
    raise SystemExit(f"error: {teacher_dir} is a {teacher.config.control} control run, which distill.py cannot carry "
                     f"over; point --teacher_dir at its base run ({run['base_dir']})")
teacher_iters = teacher_iters or run['sample_iters']
iters = iters or teacher_iters
encoder = load_text_encoder(teacher.config.text_encoder, device)
vae = load_vae(run['vae_dir'], device)
data_settings = {k: run[k] for k in ('dataset', 'data_dir', 'image_size', 'num_images', 'num_holdout')}
data = load_training_set(data_settings, vae, run['vae_dir'], encoder, cache_dir)
latents, caption_rows = data['latents'], data['caption_ids']  # image i's caption is row caption_rows[i] of captions
captions = Prompt(data['tokens'], data['mask'])  # each distinct caption once
null_prompt = encoder([""]).to(device)
grid = time_grid(schedule_steps).flip(0).to(device)  # 0 = t_0 < t_1 < ... < t_N = 1

student = copy.deepcopy(teacher).train().requires_grad_(True)  # starts as the teacher's EMA weights
target = make_ema(student)
optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)
data_generator = torch.Generator().manual_seed(seed)
ckpt_path = os.path.join(out_dir, 'ckpt.safetensors')
start_step = 0
if init_from == 'resume':
    start_step = load_checkpoint(ckpt_path, student, target, optimizer, data_generator, scaler)['step']
train_model = wrap_distributed(student, world_size)
if master:
    log = LossLog(os.path.join(out_dir, 'log.csv'), ['loss', 'lr'],
                  resume_step=start_step if init_from == 'resume' else None)
huber_c = 0.00054 * latents[0].numel() ** 0.5  # iCT's choice of the pseudo-Huber constant (arXiv 2310.14189)
# what sample.py and eval_shapes.py need to find the VAE, the prompts and the sampler
saved_config = run | config | dict(sampler='consistency', sample_iters=iters, teacher_dir=teacher_dir)
sample_noise = torch.randn(len(run['sample_prompts']), *latents.shape[1:],
                           generator=torch.Generator().manual_seed(seed)).to(device)


def sample_and_save(step):
    with autocast, own_random_numbers(seed, device):
        rows = [text_to_image(target, vae, encoder, run['sample_prompts'], sample_noise, steps=steps, iters=iters,
                              sampler='consistency', generator=torch.Generator().manual_seed(seed))
                for steps in (1, 2, 4)]
    save_grid(torch.cat(rows), os.path.join(out_dir, f"samples_{step:06d}.png"), columns=len(run['sample_prompts']))
    save_checkpoint(ckpt_path, student, target, optimizer, step, saved_config, data_generator, scaler)


bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc='distill', dynamic_ncols=True,
           disable=not master)
start_time = time.time()
for step in bar:
    for group in optimizer.param_groups:
        group['lr'] = lr_at(step, max_steps, warmup_steps, lr, min_lr)
    index = torch.randint(len(latents), (batch_size,), generator=data_generator)
    n = torch.randint(schedule_steps, (batch_size,), generator=data_generator).to(device)
    loss_sum = torch.zeros((), device=device)  # read only when logged: a read waits for the GPU
    for micro, share in enumerate(shares):
        rows = caption_rows[index[share]]
        with sync_gradients(train_model, last=micro == len(shares) - 1):
            with autocast:  # the forward only: backward runs each op in the dtype its forward chose
                loss = consistency_loss(train_model, target, teacher, x0=latents[index[share]].to(device),
                                        prompt=Prompt(captions.text[rows].float(), captions.mask[rows]).to(device),
                                        null_prompt=null_prompt, t_low=grid[n[share]], t_high=grid[n[share] + 1],
                                        cfg_scale=teacher_cfg, teacher_iters=teacher_iters, iters=iters,
                                        huber_c=huber_c)
            backward(loss * len(share), scaler, world_size, batch_size)
        loss_sum += loss.detach().float() * len(share)
    optimizer_step(student, optimizer, scaler, grad_clip)
    ema_update(target, student, step, target_decay, warmup=False)  # the target follows at a fixed rate from the start
    save = (step + 1) % eval_interval == 0 or step + 1 == max_steps
    if save or step % log_interval == 0:
        loss = all_sum(loss_sum) / batch_size
        stop_if_diverged(loss, step)  # before a save: a checkpoint never holds a diverged model
        if master:
            log.write(step, loss=loss.item(), lr=optimizer.param_groups[0]['lr'])
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if master and save:
        sample_and_save(step + 1)

if master:
    print(f"{(time.time() - start_time) / 60:.1f} min; checkpoint {ckpt_path}; "
          f"samples {out_dir}/samples_{max_steps:06d}.png (rows: 1, 2 and 4 steps)")
if world_size > 1:
    torch.distributed.destroy_process_group()
