"""
What the training scripts share: the processes (DDP) and the split of a step's batch, the
optimizers (AdamW, or Muon on the weight matrices) and learning-rate schedules, the EMA, the
loss log, and the generator's training step (generator_step, which bench.py and check_gpu.py
time, with count_kernels). A run's folder and checkpoints are checkpoint.py's, the dtype
precision.py's.
"""
import contextlib
import copy
import math
import os

import torch

from configurator import UsageError
from flow import flow_loss
from text import Prompt


def setup_distributed(device):
    """Under torchrun (which sets RANK): join the process group, NCCL on GPUs and gloo on
    CPUs, and return (rank, world_size, device); alone, (0, 1, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def micro_batches(batch_size, rank, world_size, accumulation):
    """This process's rows of a step's batch, split into `accumulation` micro-batches.
    Every process draws the whole batch (and its noise) from the same generators and
    trains on rows rank, rank + world_size, ...: N processes see what one process would."""
    if batch_size % (world_size * accumulation):
        raise UsageError(f"batch_size {batch_size} does not split into {world_size} processes x {accumulation} "
                         f"accumulation steps; make it a multiple of {world_size * accumulation}")
    return torch.arange(rank, batch_size, world_size).chunk(accumulation)


def wrap_distributed(model, world_size):
    return torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model


def sync_gradients(model, last):
    """DDP all-reduces the gradients on every backward; only the last micro-batch needs it."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def all_sum(x):
    """Sum a tensor over the processes (a no-op alone)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return x


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale the gradients (fp16), clip, step and zero them. The scaler skips a step whose
    gradients overflowed and halves its scale: normal now and then, divergence when the
    scale has collapsed."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled() and scaler.get_scale() < 2.0 ** -8:
        raise UsageError(f"the fp16 loss scale fell to {scaler.get_scale():.1e}: the gradients overflow at "
                         f"every scale; lower --lr or use --dtype=bfloat16 or float32 (and resume with "
                         f"--init_from=resume)")


def backward(share_loss, scaler, world_size, batch_size):
    """Backpropagate one micro-batch: share_loss is its loss summed over its images. Dividing
    by the whole batch and multiplying by the processes, which DDP's mean over processes
    divides again, makes the gradients those of the mean over the whole batch, however it is
    split. Under fp16 the GradScaler scales the loss first."""
    scaler.scale(share_loss * world_size / batch_size).backward()


def generator_step(model, optimizer, scaler, autocast, x0, prompt, t, eps, iters, shares, control_map=None,
                   world_size=1, grad_clip=1.0, weighting='none', loop_distill=0.0, network=None):
    """One optimizer step of the generator: what train_flow.py and train_control.py run and
    bench.py and check_gpu.py time. x0 (B, 16, h, w) latents, prompt (text.Prompt), t (B,),
    eps, and control_map (B, 1, H, W) for an adapter: the whole step's batch, on the CPU.
    shares: this process's rows in micro-batches (micro_batches), each moved to the model's
    device for its forward (under autocast) and backward. network: the model as DDP wraps it
    (wrap_distributed), if it is. -> the shares' per-sample losses (detached, in share order)."""
    network = network or model
    device = next(model.parameters()).device
    # A noise-started Core's s_0 for the whole batch, as t and eps, so that any split into
    # processes and micro-batches draws alike
    core_start = model.core_noise(x0) if model.config.state_init == 'noise' else None
    losses = []
    for micro, share in enumerate(shares):
        def part(x):
            return None if x is None else x[share].to(device)
        with sync_gradients(network, last=micro == len(shares) - 1):
            with autocast:  # the forward only: backward runs each op in the dtype its forward chose
                per_sample = flow_loss(network, part(x0), prompt.rows(share).to(device), iters, part(t), part(eps),
                                       weighting, loop_distill, part(control_map), part(core_start))
            backward(per_sample.sum(), scaler, world_size, len(t))
        losses.append(per_sample.detach().float())
    optimizer_step(model, optimizer, scaler, grad_clip)
    return torch.cat(losses)


