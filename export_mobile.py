"""
Export IRIS for phones: the text encoder, the generator and the VAE decoder, each as an
ExecuTorch program (.pte, XNNPACK delegate) and ONNX (opset 18, weights inside the file), and
check every export on this machine against PyTorch before trusting it.

    pip install -r requirements-export.txt                  # executorch, onnx, onnxruntime
    python export_mobile.py config/shapes.py                # the trained shapes run, fp32
    python export_mobile.py --out_dir=out-shapes-cd --precision=fp16
    python export_mobile.py --model_size=small --size=512 --precision=int8   # untrained: files, memory, speed
    python export_mobile.py config/shapes.py --pte=False    # ONNX only: what the web page (web/) runs
    python run_mobile.py --export_dir=out-shapes-flow/mobile-fp32   # the phone's pipeline from the files alone

The parts and their methods are listed in mobile.py, which holds the export code; they are
exported at a fixed image size and batch (ExecuTorch plans memory ahead). The generator's
batch is 2 for a train_flow.py run (guidance runs both prompts at once) and 1 for a
distill.py student.

Each export is run right away (ExecuTorch's runtime, ONNX Runtime) on the inputs PyTorch
saw; the script prints the max difference, file size, time to load and run once, and
latency, and stops if an fp32 export is off by more than 1e-4 of the output's scale. Then
the whole pipeline runs from the files (run_mobile.py) against PyTorch, and once more in
a fresh process to measure its peak memory. Precisions: fp32; fp16 (LayerNorm stays fp32:
ExecuTorch's fp16 layer_norm kernel is wrong); int8 (dynamic: int8 weights and activations
in every Linear, embeddings and convolutions fp32; ONNX quantises every MatMul the same way after
export, mobile.quantize_onnx). ONNX is exported in fp32 and int8, not fp16.
"""
import os
import subprocess
import sys
import time

import torch

from checkpoint import load_generator
from configurator import configure
from data import control_map, save_grid, to_uint8
from mobile import (PRECISIONS, Method, as_tuple, export_onnx, export_pte, exported_parts, generate, generator_methods,
                    in_precision, initial_noise, input_names, load_part, quantize_onnx, require_export_packages,
                    save_manifest, save_tokenizer)
from model import SIZES, wake_up
from procedural import make_shapes
from text import MAX_TOKENS, load_text_encoder
from vae import WaveletVAE, check_image_size, load_vae, psnr

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py or distill.py run; '' = the newest under out*/
model_size = ''  # 'tiny', 'small' or 'base': export an untrained model of that size instead (files, memory, speed)
size = 0  # image side in pixels; 0 = the run's training size (512 for an untrained model)
precision = 'fp32'  # 'fp32', 'fp16' or 'int8'
backend = 'xnnpack'  # 'xnnpack' (the phone's CPU delegate) or 'portable' (reference kernels: quick to export, slow)
pte = True  # export and check ExecuTorch programs (the phone's); False: ONNX only, as the web page needs
onnx = True  # also export and check ONNX models (fp32 and int8)
iters = 0  # core iterations r of the checks and run_mobile.py's default (any r runs); 0 = the run's sample_iters
steps = 0  # sampling steps of the pipeline check; 0 = 25 Euler steps, or 2 for a distilled student
cfg_scale = 4.0
prompt = ''  # the pipeline check's prompt; '' = the run's first held-out prompt
export_dir = ''  # '' = OUT_DIR/mobile-<precision>, or out-mobile-<size>-<side>-<precision> for an untrained model
seed = 0
# -----------------------------------------------------------------------------
configure(globals(), choices=dict(precision=tuple(PRECISIONS), backend=('xnnpack', 'portable'),
                                 model_size=('', *SIZES)))
FP32_TOLERANCE = 1e-4  # max |exported - eager| / max |eager|
formats = (['pte'] if pte else []) + (['onnx'] if onnx and precision != 'fp16' else [])
if not formats:
    raise SystemExit("error: nothing to export: fp16 has no ONNX files, so keep --pte=True"
                     if onnx else "error: nothing to export: --pte=False and --onnx=False")
if onnx and precision == 'fp16':
    print("ONNX is exported in fp32 and int8: fp16 writes .pte files")


