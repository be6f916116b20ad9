"""
What every IRIS training script shares: the learning-rate schedules, the optimizers (AdamW,
or Muon on the weight matrices), the EMA, the loss log and checkpoints, the generator's
training step (generator_step, which bench.py and check_gpu.py time, with count_kernels),
and loading a trained generator (load_generator) for the scripts that use one.

A checkpoint is ONE safetensors file (no pickle anywhere): the model, its EMA, the
optimizer's moments and the RNG states as tensors, and the settings, step and optimizer
hyper-parameters as JSON in the file's metadata. It is written to a temporary file,
fsynced and renamed over the old one, so a crash mid-save leaves the previous checkpoint
intact; the last few stay beside it as ckpt_<step>.safetensors. A config.json beside it
repeats the settings for people to read.

Mixed precision (the `dtype` setting of every training script) is here too: one autocast
and one GradScaler, the same on a GPU and a CPU.
"""
import atexit
import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flow import flow_loss
from model import Iris, IrisConfig
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
        raise SystemExit(f"error: batch_size {batch_size} does not split into {world_size} processes x {accumulation} "
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


DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def native_bf16_cpu():
    """True where the CPU computes in bf16 natively (AMX tiles or AVX512-BF16: Sapphire Rapids,
    Zen 4). Elsewhere autocast emulates bf16, many times slower than fp32 (docs/results.md)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_dtype(dtype, device):
    """'auto' -> 'bfloat16' on GPUs with native bf16 (compute capability 8.0+: A100, L4, H100),
    'float16' on older ones (T4, V100: is_bf16_supported() says True there, but through
    emulation at fp32 speed or slower); on a CPU 'bfloat16' where it is native, else 'float32'."""
    if dtype not in DTYPES:
        raise SystemExit(f"error: dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if dtype != 'auto':
        return dtype
    if not device.startswith('cuda'):
        return 'bfloat16' if native_bf16_cpu() else 'float32'
    return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'


def mixed_precision(dtype, device):
    """-> (autocast context, GradScaler) for a resolved dtype, on a GPU or a CPU alike, so the
    CPU runs every line a GPU will. The scaler is on for fp16 only, whose 5-bit exponent
    flushes small gradients to zero; bf16 has fp32's range and needs none."""
    device_type = torch.device(device).type
    autocast = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != 'float32')
    return autocast, torch.amp.GradScaler(device_type, enabled=dtype == 'float16')


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
        raise SystemExit(f"error: the fp16 loss scale fell to {scaler.get_scale():.1e}: the gradients overflow at "
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
        raise SystemExit(f"error: loss is {loss.item()} at step {step}; lower --lr or raise --warmup_steps "
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

# -----------------------------------------------------------------------------
# checkpoints


def lock_out_dir(out_dir):
    """Create out_dir for one run: run.lock holds the pid of the run writing there and goes
    at its exit, with the folder if this run made it and wrote nothing else. A second run
    stops with one line; the lock of a run that was killed (its pid no longer runs) is taken
    over with a warning."""
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file in the way, a name too long, no permission
        raise SystemExit(f"error: cannot create out_dir '{out_dir[:100]}' ({e.strerror}); "
                         f"pass another --out_dir") from None
    path = os.path.join(out_dir, 'run.lock')
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one of two racing runs wins
    except FileExistsError:
        with open(path) as f:
            text = f.read().strip()
        try:
            os.kill(int(text), 0)  # signal 0: does that process exist?
        except (ValueError, ProcessLookupError):
            print(f"warning: {path} was left by pid {text or '?'}, which no longer runs; taking it over")
            os.remove(path)
            return lock_out_dir(out_dir)
        except PermissionError:
            pass  # it exists, owned by someone else
        raise SystemExit(f"error: another run (pid {text}) is writing to {out_dir}; wait for it, stop it, or pass "
                         f"another --out_dir (if no run is using it, delete {path})") from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    pid = os.getpid()

    def release():
        if os.getpid() != pid:  # a forked child exiting
            return
        if os.path.exists(path):
            os.remove(path)
        if created and not os.listdir(out_dir):  # a run stopped before it wrote anything
            os.rmdir(out_dir)
    atexit.register(release)


def _fsync_replace(tmp, path):
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def model_config(model):
    """A model's constructor arguments as a JSON-able dict (WaveletVAE keeps a dict, Iris a dataclass)."""
    config = getattr(model, 'config', {})
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def save_checkpoint(path, model, ema, optimizer, step, config, data_generator, scaler=None, keep_last=3):
    """Write everything a run needs to continue to `path`, atomically, and keep the last
    `keep_last` checkpoints beside it as ckpt_<step>.safetensors (hard links where the file
    system allows them, copies where it does not: Google Drive's mount, say)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    optim = optimizer.state_dict()
    for i, state in optim['state'].items():
        tensors |= {f"optim.{i}.{k}": v for k, v in state.items()}
    tensors['rng.torch'] = torch.get_rng_state()
    tensors['rng.data'] = data_generator.get_state()
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = dict(step=step, config=config, model_config=model_config(model), optim_groups=optim['param_groups'],
                scaler=scaler.state_dict() if scaler else {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    stem, folder = os.path.splitext(os.path.basename(path))[0], os.path.dirname(os.path.abspath(path))
    numbered = os.path.join(folder, f"{stem}_{step:06d}.safetensors")
    try:
        save_file(tensors, path + '.tmp', metadata={k: json.dumps(v) for k, v in meta.items()})
        _fsync_replace(path + '.tmp', path)
        if os.path.exists(numbered):
            os.remove(numbered)
        try:
            os.link(path, numbered)
        except OSError:
            shutil.copyfile(path, numbered + '.tmp')
            _fsync_replace(numbered + '.tmp', numbered)
    except (OSError, SafetensorError) as e:  # a full disk, say: the last complete checkpoint stays as it was
        for tmp in (path + '.tmp', numbered + '.tmp'):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise SystemExit(f"error: cannot write checkpoint {path} at step {step} ({getattr(e, 'strerror', None) or e}); "
                         f"the last complete one is intact: free some space and continue with --init_from=resume")
    history = sorted(f for f in os.listdir(folder) if f.startswith(stem + '_') and f.endswith('.safetensors'))
    for old in history[:-keep_last]:
        os.remove(os.path.join(folder, old))
    json_path = os.path.join(os.path.dirname(path), 'config.json')
    with open(json_path + '.tmp', 'w') as f:
        json.dump({k: meta[k] for k in ('step', 'config', 'model_config')}, f, indent=2)
    _fsync_replace(json_path + '.tmp', json_path)


CHECKPOINT_PARTS = ('model.', 'ema.', 'optim.', 'rng.')
UNREADABLE = (OSError, SafetensorError, ValueError)  # cut short, empty, or not a checkpoint (ValueError: its JSON)


# Parameter names some checkpoints carry, and the names they load under: input injection
# and Griffin's Lambda.
RENAMED_PARAMETERS = {'adapter': 'injection', 'log_lambda': 'decay_logit'}


def _current_name(key):
    return '.'.join(RENAMED_PARAMETERS.get(part, part) for part in key.split('.'))


def _read(path, prefixes):
    with safe_open(path, framework='pt') as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {_current_name(k): f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
    if 'step' not in meta or 'model_config' not in meta:
        raise ValueError("no IRIS metadata")
    return tensors, meta


def read_checkpoint(path, prefixes=CHECKPOINT_PARTS):
    """The tensors whose names start with one of prefixes, and the metadata, from a checkpoint."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; train one first or point to it with --out_dir / --init_from")
    try:
        return _read(path, prefixes)
    except UNREADABLE as e:
        raise SystemExit(f"error: {path} is not a readable IRIS checkpoint ({str(e).splitlines()[0]}): a half-copied "
                         f"file? copy it again, or use an intact ckpt_<step>.safetensors beside it") from None


def _newest_intact(path):
    """For resuming: path's checkpoint, or when it is unreadable the newest intact
    ckpt_<step>.safetensors beside it, so a corrupt file loses one checkpoint interval at most."""
    try:
        return read_checkpoint(path)
    except SystemExit as unreadable:
        stem = os.path.splitext(path)[0]
        for older in sorted(glob.glob(glob.escape(stem) + '_*.safetensors'), reverse=True):
            try:
                tensors, meta = _read(older, CHECKPOINT_PARTS)
            except UNREADABLE:
                continue
            print(f"warning: {path} is unreadable; resuming from {older} (step {meta['step']})")
            return tensors, meta
        raise unreadable


def submodule_state(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_ema_checkpoint(folder, kind, setting):
    """-> (the EMA weights, the metadata) of the checkpoint in a finished run's folder, which
    must hold a `kind`: 'VAE' or 'generator'; setting: the option that named the folder."""
    trainer, trained_by, config_key = {'VAE': ('train_vae.py', 'train_vae.py', 'channels'),
                                       'generator': ('train_flow.py', 'train_flow.py or distill.py',
                                                     'text_encoder')}[kind]
    path = os.path.join(folder, 'ckpt.safetensors')
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {kind} checkpoint at {path}; train one with `python {trainer} config/<name>.py` "
                         f"or point {setting} at one")
    tensors, meta = read_checkpoint(path, prefixes=('ema.',))
    if config_key not in meta['model_config']:
        other = 'generator' if kind == 'VAE' else 'VAE'
        raise SystemExit(f"error: {path} is a {other} checkpoint, not a {kind}; point {setting} at a {trained_by} run")
    return submodule_state(tensors, 'ema.'), meta


def _differences(theirs, ours):
    return ', '.join(f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(set(theirs) | set(ours))
                     if theirs.get(k) != ours.get(k))


def load_checkpoint(path, model, ema, optimizer, data_generator, scaler=None):
    """Restore everything save_checkpoint wrote; return its metadata: the step to continue from
    ('step') and the run's settings ('config')."""
    tensors, meta = _newest_intact(path)
    if meta.get('model_config') != model_config(model):
        differ = _differences(meta.get('model_config') or {}, model_config(model))
        raise SystemExit(f"error: {path} holds another model ({differ}); use its settings or another --out_dir")
    model.load_state_dict(submodule_state(tensors, 'model.'))
    ema.load_state_dict(submodule_state(tensors, 'ema.'))
    state = {}
    for k, v in submodule_state(tensors, 'optim.').items():
        i, name = k.split('.', 1)
        state.setdefault(int(i), {})[name] = v
    try:
        optimizer.load_state_dict({'state': state, 'param_groups': meta['optim_groups']})
    except ValueError as e:  # another optimizer's groups: AdamW's one against Muon's two
        raise SystemExit(f"error: {path} holds another optimizer's state ({e}); resume with the settings it was "
                         f"trained with (its config.json: muon={meta['config'].get('muon', False)})") from None
    if scaler and scaler.is_enabled() and meta.get('scaler'):  # an fp16 run's loss scale (fp32/bf16 runs have none)
        scaler.load_state_dict(meta['scaler'])
    torch.set_rng_state(tensors['rng.torch'])
    data_generator.set_state(tensors['rng.data'])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


def check_init_from(init_from):
    """init_from is 'scratch', 'resume' or a finished run's folder."""
    if init_from not in ('scratch', 'resume') and not os.path.isdir(init_from):
        raise SystemExit(f"error: --init_from={init_from!r} is neither 'scratch', 'resume' nor a run folder; "
                         f"point it at a finished run's out_dir")


def start_from_run(folder, model, kind):
    """nanoGPT's init_from with a run folder: `model` takes that run's EMA weights, and the
    rest (data, image size, schedule, a fresh optimizer) is this run's: a new resolution, or a
    fine-tune on other pictures. The network must have the same shape; settings that change no
    weight (backprop_iters, state_init, ...) may differ. -> the run's settings."""
    state, meta = read_ema_checkpoint(folder, kind, '--init_from')
    ours = model.state_dict()
    if state.keys() != ours.keys() or any(state[k].shape != v.shape for k, v in ours.items()):
        differ = _differences(meta['model_config'], model_config(model))
        raise SystemExit(f"error: --init_from={folder} holds a {kind} of another shape ({differ}); use its settings")
    model.load_state_dict(state)
    print(f"{kind} initialised from {folder} (its step {meta['step']})")
    return meta['config']


def newest_generator_run():
    """The newest run under out*/ whose checkpoint holds a generator: its model config names a
    text encoder, which a VAE's does not."""
    runs = []
    for path in glob.glob('out*/ckpt.safetensors'):
        with safe_open(path, framework='pt') as f:
            if 'text_encoder' in json.loads((f.metadata() or {}).get('model_config', '{}')):
                runs.append(path)
    if not runs:
        raise SystemExit('error: no generator checkpoint under out*/; train one with '
                         '`python train_flow.py config/shapes.py` or pass --out_dir')
    return os.path.dirname(max(runs, key=os.path.getmtime))


def load_generator(out_dir='', device='cpu', **overrides):
    """The EMA generator of a train_flow.py / distill.py run ('' = the newest under out*/),
    the run's settings and its folder. overrides change inference-only fields, e.g.
    fft_impl="dft" for export, or add a new control adapter (control="edges")."""
    out_dir = out_dir or newest_generator_run()
    state, meta = read_ema_checkpoint(out_dir, 'generator', '--out_dir')
    return generator_from(state, meta, device, **overrides), meta['config'], out_dir


def generator_from(state, meta, device='cpu', **overrides):
    """The generator of read_ema_checkpoint's (state, meta), frozen and in eval mode;
    overrides as in load_generator."""
    model = Iris(IrisConfig(**{**meta['model_config'], **overrides}))
    if model.control_adapter is not None and not meta['model_config'].get('control'):
        # a base run under a new, zero-initialised adapter (train_control.py)
        state = state | {f'control_adapter.{k}': v for k, v in model.control_adapter.state_dict().items()}
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)
