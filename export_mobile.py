"""
Export IRIS for phones: the text encoder, the generator and the VAE decoder, each as an
ExecuTorch program (.pte, XNNPACK delegate) and ONNX (opset 18, weights inside the file), and
check every export on this machine against PyTorch before trusting it.

    pip install -r requirements-export.txt                  # executorch, onnx, onnxruntime
    python export_mobile.py config/shapes.py                # the trained shapes run, fp32
    python export_mobile.py --out_dir=out-shapes-cd --precision=fp16
    python export_mobile.py --model_size=small --size=512 --precision=int8   # untrained: files, memory, speed
    python run_mobile.py out-shapes-flow/mobile-fp32         # the phone's pipeline from the files alone

What is exported, at a fixed image size and batch (ExecuTorch plans memory ahead):
    text_encoder  input_ids, attention_mask (1, 77) -> tokens (1, 77, W); tokenizer.json beside it
    generator     prompt (text, mask) -> text_kv, text_cond           once per prompt
                  prelude (z, t, text_cond) -> e, c                   once per step
                  core (s, e, c, i / r, text_kv, mask) -> s          the app runs it r times
                  coda (s, c) -> velocity                            (ONNX: one file per method)
                  control (map) -> tokens, added to e; a control run only  once per control image
    vae_decoder   z (1, 16, S/16, S/16) -> image (1, 3, S, S) in [-1, 1]
The generator's batch is 2 for a train_flow.py run (guidance runs both prompts at once)
and 1 for a distill.py student.

Each export is run right away (ExecuTorch's runtime, ONNX Runtime) on the inputs PyTorch
saw; the script prints the max difference, file size, time to load and run once, and
latency, and stops if an fp32 export is off by more than 1e-4 of the output's scale. Then
the whole pipeline runs from the files (run_mobile.py) against PyTorch, and once more in
a fresh process to measure its peak memory. Precisions: fp32; fp16 (LayerNorm stays fp32:
ExecuTorch's fp16 layer_norm kernel is wrong); int8 (dynamic: int8 weights and activations
in every Linear, embeddings and convolutions fp32). ONNX is exported in fp32 only.
"""
import copy
import importlib
import json
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import configure
from data import control_map, make_shapes, save_grid, to_uint8
from model import SIZES, FourierMixer, load_generator, wake_up
from run_mobile import exported_parts, generate, initial_noise, load_part
from text import MAX_TOKENS, load_text_encoder
from vae import WaveletVAE, check_image_size, load_vae, psnr

# -----------------------------------------------------------------------------
out_dir = ''  # a train_flow.py or distill.py run; '' = the newest under out*/
model_size = ''  # 'tiny', 'small' or 'base': export an untrained model of that size instead (files, memory, speed)
size = 0  # image side in pixels; 0 = the run's training size (512 for an untrained model)
precision = 'fp32'  # 'fp32', 'fp16' or 'int8'
backend = 'xnnpack'  # 'xnnpack' (the phone's CPU delegate) or 'portable' (reference kernels: quick to export, slow to run)
onnx = True  # also export and check ONNX models (fp32 only)
iters = 4  # core iterations r of the checks and the default of run_mobile.py (any r runs)
steps = 0  # sampling steps of the pipeline check; 0 = 25 Euler steps, or 2 for a distilled student
cfg_scale = 4.0
prompt = ''  # the pipeline check's prompt; '' = the run's first held-out prompt
export_dir = ''  # '' = OUT_DIR/mobile-<precision>, or out-mobile-<size>-<side>-<precision> for an untrained model
seed = 0
# -----------------------------------------------------------------------------
PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'int8': torch.float32}  # int8: float inputs, quantised inside
FP32_TOLERANCE = 1e-4  # max |exported - eager| / max |eager|
warnings.filterwarnings('ignore', message='.*LeafSpec', category=FutureWarning)  # torch's, raised inside ExecuTorch


def require_export_packages():
    for name in ('executorch', 'onnx', 'onnxscript', 'onnxruntime'):
        try:
            importlib.import_module(name)
        except ImportError:
            raise SystemExit(f"error: export needs {name}: pip install -r requirements-export.txt") from None


