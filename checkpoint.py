"""
A run's folder: its lock, its checkpoints, and loading what it trained.

A checkpoint is ONE safetensors file (no pickle anywhere): the model, its EMA, the
optimizer's moments and the RNG states as tensors, and the settings, step and optimizer
hyper-parameters as JSON in the file's metadata. It is written to a temporary file,
fsynced and renamed over the old one, so a crash mid-save leaves the previous checkpoint
intact; the last few stay beside it as ckpt_<step>.safetensors. A config.json beside it
repeats the settings for people to read.

The trainers save and resume with save_checkpoint / load_checkpoint; everything that uses
a finished run reads its EMA weights: load_generator (sample.py, the evals, the export, the
notebook) and vae.load_vae.
"""
import atexit
import dataclasses
import glob
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from configurator import UsageError
from model import Iris, IrisConfig


def lock_out_dir(out_dir):
    """Create out_dir for one run: run.lock holds the pid of the run writing there and goes
    at its exit, with the folder if this run made it and wrote nothing else. A second run
    stops with one line; the lock of a run that was killed (its pid no longer runs) is taken
    over with a warning."""
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file in the way, a name too long, no permission
        raise UsageError(f"cannot create out_dir '{out_dir[:100]}' ({e.strerror}); "
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
        raise UsageError(f"another run (pid {text}) is writing to {out_dir}; wait for it, stop it, or pass "
                         f"another --out_dir (if no run is using it, delete {path})") from None
    try:
        os.write(fd, str(os.getpid()).encode())
    except OSError as e:  # a full disk: leave no empty lock (nor a folder this run made) behind
        os.close(fd)
        os.remove(path)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise UsageError(f"cannot write {path} ({e.strerror}); free some space or pass another --out_dir") from None
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
        raise UsageError(f"cannot write checkpoint {path} at step {step} ({getattr(e, 'strerror', None) or e}); "
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
        raise UsageError(f"no checkpoint at {path}; train one first or point to it with --out_dir / --init_from")
    try:
        return _read(path, prefixes)
    except UNREADABLE as e:
        raise UsageError(f"{path} is not a readable IRIS checkpoint ({str(e).splitlines()[0]}): a half-copied "
                         f"file? copy it again, or use an intact ckpt_<step>.safetensors beside it") from None


def _newest_intact(path):
    """For resuming: path's checkpoint, or when it is unreadable the newest intact
    ckpt_<step>.safetensors beside it, so a corrupt file loses one checkpoint interval at most."""
    try:
        return read_checkpoint(path)
    except UsageError as unreadable:
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


def load_weights(module, state, path):
    """module.load_state_dict(state); a checkpoint whose tensors do not fit (a file changed
    after it was written, or another run's mixed in) is one error line, not torch's list."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # size mismatch, missing or unexpected names
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UsageError(f"{path} does not fit the model its settings build ({first[:200]}); it was changed or "
                         f"mixed up with another run's: use the run's own checkpoint") from None


def read_ema_checkpoint(folder, kind, setting):
    """-> (the EMA weights, the metadata) of the checkpoint in a finished run's folder, which
    must hold a `kind`: 'VAE' or 'generator'; setting: the option that named the folder."""
    trainer, trained_by, config_key = {'VAE': ('train_vae.py', 'train_vae.py', 'channels'),
                                       'generator': ('train_flow.py', 'train_flow.py or distill.py',
                                                     'text_encoder')}[kind]
    path = os.path.join(folder, 'ckpt.safetensors')
    if not os.path.isfile(path):
        raise UsageError(f"no {kind} checkpoint at {path}; train one with `python {trainer} config/<name>.py` "
                         f"or point {setting} at one")
    tensors, meta = read_checkpoint(path, prefixes=('ema.',))
    if config_key not in meta['model_config']:
        other = 'generator' if kind == 'VAE' else 'VAE'
        raise UsageError(f"{path} is a {other} checkpoint, not a {kind}; point {setting} at a {trained_by} run")
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
        raise UsageError(f"{path} holds another model ({differ}); use its settings or another --out_dir")
    load_weights(model, submodule_state(tensors, 'model.'), path)
    load_weights(ema, submodule_state(tensors, 'ema.'), path)
    state = {}
    for k, v in submodule_state(tensors, 'optim.').items():
        i, name = k.split('.', 1)
        state.setdefault(int(i), {})[name] = v
    try:
        optimizer.load_state_dict({'state': state, 'param_groups': meta['optim_groups']})
    except ValueError as e:  # another optimizer's groups: AdamW's one against Muon's two
        raise UsageError(f"{path} holds another optimizer's state ({e}); resume with the settings it was "
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
        raise UsageError(f"--init_from={init_from!r} is neither 'scratch', 'resume' nor a run folder; "
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
        raise UsageError(f"--init_from={folder} holds a {kind} of another shape ({differ}); use its settings")
    load_weights(model, state, folder)
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
        raise UsageError('no generator checkpoint under out*/; train one with '
                         '`python train_flow.py config/shapes.py` or pass --out_dir')
    return os.path.dirname(max(runs, key=os.path.getmtime))


def load_generator(out_dir='', device='cpu', **overrides):
    """The EMA generator of a train_flow.py / distill.py run ('' = the newest under out*/),
    the run's settings and its folder. overrides change inference-only fields, e.g.
    fft_impl="dft" for export, or add a new control adapter (control="edges")."""
    out_dir = out_dir or newest_generator_run()
    state, meta = read_ema_checkpoint(out_dir, 'generator', '--out_dir')
    return generator_from(state, meta, out_dir, device, **overrides), meta['config'], out_dir


def generator_from(state, meta, folder, device='cpu', **overrides):
    """The generator of read_ema_checkpoint's (state, meta), read from `folder`, frozen and in
    eval mode; overrides as in load_generator."""
    model = Iris(IrisConfig(**{**meta['model_config'], **overrides}))
    if model.control_adapter is not None and not meta['model_config'].get('control'):
        # a base run under a new, zero-initialised adapter (train_control.py)
        state = state | {f'control_adapter.{k}': v for k, v in model.control_adapter.state_dict().items()}
    load_weights(model, state, os.path.join(folder, 'ckpt.safetensors'))
    return model.to(device).eval().requires_grad_(False)
