"""
Text to image from the files export_mobile.py wrote, and nothing else: no model code, no
checkpoint. This is what the phone app does, run on this machine with the same runtimes
(ExecuTorch's, or ONNX Runtime), and it reports the process's peak memory.

    python run_mobile.py --export_dir=out-shapes-flow/mobile-fp32 --prompt "a large red circle in the center"
    python run_mobile.py --export_dir=out-mobile-small-512-fp16 --iters 8 --steps 10 --output small.png
    python run_mobile.py --export_dir=out-mobile-small-512-fp32 --format onnx
    python run_mobile.py --export_dir=out-shapes-flow/mobile-fp32 --exit_tolerance 0.1 --iters 32   # adaptive r
    python run_mobile.py --export_dir=out-shapes-edges/mobile-fp32 --control_image photo.png   # its edges

The parts are loaded one at a time and freed after use (text encoder, then generator,
then VAE decoder), so peak memory is the largest part plus activations, not their sum
(mobile.py: the parts, their methods and the loop that runs them).
"""
import importlib
import os
import time

import torch

from configurator import configure
from data import check_output, control_map, image_tensor, open_image, save_grid, to_uint8
from mobile import exported_parts, generate, initial_noise, peak_rss_mb, read_manifest

# -----------------------------------------------------------------------------
export_dir = ''  # a folder export_mobile.py wrote
prompt = ''  # '' = the run's first held-out prompt
format = 'pte'  # 'pte' (ExecuTorch) or 'onnx' (ONNX Runtime)
steps = 0  # 0 = the export's default
iters = 0  # core iterations r; 0 = the export's default
exit_tolerance = 0.0  # > 0: adaptive iterations, at most iters (model.iterate_core)
cfg_scale = 0.0  # 0 = the export's default
seed = 0
control_image = ''  # a control run: an image whose edges (or silhouette) to follow
output = ''  # '' = EXPORT_DIR/sample-<format>.png
# -----------------------------------------------------------------------------
configure(globals(), choices=dict(format=('pte', 'onnx')))
if output:
    check_output(output)
if not export_dir:
    raise SystemExit("error: say which export to run, e.g. --export_dir=out-shapes-flow/mobile-fp32 "
                     "(export_mobile.py writes it)")
manifest = read_manifest(export_dir)
prompt = prompt or manifest['sample_prompt']
if not prompt.strip():
    raise SystemExit("error: --prompt is empty; write what to draw")
steps, iters = steps or manifest['steps'], iters or manifest['iters']
cfg_scale = cfg_scale or manifest['cfg_scale']
if format == 'pte' and not manifest.get('pte', True):  # exports older than the setting all hold .pte files
    raise SystemExit(f"error: {export_dir} was exported with --pte=False; run it with --format=onnx")
if format == 'onnx' and not manifest['onnx']:
    raise SystemExit(f"error: {export_dir} has no ONNX files ({manifest['precision']} exports are .pte only)")
maps = None
if control_image:
    if not manifest.get('control'):
        raise SystemExit(f"error: {export_dir} is not a control run's export; drop --control_image")
    maps = control_map(image_tensor(open_image(control_image, 'control_image'), manifest['image_size']),
                                manifest['control'])
importlib.import_module('executorch.runtime' if format == 'pte' else 'onnxruntime')
imports_mb = peak_rss_mb()  # Python, torch and the runtime, before any model
start = time.time()
torch.manual_seed(seed)  # the Core's noise start, where the run has one
image, used = generate(exported_parts(export_dir, manifest, format), [prompt], initial_noise(manifest, seed),
                       steps=steps, cfg_scale=cfg_scale, iters=iters, shift=manifest['shift'],
                       sampler=manifest['sampler'], generator=torch.Generator().manual_seed(seed + 1),
                       control_map=maps, exit_tolerance=exit_tolerance)
seconds = time.time() - start
output = output or os.path.join(export_dir, f'sample-{format}.png')
save_grid(to_uint8(image), output, columns=1)
iterations = f"r={used:.1f} on average (at most {iters})" if exit_tolerance else f"r={iters}"
print(f"wrote {output}: {manifest['image_size']}px, {steps} {manifest['sampler']} steps, {iterations}, "
      f"{manifest['precision']} {format}, {seconds:.1f} s")
print(f"peak RSS {peak_rss_mb():.0f} MB ({imports_mb:.0f} MB before loading a model: Python, torch, the runtime)")