class Method(nn.Module):
    """fn(module, *inputs) as a module's forward: one exported method of module."""

    def __init__(self, module, fn):
        super().__init__()
        self.module, self.fn = module, fn
        self.training = module.training  # exporters warn about a wrapper left in training mode

    def forward(self, *inputs):
        return self.fn(self.module, *inputs)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 inside an fp16 model: ExecuTorch's fp16 layer_norm kernel
    is wrong at our widths (bench.py --sections=runtime; its group_norm is right)."""

    def forward(self, x):
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def in_precision(methods, precision):
    """One part's methods, {name: (Method, inputs)}, over a copy of the module they share:
    fp16 weights with fp32 LayerNorms and fp16 inputs; or dynamic int8 in every Linear
    (int8 weights per output channel, activations quantised per call: torchao's 8da8w,
    ExecuTorch's LLM recipe), embeddings and convolutions left fp32; fp32 returns them as they are."""
    if precision == 'fp32':
        return methods
    methods = copy.deepcopy(methods)  # one deepcopy: the methods keep sharing one copy of the module
    module = next(iter(methods.values()))[0].module
    if precision == 'int8':
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis
        quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                  filter_fn=lambda m, name: isinstance(m, nn.Linear))
        return methods
    module.half()
    for m in module.modules():
        if type(m) is nn.LayerNorm:
            m.__class__ = Float32LayerNorm
    return {name: (method, tuple(x.half() if x.is_floating_point() else x for x in inputs))
            for name, (method, inputs) in methods.items()}


