"""
Text to image from the files export_mobile.py wrote, and nothing else: no model code, no
checkpoint. This is what the phone app does, run on this machine with the same runtimes
(ExecuTorch's, or ONNX Runtime), and it reports the process's peak memory.

    python run_mobile.py out-shapes-flow/mobile-fp32 --prompt "a large red circle in the center on a blue background"
    python run_mobile.py out-mobile-small-512-fp16 --iters 8 --steps 10 --output small.png
    python run_mobile.py out-mobile-small-512-fp32 --format onnx
    python run_mobile.py out-shapes-edges/mobile-fp32 --control photo.png   # a control run: photo.png's edges

The parts are loaded one at a time and freed after use (text encoder, then generator,
then VAE decoder), so peak memory is the largest part plus activations, not their sum.
The generator is four methods (prompt, prelude, core, coda): the app encodes the prompt
once, runs prelude and coda once per step and the core r times per step, so r is chosen
at run time, as with sample.py --iters. A control run's generator has a fifth method,
control, run once per control map; its tokens are added to the prelude's output.
"""
import importlib
import json
import os
import resource
import sys
import time

import numpy as np
import torch

from flow import consistency_sample, euler_sample


def peak_rss_mb():
    """This process's peak resident memory. Linux's VmHWM, because ru_maxrss survives exec
    and so would report the memory of a parent that started this process."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == 'darwin' else 1)


def load_part(export_dir, part, fmt, dtype):
    """-> run(method, *tensors) -> list of float32 tensors, over ExecuTorch or ONNX Runtime.
    Inputs are cast to the export's float dtype (fp16 exports take fp16)."""
    if fmt == 'pte':
        from executorch.runtime import Runtime
        program = Runtime.get().load_program(os.path.join(export_dir, f'{part}.pte'))
        methods = {}

        def call(method, inputs):
            if method not in methods:
                methods[method] = program.load_method(method)
            return methods[method].execute(inputs)
    else:
        import onnxruntime
        sessions = {}

        def call(method, inputs):
            # one ONNX file per method: generator_core.onnx; text_encoder.onnx for 'forward'
            name = part if method == 'forward' else f'{part}_{method}'
            if name not in sessions:
                sessions[name] = onnxruntime.InferenceSession(os.path.join(export_dir, f'{name}.onnx'),
                                                              providers=['CPUExecutionProvider'])
            session = sessions[name]
            feeds = {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), inputs)}
            return [torch.from_numpy(y) for y in session.run(None, feeds)]

    def run(method, *tensors):
        inputs = [(x.to(dtype) if x.is_floating_point() else x).contiguous() for x in tensors]
        return [y.float() for y in call(method, inputs)]
    return run


class MobileTextEncoder:
    """prompts -> tokens (B, L, W), mask (B, L): the tokenizer.json export_mobile.py saved
    (pads and truncates to the exported length) and the text encoder, one prompt at a time."""

    def __init__(self, run, tokenizer_path):
        from tokenizers import Tokenizer
        self.run, self.tokenizer = run, Tokenizer.from_file(tokenizer_path)

    def __call__(self, prompts):
        tokens, masks = [], []
        for encoding in self.tokenizer.encode_batch(list(prompts)):
            ids = torch.tensor([encoding.ids], dtype=torch.long)
            mask = torch.tensor([encoding.attention_mask], dtype=torch.long)
            tokens.append(self.run('forward', ids, mask)[0])
            masks.append(mask.bool())
        return torch.cat(tokens), torch.cat(masks)


class MobileGenerator:
    """model.Iris's encode_prompt, velocity and model(z, t, text, mask, iters) -> velocity
    from the four exported methods; flow.py's samplers take it as they take the PyTorch
    model, and encode each prompt once per sampling call."""

    def __init__(self, run, batch):
        self.run, self.batch = run, batch

    def encode_prompt(self, text, mask):
        return (*self.run('prompt', text, mask), mask)

    def encode_control(self, control, strength=1.0):
        return strength * self.run('control', control)[0]

    def velocity(self, z, t, prompt, iters, control=None):
        if len(z) != self.batch:
            raise SystemExit(f"error: this generator was exported for batch {self.batch}, not {len(z)}; "
                             f"re-export it or use its sampler and guidance settings")
        text_kv, text_cond, mask = prompt
        e, c_base = self.run('prelude', z, t, text_cond)
        if control is not None:
            e = e + control
        s = e
        for i in range(iters):
            s = self.run('core', s, e, c_base, torch.full((len(z),), i / iters), text_kv, mask)[0]
        return self.run('coda', s, c_base)[0]

    def __call__(self, z, t, text, mask, iters):
        return self.velocity(z, t, self.encode_prompt(text, mask), iters)


