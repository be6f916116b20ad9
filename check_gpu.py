"""
The GPU check: what a first run of the Pokemon quickstart does on a GPU, in a few minutes.

    python check_gpu.py --data_dir=PATH        # any local imagefolder (images + metadata.jsonl)
    python check_gpu.py --data_dir=PATH --dtypes="('bfloat16',)"
    python check_gpu.py config/emoji.py --data_dir=PATH    # another config's models (config/pokemon.py's by default)

For each dtype (fp16 with its GradScaler, bf16) it runs, as a user runs them, from an empty
cache: train_vae.py and train_flow.py on the config's models for a few dozen steps, a resume
of train_flow.py, sample.py, distill.py and sample.py on the student. Then it times one of the
config's generator training steps in-process, GRFM against attention in the Core: ms per step,
the kernels one step launches (torch.profiler) and the peak GPU memory. It stops at the first
error with that command's output. Runs go to out_dir/<dtype>, emptied first.
On a CPU (--device=cpu) the same lines run, slowly: a smoke test of this script.
"""
import os
import shutil
import subprocess
import sys
import time

import torch

from configurator import config_files, configure, script_settings
from model import build_generator
from precision import mixed_precision
from text import Prompt
from training import count_kernels, generator_step

# -----------------------------------------------------------------------------
data_dir = ''  # a local imagefolder: images and a metadata.jsonl of {"file_name", "text"}
out_dir = 'out-gpu-check'
dtypes = ('float16', 'bfloat16')
vae_max_steps = 40
flow_max_steps = 30
distill_max_steps = 10
overrides = ''  # more --key=value for train_vae.py and train_flow.py, separated by spaces (a small CPU smoke test)
timed_batch_size = 0  # the timed generator step's batch; 0 = the config's
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------
configure(globals(), positive=('vae_max_steps', 'flow_max_steps', 'distill_max_steps'))
if not dtypes or not set(dtypes) <= {'float32', 'bfloat16', 'float16'}:
    raise SystemExit(f"error: dtypes must name some of 'float16', 'bfloat16', 'float32', got {dtypes}")
if not os.path.isfile(os.path.join(data_dir, 'metadata.jsonl')):
    raise SystemExit("error: --data_dir must be an imagefolder with a metadata.jsonl (docs/usage.md, 'Data'); "
                     "any few dozen captioned images will do")
GPU = device.startswith('cuda')
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = config_files() or [os.path.join(HERE, 'config', 'pokemon.py')]  # the config files on the command line
FLOW = script_settings('train_flow', CONFIGS)  # the generator they train


def run_script(script, *args):
    """Run one of the repo's scripts as a user would; stop with its output if it fails."""
    command = [sys.executable, os.path.join(HERE, script), *CONFIGS, *args, f'--device={device}']
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: FAILED ({result.returncode}): {' '.join(command)}\n{result.stdout[-3000:]}"
                         f"{result.stderr[-3000:]}")
    print(f"  ok  {time.perf_counter() - start:6.1f} s  {script} {' '.join(args)}", flush=True)


def measure_generator_step(mixer, dtype, batch, r):
    """One train_flow.py step (training.generator_step) of the config's generator with `mixer`
    in its Core -> (ms per step, kernels per step (training.count_kernels), peak GiB): the
    allocator's peak on a GPU, none on a CPU."""
    torch.manual_seed(0)
    model = build_generator(FLOW | dict(mixer=mixer), 384).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast, scaler = mixed_precision(dtype, device)
    side = FLOW['image_size'] // 16
    z, t = torch.randn(batch, 16, side, side), torch.rand(batch)  # on the CPU: the step moves its batch
    prompt = Prompt(torch.randn(batch, 20, 384), torch.ones(batch, 20, dtype=torch.bool))

    def step():
        generator_step(model, optimizer, scaler, autocast, z, prompt, t, torch.randn_like(z), r, [torch.arange(batch)])

    def synchronize():
        if GPU:
            torch.cuda.synchronize()
    for _ in range(3):  # warm-up: AdamW's state, the allocator, cuBLAS's choices
        step()
    synchronize()
    kernels = count_kernels(step, device)
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    repeats = 10 if GPU else 1
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize()
    ms = 1e3 * (time.perf_counter() - start) / repeats
    peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if GPU else '-'
    return ms, kernels, peak


name = torch.cuda.get_device_name() if GPU else 'CPU'
print(f"GPU check on {name}, torch {torch.__version__}, data {data_dir}")
half = max(1, flow_max_steps // 2)  # the first run stops here, the resume goes on to flow_max_steps
for dtype in dtypes:
    runs = os.path.join(out_dir, dtype)
    shutil.rmtree(runs, ignore_errors=True)  # a fresh start, the cache too
    common = [f'--data_dir={data_dir}', f'--dtype={dtype}']
    print(f"{dtype}:")
    run_script('train_vae.py', *common, f'--out_dir={runs}/vae', f'--max_steps={vae_max_steps}',
        f'--eval_interval={vae_max_steps}',
        *overrides.split())
    flow = [*common, *overrides.split(), f'--vae_dir={runs}/vae', f'--cache_dir={runs}/cache', f'--out_dir={runs}/flow',
            f'--eval_interval={half}', '--sample_steps=4']
    run_script('train_flow.py', *flow, f'--max_steps={half}')  # an empty cache: every user's first run
    run_script('train_flow.py', *flow, f'--max_steps={flow_max_steps}', '--init_from=resume')
    run_script('sample.py', f'--out_dir={runs}/flow', '--steps=4', f'--output={runs}/flow.png', f'--dtype={dtype}')
    run_script('distill.py', f'--teacher_dir={runs}/flow', f'--cache_dir={runs}/cache', f'--out_dir={runs}/cd',
        f'--max_steps={distill_max_steps}', f'--eval_interval={distill_max_steps}', f'--dtype={dtype}')
    run_script('sample.py', f'--out_dir={runs}/cd', '--steps=2', f'--output={runs}/cd.png', f'--dtype={dtype}')
    batch, r = timed_batch_size or FLOW['batch_size'], sorted(FLOW['train_iters'])[len(FLOW['train_iters']) // 2]
    tokens = (FLOW['image_size'] // 16 // FLOW['patch_size']) ** 2
    for mixer in ('grfm', 'attention'):
        ms, kernels, peak = measure_generator_step(mixer, dtype, batch, r)
        print(f"  generator step, {mixer:9s}: {ms:7.1f} ms, {kernels} kernels, {peak} peak ({FLOW['model_size']}, "
              f"{tokens} tokens, batch {batch}, r = {r}, backprop {FLOW['backprop_iters']})", flush=True)
print("GPU check passed")