def xnnpack_partitioner():
    """XNNPACK's, less its GELU, which ignores approximate='tanh' and computes the erf form
    (4.7e-4 apart, bench.py --sections=runtime): ExecuTorch's own kernel honours it."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS, GeluConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    return XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c is not GeluConfig])


def export_pte(methods, path, backend):
    """methods: {name: (module, example inputs)} -> one .pte holding every method."""
    from executorch.exir import to_edge_transform_and_lower
    for module, _ in methods.values():
        if any(isinstance(m, FourierMixer) and m.fft_impl != 'dft' for m in module.modules()):
            raise SystemExit("error: ExecuTorch has no complex tensors, so it cannot run torch.fft; build the generator "
                             "with fft_impl='dft' (load_generator(out_dir, fft_impl='dft'), as export_mobile.py does)")
    with torch.no_grad():
        programs = {name: torch.export.export(module, inputs) for name, (module, inputs) in methods.items()}
    partitioners = [xnnpack_partitioner()] if backend == 'xnnpack' else []
    program = to_edge_transform_and_lower(programs, partitioner=partitioners).to_executorch()
    with open(path + '.tmp', 'wb') as f:  # a stopped export leaves no half-written program behind
        program.write_to_file(f)
    os.replace(path + '.tmp', path)


def export_onnx(methods, export_dir, part):
    """One ONNX file per method: text_encoder.onnx, generator_core.onnx, ..."""
    for name, (module, inputs) in methods.items():
        path = os.path.join(export_dir, part if name == 'forward' else f'{part}_{name}') + '.onnx'
        with torch.no_grad():
            torch.onnx.export(module, inputs, path, dynamo=True, opset_version=18, external_data=False, verbose=False)


def check_part(export_dir, part, fmt, methods, references, precision):
    """Run each method of an exported part on the inputs PyTorch saw; -> a report row."""
    start = time.time()
    run = load_part(export_dir, part, fmt, PRECISIONS[precision])
    for name, (_, inputs) in methods.items():
        run(name, *inputs)  # the first call loads the method (ExecuTorch) or the session (ONNX)
    row = dict(part=part, format=fmt, cold_start_s=time.time() - start, latency_ms={}, max_diff={}, relative_diff={})
    for name, (_, inputs) in methods.items():
        times = []
        for _ in range(3):
            start = time.time()
            outputs = run(name, *inputs)
            times.append(time.time() - start)
        row['latency_ms'][name] = 1000 * sorted(times)[1]
        diff = max((y - r).abs().max().item() for y, r in zip(outputs, references[name]))
        scale = max(r.abs().max().item() for r in references[name])
        row['max_diff'][name], row['relative_diff'][name] = diff, diff / scale
    files = [f for f in os.listdir(export_dir) if f.startswith(part) and f.endswith('.' + fmt)]
    row['mb'] = sum(os.path.getsize(os.path.join(export_dir, f)) for f in files) / 1e6
    return row


def as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def generator_methods(model, z, t, text, mask):
    """The generator's four stages, each with example inputs taken from a real forward pass."""
    hw = (z.shape[-2] // model.config.patch_size, z.shape[-1] // model.config.patch_size)
    progress = torch.full((len(z),), 0.5)  # half-way through the core iterations
    with torch.no_grad():
        text_kv, text_cond, _ = (x.contiguous() for x in model.encode_prompt(text, mask))
        e, c_base = (x.contiguous() for x in model.prelude_forward(z, t, text_cond))
        s = model.core_iteration(e, e, c_base, progress, text_kv, mask, hw).contiguous()
    methods = {'prompt': (Method(model, lambda m, *x: m.encode_prompt(*x)[:2]), (text, mask)),
               'prelude': (Method(model, lambda m, *x: m.prelude_forward(*x)), (z, t, text_cond)),
               'core': (Method(model, lambda m, *x: m.core_iteration(*x, hw)), (s, e, c_base, progress, text_kv, mask)),
               'coda': (Method(model, lambda m, *x: m.coda_forward(*x, hw)), (s, c_base))}
    if model.control_adapter is not None:  # control image -> tokens, once per image; the app adds them to e
        control = control_map(make_shapes(len(z), 16 * z.shape[-1], seed=0)[0], model.config.control)
        methods['control'] = (Method(model, lambda m, x: m.encode_control(x)), (control,))
    return methods


def save_tokenizer(encoder, path):
    """The tokenizer as one tokenizer.json that pads and truncates to the exported length:
    a phone runs it with the same Rust/C++ library (tokenizers, or pytorch-tokenizers)."""
    tokenizer = copy.deepcopy(encoder.tokenizer.backend_tokenizer)
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(length=MAX_TOKENS, pad_id=encoder.tokenizer.pad_token_id, pad_token=encoder.tokenizer.pad_token)
    tokenizer.save(path)


def save_manifest(target, manifest):
    with open(os.path.join(target, 'mobile.json'), 'w') as f:
        json.dump(manifest, f, indent=1)


def check_pipeline(target, manifest, formats, encoder, model, vae):
    """The whole pipeline from the files against the PyTorch one on the same noise, then
    run_mobile.py in a fresh process, whose peak memory is the pipeline's alone."""
    eager = {'text_encoder': encoder, 'generator': model, 'vae_decoder': vae.decode_latent}
    noise = initial_noise(manifest, seed)
    settings = (manifest['steps'], manifest['cfg_scale'], manifest['iters'], manifest['shift'], manifest['sampler'])
    control, control_args = None, []
    if manifest['control']:  # a control run draws the prompt in the shape of a drawn shape's control map
        example = make_shapes(1, manifest['image_size'], seed=seed)[0]
        control = control_map(example, manifest['control'])
        save_grid(example, os.path.join(target, 'control_example.png'))
        control_args = ['--control', os.path.join(target, 'control_example.png')]
    with torch.no_grad():
        reference = generate(eager.get, [manifest['sample_prompt']], noise, *settings, torch.Generator().manual_seed(seed + 1),
                             control)
    results = {}
    for fmt in formats:
        image = generate(exported_parts(target, manifest, fmt), [manifest['sample_prompt']], noise, *settings,
                         torch.Generator().manual_seed(seed + 1), control)
        diff = (image - reference).abs().max().item() / reference.abs().max().item()
        image_psnr = psnr(to_uint8(image), to_uint8(reference))
        print(f"pipeline {fmt} ({settings[0]} {settings[4]} steps, r={settings[2]}): max diff {diff:.1e} of scale, "
              f"image PSNR {image_psnr:.1f} dB against PyTorch")
        if manifest['precision'] == 'fp32' and diff > FP32_TOLERANCE:
            raise SystemExit(f"error: the {fmt} pipeline differs from PyTorch by {diff:.1e} of the output's scale")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run_mobile.py')
        measured = subprocess.run([sys.executable, script, target, '--format', fmt, '--seed', str(seed), *control_args],
                                  capture_output=True, text=True)
        if measured.returncode:
            raise SystemExit(f"error: run_mobile.py failed:\n{measured.stderr[-2000:]}")
        print(measured.stdout.strip())
        results[fmt] = dict(relative_diff=diff, psnr_db=image_psnr, run_mobile=measured.stdout.strip())
    return results


def main():
    if precision not in PRECISIONS:
        raise SystemExit(f"error: --precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if backend not in ('xnnpack', 'portable'):
        raise SystemExit(f"error: --backend must be 'xnnpack' or 'portable', not {backend!r}")
    if model_size and model_size not in SIZES:
        raise SystemExit(f"error: --model_size must be one of {', '.join(SIZES)} (or '' for a trained run), not {model_size!r}")
    require_export_packages()
    torch.manual_seed(seed)
    if model_size:  # an untrained model: its files, memory and speed are those of a trained one
        model = wake_up(SIZES[model_size](fft_impl='dft')).eval().requires_grad_(False)
        vae = WaveletVAE(blocks_per_stage=2).eval().requires_grad_(False)  # config/pokemon.py's VAE
        run = dict(image_size=512, sampler='euler', sample_prompts=['a cute round pokemon with big eyes'])
        side, target = size or 512, export_dir or f'out-mobile-{model_size}-{size or 512}-{precision}'
    else:
        model, run, run_dir = load_generator(out_dir, fft_impl='dft')
        vae = load_vae(run['vae_dir'])
        side, target = size or run['image_size'], export_dir or os.path.join(run_dir, f'mobile-{precision}')
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
        'text_encoder': {'forward': (Method(encoder.model, lambda m, i, a: m(input_ids=i, attention_mask=a).last_hidden_state),
                                     (ids, attention))},
        'generator': generator_methods(model, latent, torch.full((batch,), 0.7), text, mask),
        'vae_decoder': {'forward': (Method(vae, lambda m, z: m.decode_latent(z)), (latent[:1],))},
    }
    dtype = PRECISIONS[precision]
    formats = ['pte'] + (['onnx'] if onnx and precision == 'fp32' else [])
    if onnx and precision != 'fp32':
        print(f"ONNX is exported in fp32 only: {precision} writes .pte files")
    report = []
    for part, methods in parts.items():
        with torch.no_grad():
            references = {name: as_tuple(module(*inputs)) for name, (module, inputs) in methods.items()}
        exported = in_precision(methods, precision)
        for fmt in formats:
            start = time.time()
            if fmt == 'pte':
                export_pte(exported, os.path.join(target, f'{part}.pte'), backend)
            else:
                export_onnx(methods, target, part)
            export_s = time.time() - start
            row = check_part(target, part, fmt, methods, references, precision) | dict(export_s=export_s)
            report.append(row)
            print(f"{part} {fmt}: {row['mb']:.1f} MB, exported in {export_s:.0f} s, loaded and run once in {row['cold_start_s']:.2f} s; "
                  + '; '.join(f"{name} {row['latency_ms'][name]:.0f} ms, max diff {row['max_diff'][name]:.2e} "
                              f"({row['relative_diff'][name]:.1e} of scale)" for name in methods), flush=True)
            worst = max(row['relative_diff'].values())
            if precision == 'fp32' and worst > FP32_TOLERANCE:
                raise SystemExit(f"error: the {fmt} export of {part} differs from PyTorch by {worst:.1e} of the output's "
                                 f"scale (tolerance {FP32_TOLERANCE:.0e}); do not ship it")

    manifest = dict(precision=precision, dtype=str(dtype).split('.')[-1], backend=backend, onnx='onnx' in formats,
                    image_size=side, latent_channels=model.config.latent_channels, generator_batch=batch,
                    control=model.config.control,
                    text_encoder=model.config.text_encoder, text_tokens=MAX_TOKENS, sampler=sampler,
                    steps=steps or (2 if sampler == 'consistency' else 25), iters=iters, cfg_scale=cfg_scale,
                    shift=1.0, sample_prompt=prompt_text, untrained=bool(model_size), checks=report)
    save_manifest(target, manifest)  # run_mobile.py reads it
    manifest['pipeline'] = check_pipeline(target, manifest, formats, encoder, model, vae)
    save_manifest(target, manifest)
    print(f"wrote {target}: " + ', '.join(f"{f} {os.path.getsize(os.path.join(target, f)) / 1e6:.1f} MB"
                                         for f in sorted(os.listdir(target)) if f.endswith(('.pte', '.onnx'))))


if __name__ == '__main__':
    configure(globals(), positive=('iters',))
    main()