def check_part(export_dir, part, fmt, methods, references, precision):
    """Run each method of an exported part on the inputs PyTorch saw; -> a report row."""
    start = time.time()
    execute = load_part(export_dir, part, fmt, PRECISIONS[precision], input_names(methods))
    for name, (_, inputs) in methods.items():
        execute(name, **inputs)  # the first call loads the method (ExecuTorch) or the session (ONNX)
    row = dict(part=part, format=fmt, cold_start_s=time.time() - start, latency_ms={}, max_diff={}, relative_diff={})
    for name, (_, inputs) in methods.items():
        times = []
        for _ in range(3):
            start = time.time()
            outputs = execute(name, **inputs)
            times.append(time.time() - start)
        row['latency_ms'][name] = 1000 * sorted(times)[1]
        diff = max((y - r).abs().max().item() for y, r in zip(outputs, references[name]))
        scale = max(r.abs().max().item() for r in references[name])
        row['max_diff'][name], row['relative_diff'][name] = diff, diff / scale
    files = [f for f in os.listdir(export_dir) if f.startswith(part) and f.endswith('.' + fmt)]
    row['mb'] = sum(os.path.getsize(os.path.join(export_dir, f)) for f in files) / 1e6
    return row


def check_pipeline(target, manifest, formats, encoder, model, vae):
    """The whole pipeline from the files against the PyTorch one on the same noise, then
    run_mobile.py in a fresh process, whose peak memory is the pipeline's alone."""
    eager = {'text_encoder': encoder, 'generator': model, 'vae_decoder': vae.decode_latent}
    noise = initial_noise(manifest, seed)
    settings = {k: manifest[k] for k in ('steps', 'cfg_scale', 'iters', 'shift', 'sampler')}
    example_map, control_args = None, []
    if manifest['control']:  # a control run draws the prompt in the shape of a drawn shape's control map
        example = make_shapes(1, manifest['image_size'], seed=seed)[0]
        example_map = control_map(example, manifest['control'])
        save_grid(example, os.path.join(target, 'control_example.png'))
        control_args = [f"--control_image={os.path.join(target, 'control_example.png')}"]
    with torch.no_grad():
        torch.manual_seed(seed)  # the Core's noise start, where the run has one (mobile.MobileGenerator)
        reference, _ = generate(eager.get, [manifest['sample_prompt']], noise, **settings,
                                generator=torch.Generator().manual_seed(seed + 1), control_map=example_map)
    results = {}
    for fmt in formats:
        torch.manual_seed(seed)
        image, _ = generate(exported_parts(target, manifest, fmt), [manifest['sample_prompt']], noise, **settings,
                            generator=torch.Generator().manual_seed(seed + 1), control_map=example_map)
        diff = (image - reference).abs().max().item() / reference.abs().max().item()
        image_psnr = psnr(to_uint8(image), to_uint8(reference))
        print(f"pipeline {fmt} ({settings['steps']} {settings['sampler']} steps, r={settings['iters']}): "
              f"max diff {diff:.1e} of scale, image PSNR {image_psnr:.1f} dB against PyTorch")
        if manifest['precision'] == 'fp32' and diff > FP32_TOLERANCE:
            raise SystemExit(f"error: the {fmt} pipeline differs from PyTorch by {diff:.1e} of the output's scale")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run_mobile.py')
        command = [sys.executable, script, f'--export_dir={target}', f'--format={fmt}', f'--seed={seed}', *control_args]
        measured = subprocess.run(command, capture_output=True, text=True)
        if measured.returncode:
            raise SystemExit(f"error: run_mobile.py failed:\n{measured.stderr[-2000:]}")
        print(measured.stdout.strip())
        results[fmt] = dict(relative_diff=diff, psnr_db=image_psnr, run_mobile=measured.stdout.strip())
    return results


require_export_packages()
torch.manual_seed(seed)
if model_size:  # an untrained model: its files, memory and speed are those of a trained one
    model = wake_up(SIZES[model_size](fft_impl='dft')).eval().requires_grad_(False)
    vae = WaveletVAE(blocks_per_stage=2).eval().requires_grad_(False)  # config/pokemon.py's VAE
    run = dict(image_size=512, sampler='euler', sample_iters=4, sample_prompts=['a cute round pokemon with big eyes'])
    side, target = size or 512, export_dir or f'out-mobile-{model_size}-{size or 512}-{precision}'
else:
    model, run, run_dir = load_generator(out_dir, fft_impl='dft')
    vae = load_vae(run['vae_dir'])
    side, target = size or run['image_size'], export_dir or os.path.join(run_dir, f'mobile-{precision}')
