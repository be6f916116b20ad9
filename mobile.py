"""
The phone's pipeline as a library: exporting IRIS's parts (export_mobile.py) and running
them from the files alone (run_mobile.py), with ExecuTorch or ONNX Runtime.

The parts, in the order the phone runs them, each loaded when needed and freed after:
    text_encoder  input_ids, attention_mask (1, 77) -> tokens (1, 77, W); tokenizer.json beside it
    generator     prompt (text, mask) -> text_kv, text_cond           once per prompt
                  control (map) -> hint (a control run)               once per control map
                  prelude (z, t, text_cond) -> e, c                   once per step
                  inject (hint, s, c) -> tokens, added to s           before each core (a control run)
                  core (s, e, c, i / r, text_kv, mask) -> s          r times per step
                  coda (s, c) -> velocity                            (ONNX: one file per method)
    vae_decoder   z (1, 16, S/16, S/16) -> image (1, 3, S, S) in [-1, 1]
The core is one method the app calls r times, so r is chosen at run time and the file
holds the shared weights once. Every method's inputs are named where its example inputs are
made (generator_methods, export_mobile.py); the manifest (mobile.json) records those names
in the order of the export, and both runners, load_part here and web/iris.js, feed each input
by its name.
"""
import copy
import importlib
import json
import logging
import os
import resource
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UsageError
from data import control_map
from flow import consistency_sample, euler_sample
from model import FourierMixer, iterate_core
from procedural import make_shapes
from text import MAX_TOKENS, Prompt