def generate(get_part, prompts, noise, steps, cfg_scale, iters, shift, sampler, generator, control=None):
    """Prompts -> float images (B, 3, H, W) in about [-1, 1]. get_part(name) returns the
    'text_encoder', 'generator' or 'vae_decoder'; each is dropped once used, so only one
    part is in memory at a time. export_mobile.py runs this with the PyTorch models too.
    control: a control map (B, 1, H, W) for a control run's generator."""
    encoder = get_part('text_encoder')
    text, mask = encoder(prompts)
    null_text, null_mask = encoder([''])
    del encoder
    model = get_part('generator')
    control = None if control is None else model.encode_control(control)
    if sampler == 'consistency':
        z = consistency_sample(model, noise, text, mask, steps, iters, generator, control=control)
    else:
        z = euler_sample(model, noise, text, mask, null_text, null_mask, steps, cfg_scale, iters, shift, control=control)
    del model
    return get_part('vae_decoder')(z)


def read_manifest(export_dir):
    path = os.path.join(export_dir, 'mobile.json')
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}; export first with `python export_mobile.py --out_dir=<run>`")
    with open(path) as f:
        return json.load(f)


def exported_parts(export_dir, manifest, fmt):
    """get_part for generate(): loads each part from export_dir when asked."""
    dtype = getattr(torch, manifest['dtype'])

    def get_part(name):
        run = load_part(export_dir, name, fmt, dtype)
        if name == 'text_encoder':
            return MobileTextEncoder(run, os.path.join(export_dir, 'tokenizer.json'))
        if name == 'generator':
            return MobileGenerator(run, manifest['generator_batch'])
        return lambda z: run('forward', z)[0]
    return get_part


def initial_noise(manifest, seed):
    side = manifest['image_size'] // 16
    return torch.randn(1, manifest['latent_channels'], side, side, generator=torch.Generator().manual_seed(seed))


if __name__ == '__main__':
    import argparse
    from data import save_grid, to_uint8
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('export_dir')
    parser.add_argument('--prompt', default='', help="'' = the run's first held-out prompt")
    parser.add_argument('--format', default='pte', choices=['pte', 'onnx'])
    parser.add_argument('--steps', type=int, default=0, help="0 = the export's default")
    parser.add_argument('--iters', type=int, default=0, help="core iterations r; 0 = the export's default")
    parser.add_argument('--cfg_scale', type=float, default=0, help="0 = the export's default")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--control', default='', help="a control run: an image whose edges (or silhouette) to follow")
    parser.add_argument('--output', default='', help="'' = EXPORT_DIR/sample-<format>.png")
    args = parser.parse_args()
    manifest = read_manifest(args.export_dir)
    prompt = args.prompt or manifest['sample_prompt']
    if not prompt.strip():
        raise SystemExit("error: --prompt is empty; write what to draw")
    steps, iters = args.steps or manifest['steps'], args.iters or manifest['iters']
    cfg_scale = args.cfg_scale or manifest['cfg_scale']
    if steps < 1 or iters < 1:
        raise SystemExit("error: --steps and --iters must be at least 1")
    if args.format == 'onnx' and not manifest['onnx']:
        raise SystemExit(f"error: {args.export_dir} has no ONNX files ({manifest['precision']} exports are .pte only)")
    control = None
    if args.control:
        if not manifest.get('control'):
            raise SystemExit(f"error: {args.export_dir} is not a control run's export; drop --control")
        from PIL import Image
        from data import control_map, to_square_rgb
        try:
            picture = to_square_rgb(Image.open(args.control), manifest['image_size'])
        except OSError as e:
            raise SystemExit(f"error: cannot read --control {args.control} ({type(e).__name__}); give a PNG or JPEG") from None
        control = control_map(torch.from_numpy(np.asarray(picture)).permute(2, 0, 1)[None], manifest['control'])
    importlib.import_module('executorch.runtime' if args.format == 'pte' else 'onnxruntime')
    imports_mb = peak_rss_mb()  # Python, torch and the runtime, before any model
    start = time.time()
    image = generate(exported_parts(args.export_dir, manifest, args.format), [prompt], initial_noise(manifest, args.seed),
                     steps, cfg_scale, iters, manifest['shift'], manifest['sampler'],
                     torch.Generator().manual_seed(args.seed + 1), control)
    seconds = time.time() - start
    output = args.output or os.path.join(args.export_dir, f'sample-{args.format}.png')
    save_grid(to_uint8(image), output, columns=1)
    print(f"wrote {output}: {manifest['image_size']}px, {steps} {manifest['sampler']} steps, r={iters}, "
          f"{manifest['precision']} {args.format}, {seconds:.1f} s")
    print(f"peak RSS {peak_rss_mb():.0f} MB ({imports_mb:.0f} MB before loading a model: Python, torch, the runtime)")