def count_kernels(fn, device='cpu'):
    """The kernels one call of fn() launches, as torch.profiler sees them, in eager and
    compiled code alike. On a GPU, its device kernels. On a CPU, what would each be one launch
    on a GPU: the outermost aten ops that are neither views (which only relabel memory) nor
    allocations, and the kernels inductor fused (named in the profile when
    torch._inductor.config.cpp.enable_kernel_profile is on)."""
    cuda = device.startswith('cuda')
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in profile.events())

    def is_kernel(name):
        if 'cpp_fused' in name:
            return True
        op = getattr(torch.ops.aten, name.removeprefix('aten::'), None) if name.startswith('aten::') else None
        return (op is not None and name not in ('aten::empty', 'aten::empty_strided', 'aten::empty_like')
                and not any(getattr(op, overload).is_view for overload in op.overloads()))

    def inside_an_aten_op(event):
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith('aten::'):
            parent = parent.cpu_parent
        return parent is not None
    return sum(is_kernel(e.name) and not inside_an_aten_op(e) for e in profile.events())


def caption_batch(captions, rows, null_prompt, cfg_dropout, generator):
    """Rows (B,) of a caption table (text.Prompt) as the step's prompts, each swapped for the
    empty caption with probability cfg_dropout: the unconditional branch that classifier-free
    guidance needs learns from those."""
    text, mask = captions.text[rows].float(), captions.mask[rows]
    drop = torch.rand(len(rows), generator=generator) < cfg_dropout
    text[drop], mask[drop] = null_prompt.text, null_prompt.mask
    return Prompt(text, mask)


class LossBands:
    """The mean flow loss in four bands of t, [0, .25), [.25, .5), [.5, .75) and [.75, 1], over
    the steps since the last read, summed on the device: read only when logged, since a read
    waits for the GPU."""
    names = ['loss_t0', 'loss_t1', 'loss_t2', 'loss_t3']

    def __init__(self, device):
        self.sum, self.count = torch.zeros(4, device=device), torch.zeros(4, device=device)

    def add(self, t, losses):
        band = (t * 4).long().clamp(max=3).to(losses.device)
        self.sum.index_add_(0, band, losses)
        self.count.index_add_(0, band, torch.ones_like(losses))

    def read(self):
        means = (all_sum(self.sum) / all_sum(self.count).clamp_min(1)).tolist()
        self.sum.zero_(), self.count.zero_()
        return dict(zip(self.names, means))


def stop_if_diverged(loss, step):
    if not torch.isfinite(loss):
        raise UsageError(f"loss is {loss.item()} at step {step}; lower --lr or raise --warmup_steps "
                         f"(and resume from the last checkpoint with --init_from=resume)")