def peak_rss_mb():
    """This process's peak resident memory. Linux's VmHWM, because ru_maxrss survives exec
    and so would report the memory of a parent that started this process."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == 'darwin' else 1)


def input_names(methods):
    """{method: its input names, in the export's order}: what the manifest records of a part."""
    return {name: list(inputs) for name, (_, inputs) in methods.items()}


def load_part(export_dir, part, fmt, dtype, inputs):
    """-> execute(method, **tensors) -> list of float32 tensors, over ExecuTorch or ONNX Runtime.
    inputs: {method: input names} (input_names, as the manifest records them): each tensor
    goes in by its name. Inputs are cast to the export's float dtype (fp16 exports take fp16)."""
    if fmt == 'pte':
        from executorch.runtime import Runtime
        program = Runtime.get().load_program(os.path.join(export_dir, f'{part}.pte'))
        methods = {}

        def call(method, named):
            if method not in methods:
                methods[method] = program.load_method(method)
            return methods[method].execute(list(named.values()))  # in the order of the names
    else:
        import onnxruntime
        sessions = {}

        def call(method, named):
            # one ONNX file per method: generator_core.onnx; text_encoder.onnx for 'forward'
            name = part if method == 'forward' else f'{part}_{method}'
            if name not in sessions:
                sessions[name] = onnxruntime.InferenceSession(os.path.join(export_dir, f'{name}.onnx'),
                                                              providers=['CPUExecutionProvider'])
            session = sessions[name]
            feeds = {spec.name: named[spec.name].numpy() for spec in session.get_inputs()}
            return [torch.from_numpy(y) for y in session.run(None, feeds)]

    def execute(method, **tensors):
        names = inputs[method]
        if set(tensors) != set(names):
            raise ValueError(f"{part}.{method} takes {', '.join(names)}, not {', '.join(tensors)}")
        return [y.float() for y in call(method, {name: (tensors[name].to(dtype) if tensors[name].is_floating_point()
                                                        else tensors[name]).contiguous() for name in names})]
    return execute


class MobileTextEncoder:
    """prompts -> text.Prompt (B, L, W), (B, L): the tokenizer.json export_mobile.py saved
    (pads and truncates to the exported length) and the text encoder, one prompt at a time."""

    def __init__(self, execute, tokenizer_path):
        from tokenizers import Tokenizer
        self.execute, self.tokenizer = execute, Tokenizer.from_file(tokenizer_path)

    def __call__(self, prompts):
        tokens, masks = [], []
        for encoding in self.tokenizer.encode_batch(list(prompts)):
            ids = torch.tensor([encoding.ids], dtype=torch.long)
            mask = torch.tensor([encoding.attention_mask], dtype=torch.long)
            tokens.append(self.execute('forward', input_ids=ids, attention_mask=mask)[0])
            masks.append(mask.bool())
        return Prompt(torch.cat(tokens), torch.cat(masks))


class MobileGenerator:
    """model.Iris's encode_prompt, encode_control, velocity and model(z, t, text, mask, iters)
    from the exported methods; flow.py's samplers take it as they take the PyTorch model,
    and encode each prompt (and control map) once per sampling call. state_init: where the
    Core starts, as the run's IrisConfig says: the Prelude's e, or noise drawn as Iris.velocity
    draws it (torch's global generator), so that the same seed draws the same image."""

    def __init__(self, execute, batch, state_init):
        self.execute, self.batch, self.state_init = execute, batch, state_init

    def encode_prompt(self, text, mask):
        return (*self.execute('prompt', text=text, mask=mask), mask)

    def encode_control(self, control_map, strength=1.0):
        return strength * self.execute('control', control_map=control_map)[0]

    def velocity(self, z, t, encoded_prompt, iters, hint=None, exit_tolerance=0.0):
        if len(z) != self.batch:
            raise UsageError(f"this generator was exported for batch {self.batch}, not {len(z)}; "
                             f"re-export it or use its sampler and guidance settings")
        text_kv, text_cond, mask = encoded_prompt
        e, c_base = self.execute('prelude', z=z, t=t, text_cond=text_cond)

        def iteration(i, s):
            if hint is not None:
                s = s + self.execute('inject', hint=hint, s=s, c_base=c_base)[0]
            return self.execute('core', s=s, e=e, c_base=c_base, progress=torch.full((len(z),), i / iters),
                            text_kv=text_kv, mask=mask)[0]
        start = e if self.state_init == 'prelude' else torch.randn(e.shape)  # s_0
        s, used = iterate_core(iteration, start, iters, exit_tolerance)
        return self.execute('coda', s=s, c_base=c_base)[0], used

    def __call__(self, z, t, text, mask, iters):
        return self.velocity(z, t, self.encode_prompt(text, mask), iters)[0]


def generate(get_part, prompts, noise, steps, cfg_scale, iters, shift, sampler, generator, control_map=None,
             exit_tolerance=0.0):
    """Prompts -> (float images (B, 3, H, W) in about [-1, 1], the mean Core iterations a
    sample used). get_part(name) returns the 'text_encoder', 'generator' or 'vae_decoder';
    each is dropped once used, so only one part is in memory at a time. export_mobile.py runs
    this with the PyTorch models too. control_map: a control map (B, 1, H, W) for a control run's
    generator. exit_tolerance > 0: adaptive iterations, at most iters (model.iterate_core)."""
    encoder = get_part('text_encoder')
    prompt, null_prompt = encoder(prompts), encoder([''])
    del encoder
    model = get_part('generator')
    hint = None if control_map is None else model.encode_control(control_map)
    used = []
    iterating = dict(hint=hint, exit_tolerance=exit_tolerance, record_iters=used.append)
    if sampler == 'consistency':
        z = consistency_sample(model, noise, prompt, steps=steps, iters=iters, generator=generator, **iterating)
    else:
        z = euler_sample(model, noise, prompt, null_prompt, steps=steps, cfg_scale=cfg_scale, iters=iters, shift=shift,
                         **iterating)
    iterations = torch.cat(used).mean().item()
    del model
    return get_part('vae_decoder')(z), iterations


def read_manifest(export_dir):
    path = os.path.join(export_dir, 'mobile.json')
    if not os.path.isfile(path):
        raise UsageError(f"no {path}; export first with `python export_mobile.py --out_dir=<run>`")
    with open(path) as f:
        return json.load(f)


def exported_parts(export_dir, manifest, fmt):
    """get_part for generate(): loads each part from export_dir when asked."""
    dtype = getattr(torch, manifest['dtype'])
    if 'inputs' not in manifest or 'state_init' not in manifest:
        raise UsageError(f"{export_dir} names neither its networks' inputs nor the Core's start (an older "
                         f"export_mobile.py); re-export the run with python export_mobile.py --out_dir=<run>")

    def get_part(name):
        execute = load_part(export_dir, name, fmt, dtype, manifest['inputs'][name])
        if name == 'text_encoder':
            return MobileTextEncoder(execute, os.path.join(export_dir, 'tokenizer.json'))
        if name == 'generator':
            return MobileGenerator(execute, manifest['generator_batch'], manifest['state_init'])
        return lambda z: execute('forward', z=z)[0]
    return get_part


def initial_noise(manifest, seed):
    side = manifest['image_size'] // 16
    return torch.randn(1, manifest['latent_channels'], side, side, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# export

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'int8': torch.float32}  # int8: float in, quantised inside
warnings.filterwarnings('ignore', message='.*LeafSpec', category=FutureWarning)  # torch's, raised inside ExecuTorch
# torch.onnx logs a line per torchvision op it could translate; IRIS uses none. onnxscript's
# optimiser logs each constant it could not fold (the text encoder's mask), and leaves it be.
logging.getLogger('torch.onnx._internal.exporter._registration').setLevel(logging.ERROR)
logging.getLogger('onnxscript.optimizer._constant_folding').setLevel(logging.ERROR)


def require_export_packages():
    for name in ('executorch', 'onnx', 'onnxscript', 'onnxruntime'):
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(f"export needs {name}: pip install -r requirements-export.txt") from None


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
    return {name: (method, {k: x.half() if x.is_floating_point() else x for k, x in inputs.items()})
            for name, (method, inputs) in methods.items()}


def xnnpack_partitioner():
    """XNNPACK's, less its GELU, which ignores approximate='tanh' and computes the erf form
    (bench.py --sections=runtime shows how far apart): ExecuTorch's own kernel honours it."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS, GeluConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    return XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c is not GeluConfig])


def export_pte(methods, path, backend):
    """methods: {name: (module, {input name: example input})} -> one .pte holding every method."""
    from executorch.exir import to_edge_transform_and_lower
    for module, _ in methods.values():
        if any(isinstance(m, FourierMixer) and m.fft_impl != 'dft' for m in module.modules()):
            raise UsageError("ExecuTorch has no complex tensors, so it cannot run torch.fft; build the "
                             "generator with fft_impl='dft' (load_generator(out_dir, fft_impl='dft'), as "
                             "export_mobile.py does)")
    with torch.no_grad():
        programs = {name: torch.export.export(module, tuple(inputs.values()))
                    for name, (module, inputs) in methods.items()}
    partitioners = [xnnpack_partitioner()] if backend == 'xnnpack' else []
    program = to_edge_transform_and_lower(programs, partitioner=partitioners).to_executorch()
    with open(path + '.tmp', 'wb') as f:  # a stopped export leaves no half-written program behind
        program.write_to_file(f)
    os.replace(path + '.tmp', path)


def export_onnx(methods, export_dir, part):
    """One fp32 ONNX file per method: text_encoder.onnx, generator_core.onnx, ... -> their paths
    (int8: quantize_onnx each). Each file's inputs carry the methods' input names."""
    paths = []
    for name, (module, inputs) in methods.items():
        paths.append(os.path.join(export_dir, part if name == 'forward' else f'{part}_{name}') + '.onnx')
        with torch.no_grad():
            torch.onnx.export(module, tuple(inputs.values()), paths[-1], input_names=list(inputs), dynamo=True,
                              opset_version=18, external_data=False, verbose=False)
    return paths


def quantize_onnx(path):
    """Dynamic int8, in place (ONNX Runtime's quantize_dynamic): int8 weights per output
    channel in every x W of a MatMul or Gemm, activations quantised per call; embeddings,
    convolutions and the constant matrices that multiply from the left (the DFT, the Manhattan
    decay) stay fp32, as do the batched block-diagonal gates, whose per-channel zero points
    ONNX Runtime's fused kernel rejects. reduce_range keeps the weights to 7 bits: x86 CPUs
    without VNNI saturate 8-bit products and the browser's WASM kernels do not, so with 8 bits
    the page and run_mobile.py draw visibly different images from the same file (docs/export.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    graph = onnx.load(path).graph
    ranks = {tensor.name: len(tensor.dims) for tensor in graph.initializer}
    batched = [node.name for node in graph.node if node.op_type == 'MatMul' and ranks.get(node.input[1], 2) != 2]
    logging.disable(logging.WARNING)  # it advises, on the root logger, a pre-processing pass it does not need
    try:
        quantize_dynamic(path, path + '.tmp', weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=['MatMul', 'Gemm'], nodes_to_exclude=batched)
    finally:
        logging.disable(logging.NOTSET)
    os.replace(path + '.tmp', path)


def as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def generator_methods(model, z, t, text, mask):
    """The generator's stages (and a control run's two more), with example inputs from a real forward pass."""
    hw = (z.shape[-2] // model.config.patch_size, z.shape[-1] // model.config.patch_size)
    progress = torch.full((len(z),), 0.5)  # half-way through the core iterations

    def core(m, s, e, c_base, progress, text_kv, mask):  # one iteration, all it needs computed inside
        prepared = [layer.mixer.prepare(hw) for layer in m.core]
        return m.core_iteration(s, e, m.core_condition(c_base, progress), text_kv, mask, hw, prepared)
    with torch.no_grad():
        text_kv, text_cond, _ = (x.contiguous() for x in model.encode_prompt(text, mask))
        e, c_base = (x.contiguous() for x in model.prelude_forward(z, t, text_cond))
        s = core(model, e, e, c_base, progress, text_kv, mask).contiguous()
    methods = {'prompt': (Method(model, lambda m, *x: m.encode_prompt(*x)[:2]), dict(text=text, mask=mask)),
               'prelude': (Method(model, lambda m, *x: m.prelude_forward(*x)), dict(z=z, t=t, text_cond=text_cond)),
               'core': (Method(model, core), dict(s=s, e=e, c_base=c_base, progress=progress, text_kv=text_kv,
                                                  mask=mask)),
               'coda': (Method(model, lambda m, *x: m.coda_forward(*x, hw)), dict(s=s, c_base=c_base))}
    if model.control_adapter is not None:  # control map -> hint, once per map; the app repeats it per branch
        example_map = control_map(make_shapes(1, 16 * z.shape[-1], seed=0)[0], model.config.control)
        with torch.no_grad():
            hint = model.encode_control(example_map).expand(len(z), -1, -1).contiguous()
        methods['control'] = (Method(model, lambda m, x: m.encode_control(x)), dict(control_map=example_map))
        methods['inject'] = (Method(model, lambda m, *x: m.control_adapter.inject(*x)), dict(hint=hint, s=e,
                                                                                               c_base=c_base))
    return methods


def save_tokenizer(encoder, path):
    """The tokenizer as one tokenizer.json that pads and truncates to the exported length:
    a phone runs it with the same Rust/C++ library (tokenizers, or pytorch-tokenizers)."""
    tokenizer = copy.deepcopy(encoder.tokenizer.backend_tokenizer)
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(length=MAX_TOKENS, pad_id=encoder.tokenizer.pad_token_id,
                             pad_token=encoder.tokenizer.pad_token)
    tokenizer.save(path)


def save_manifest(target, manifest):
    with open(os.path.join(target, 'mobile.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