iters = iters or run['sample_iters']
try:
    check_image_size(side, side, 16 * model.config.patch_size)
except ValueError as e:
    raise SystemExit(f"error: --size: {e}") from None
encoder = load_text_encoder(model.config.text_encoder)
sampler = run.get('sampler', 'euler')
batch = 1 if sampler == 'consistency' else 2
os.makedirs(target, exist_ok=True)
prompt_text = prompt or run['sample_prompts'][0]

# example inputs from the real pipeline: the prompt's tokens, noise, a mid-way time
save_tokenizer(encoder, os.path.join(target, 'tokenizer.json'))
from tokenizers import Tokenizer
encoding = Tokenizer.from_file(os.path.join(target, 'tokenizer.json')).encode(prompt_text)
ids, attention = torch.tensor([encoding.ids]), torch.tensor([encoding.attention_mask])
with torch.no_grad():
    tokens = encoder.model(input_ids=ids, attention_mask=attention).last_hidden_state
text, mask = tokens.expand(batch, -1, -1).contiguous(), attention.bool().expand(batch, -1).contiguous()
mask[1:, 2:] = False  # the unconditional branch's shorter prompt
latent = torch.randn(batch, model.config.latent_channels, side // 16, side // 16)
parts = {
    'text_encoder': {'forward': (Method(encoder.model,
                                        lambda m, i, a: m(input_ids=i, attention_mask=a).last_hidden_state),
                                 dict(input_ids=ids, attention_mask=attention))},
    'generator': generator_methods(model, latent, torch.full((batch,), 0.7), text, mask),
    'vae_decoder': {'forward': (Method(vae, lambda m, z: m.decode_latent(z)), dict(z=latent[:1]))},
}
dtype = PRECISIONS[precision]
report = []
for part, methods in parts.items():
    with torch.no_grad():
        references = {name: as_tuple(module(*inputs.values())) for name, (module, inputs) in methods.items()}
    exported = in_precision(methods, precision)
    for fmt in formats:
        start = time.time()
        if fmt == 'pte':
            export_pte(exported, os.path.join(target, f'{part}.pte'), backend)
        else:
            for path in export_onnx(methods, target, part):
                if precision == 'int8':
                    quantize_onnx(path)
        export_s = time.time() - start
        row = check_part(target, part, fmt, methods, references, precision) | dict(export_s=export_s)
        report.append(row)
        timings = '; '.join(f"{name} {row['latency_ms'][name]:.0f} ms, max diff {row['max_diff'][name]:.2e} "
                            f"({row['relative_diff'][name]:.1e} of scale)" for name in methods)
        print(f"{part} {fmt}: {row['mb']:.1f} MB, exported in {export_s:.0f} s, "
              f"loaded and run once in {row['cold_start_s']:.2f} s; {timings}", flush=True)
        worst = max(row['relative_diff'].values())
        if precision == 'fp32' and worst > FP32_TOLERANCE:
            raise SystemExit(f"error: the {fmt} export of {part} differs from PyTorch by {worst:.1e} of the output's "
                             f"scale (tolerance {FP32_TOLERANCE:.0e}); do not ship it")

manifest = dict(precision=precision, dtype=str(dtype).split('.')[-1], backend=backend, pte='pte' in formats,
                onnx='onnx' in formats,
                image_size=side, latent_channels=model.config.latent_channels, generator_batch=batch,
                state_init=model.config.state_init,
                control=model.config.control,
                text_encoder=model.config.text_encoder, text_tokens=MAX_TOKENS, sampler=sampler,
                steps=steps or (2 if sampler == 'consistency' else 25), iters=iters, cfg_scale=cfg_scale,
                shift=run.get('shift', 1.0), sample_prompt=prompt_text, untrained=bool(model_size),
                inputs={part: input_names(methods) for part, methods in parts.items()}, checks=report)
save_manifest(target, manifest)  # run_mobile.py reads it
manifest['pipeline'] = check_pipeline(target, manifest, formats, encoder, model, vae)
save_manifest(target, manifest)
print(f"wrote {target}: " + ', '.join(f"{f} {os.path.getsize(os.path.join(target, f)) / 1e6:.1f} MB"
                                     for f in sorted(os.listdir(target)) if f.endswith(('.pte', '.onnx'))))