def lr_at(step, max_steps, warmup_steps, lr, min_lr, cooldown=0.0):
    """Linear warmup, then cosine decay from lr to min_lr at max_steps; or with cooldown > 0
    warmup-stable-decay (Hägele et al. 2024, arXiv 2405.18392): lr held, then a straight line
    to min_lr over the last `cooldown` fraction of the steps (1: linear decay all the way)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if cooldown:
        decay_steps = max(1, min(round(cooldown * max_steps), max_steps - warmup_steps))
        return lr + min(1.0, max(0, step - (max_steps - decay_steps)) / decay_steps) * (min_lr - lr)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def orthogonalise(G, steps=5):
    """Approximately the nearest semi-orthogonal matrix U V^T to G = U S V^T, by a quintic
    Newton-Schulz iteration whose coefficients (Jordan et al.) push every singular value into
    about [0.7, 1.2] in five steps: fast rather than exact, which is all Muon needs."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)  # every singular value at most 1
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T  # X X^T is then the smaller Gram matrix
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.T


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) on the groups with
    muon=True, AdamW on the others, in one optimizer so that one checkpoint holds both. Muon
    steps each weight matrix W by its orthogonalised Nesterov momentum, which moves every
    direction of W alike where SGD's and Adam's steps are dominated by a few:
        M <- mu M + (1 - mu) G,   W <- W - lr 0.2 sqrt(max(n, m)) orthogonalise((1 - mu) G + mu M)
    The factor 0.2 sqrt(max(n, m)) gives the step AdamW's RMS, so one learning rate serves both
    kinds of group (Liu et al. 2025, arXiv 2502.16982). A convolution's (out, in, k, k) weight
    is the matrix (out, in k k)."""

    def __init__(self, param_groups, lr, weight_decay=0.0, momentum=0.95, betas=(0.9, 0.99), eps=1e-8):
        super().__init__(param_groups, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu, (beta1, beta2) = group['lr'], group['momentum'], group['betas']
            for p in filter(lambda p: p.grad is not None, group['params']):
                state = self.state[p]
                p.mul_(1 - lr * group['weight_decay'])  # decoupled weight decay
                if group['muon']:
                    momentum = state.setdefault('momentum', torch.zeros_like(p)).lerp_(p.grad, 1 - mu)
                    update = orthogonalise(p.grad.lerp(momentum, mu).flatten(1))
                    p.add_(update.view_as(p), alpha=-lr * 0.2 * math.sqrt(max(update.shape)))
                else:
                    step = state.setdefault('step', torch.zeros(())).add_(1).item()
                    m = state.setdefault('exp_avg', torch.zeros_like(p)).lerp_(p.grad, 1 - beta1)
                    v = state.setdefault('exp_avg_sq', torch.zeros_like(p)).lerp_(p.grad.square(), 1 - beta2)
                    denominator = (v / (1 - beta2 ** step)).sqrt_().add_(group['eps'])
                    p.addcdiv_(m, denominator, value=-lr / (1 - beta1 ** step))


def make_optimizer(model, lr, weight_decay, muon=False, ends=()):
    """AdamW, fused (one kernel for all parameters, not several per tensor); or with `muon`,
    Muon on the hidden weight matrices, those of every nn.Linear and dense nn.Conv2d but the
    modules in `ends` (the layers that read the input and write the output, which Muon's
    authors leave to AdamW), and AdamW on the rest: those layers, biases, norms, depthwise
    filters."""
    if not muon:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99), fused=True)
    at_the_ends = {id(p) for module in ends for p in module.parameters()}
    matrices = {id(m.weight) for m in model.modules() if (isinstance(m, torch.nn.Linear) or isinstance(
        m, torch.nn.Conv2d) and m.groups == 1) and id(m.weight) not in at_the_ends}
    return Muon([dict(params=[p for p in model.parameters() if id(p) in matrices], muon=True),
                 dict(params=[p for p in model.parameters() if id(p) not in matrices], muon=False)],
                lr=lr, weight_decay=weight_decay)


def draw_iters(train_iters, mean, generator):
    """The Core's r for one training step: uniform over the tuple train_iters, or with mean > 0
    Huginn's heavy tail, 1 + Poisson(exp(tau)) with tau ~ N(log(mean - 1) - sigma^2 / 2, sigma),
    sigma = 1/2 (mostly short, sometimes long; its mean is `mean`), capped at max(train_iters)."""
    if not mean:
        return train_iters[torch.randint(len(train_iters), (1,), generator=generator).item()]
    tau = math.log(max(mean - 1, 1e-3)) - 0.125 + 0.5 * torch.randn(1, generator=generator)
    return min(1 + int(torch.poisson(tau.exp(), generator=generator).item()), max(train_iters))


def make_ema(model):
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema, model, step, decay, warmup=True):
    # warm the decay up (1+s)/(10+s): early weights are noise, so don't average them in for long
    d = min(decay, (1 + step) / (10 + step)) if warmup else decay
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class LossLog:
    """Appends `step,name,...` rows to a CSV a person can open or plot."""

    def __init__(self, path, columns, resume_step=None):
        self.path, self.columns = path, columns
        if resume_step is not None and os.path.exists(path):
            # keep the rows before the checkpoint: the steps after it are about to be redone
            with open(path) as f:
                header, *rows = f.readlines()
            rows = [r for r in rows if int(r.split(',', 1)[0]) < resume_step]
        else:
            header, rows = ','.join(['step'] + columns) + '\n', []
        with open(path, 'w') as f:
            f.writelines([header] + rows)

    def write(self, step, **values):
        with open(self.path, 'a') as f:
            f.write(','.join([str(step)] + [f"{values[c]:.8g}" for c in self.columns]) + '\n')
