"""
Measures what the README claims about the generator on this machine, as tables:

    python bench.py                          # the default sections, in minutes
    python bench.py --sections=mixer,scan    # of: params, mixer, scan, step, latency, flops, train, memory,
                                             #     kernels, compile, runtime, browser
    python bench.py --threads=1
    python bench.py config/shapes.py         # the quickstart's own models: train, memory and kernels
    python bench.py --sections=memory config/pokemon.py config/pokemon_long.py   # config files apply in order
    python bench.py --sections=browser --export_dirs=out-shapes-flow/mobile-fp32

  params   parameters per component of iris_tiny / small / base
  mixer    forward+backward time of one GRFM core layer against the same layer with full
           self-attention (F.scaled_dot_product_attention) in its place, 64 .. 4096 tokens,
           side by side in one run; also the two token mixers alone
  scan     the parallel scan (model.linear_scan) against the loop over tokens (model.sequential_scan),
           fwd+bwd, and the scan's chunk length
  step     one guided sampling step of iris_small at 512 px, r = 4, with the prompt encoded in
           the step and once per sampling call (Iris.encode_prompt)
  latency  one generator forward (batch 1, 77 text tokens) at 256 and 512 px for r = 4, 8,
           16, with the process's peak RSS, and the VAE decoder
  flops    this machine's fp32 matmul peak, and the FLOP/s the generator reaches
  train    (the default with a config file) ms per training step of the config's VAE and generator
           as their scripts train them (their batch, r, optimizer: AdamW or Muon; fp32 on this CPU),
           the optimizer's step alone, and the minutes max_steps of them take
  memory   (not in the default; minutes, 25 on a CPU without native bf16) one training step
           of each stage of the config, as a GPU would run it (autocast in --dtype): the memory
           it holds (weights, gradients, AdamW, EMA, the activations autograd saves), its
           FLOPs and kernels, and from those an estimate of its time on a T4 (assumptions
           printed with it)
  kernels  (not in the default; 3 minutes) the kernels one training step of the config's generator
           launches, GRFM against attention in its place
  compile  (not in the default; 6 minutes with inductor's cache cold) train_flow.py's step on
           the config, eager and with compile=True (each Core layer compiled), with either FFT:
           time to compile, ms and kernels per step, graphs compiled over train_iters, and the
           graph breaks in a Core layer (torch._dynamo.explain)
  runtime  (not in the default; needs requirements-export.txt) the ExecuTorch kernels that
           export_mobile.py works around, each against eager PyTorch
  browser  (not in the default; needs what browser.py names) the web page in headless Chromium
           (WASM, --threads threads) on each of --export_dirs: the first image (downloads and
           loads every file) and the next, the tab's peak memory and the download, against
           run_mobile.py --format=onnx on the same files; --screenshot saves the page
The config: the config files on the command line (as the training scripts read them, over
their defaults: configurator.script_settings), config/pokemon.py without one. bench.py reads
them for its own settings too, so a file that changes a training setting puts it under
`if script in ('train_vae', 'train_flow'):` (a bare `muon = False` stops it). Timings are
medians of several runs after a warm-up. No test asserts on them.
"""
import copy
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import browser
from configurator import config_files, configure, script_settings
from mobile import initial_noise, peak_rss_mb, read_manifest, xnnpack_partitioner
from model import (SIZES, CoreLayer, FourierMixer, IrisConfig, SelfAttentionMixer, build_generator, count_parameters,
                   iris_tiny, linear_scan, sequential_scan, wake_up)
from precision import mixed_precision
from text import Prompt, load_text_encoder
from training import count_kernels, generator_step, make_optimizer, optimizer_step
from vae import WaveletVAE, vae_loss

# -----------------------------------------------------------------------------
sections = ""  # "" = params,mixer,scan,step,latency,flops; with a config file, train,memory,kernels
threads = 2
dim = 384            # width of the mixer comparison (iris_tiny's)
repeats = 5
seed = 0
# the memory section's autocast. A T4 trains in fp16, but CPU autocast casts the same ops for bf16
# and fp16 (one list), both 2 bytes: bf16 measures fp16's bytes, FLOPs and ops here, and fp16
# convolutions run ~150x slower than bf16 on this CPU
dtype = "bfloat16"
export_dirs = ""     # the browser section's export_mobile.py folders, comma-separated
screenshot = ""      # the browser section: a PNG of the page after the first export's image
# -----------------------------------------------------------------------------
configure(globals(), positive=('threads', 'dim', 'repeats'), choices=dict(dtype=("bfloat16", "float16", "float32")))
configs = config_files() or ["config/pokemon.py"]  # what the train, memory, kernels and compile sections measure
sections = sections or ("train,memory,kernels" if config_files() else "params,mixer,scan,step,latency,flops")
torch.set_num_threads(threads)
torch.manual_seed(seed)


def median_time(fn, repeats=repeats):
    fn()  # warm-up: allocator, lazy init, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def table(header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    print()


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux)
        f.write("5")


def bench_params():
    print("## Parameters (generator, millions)\n")
    rows = []
    for name, factory in SIZES.items():
        counts = count_parameters(factory())
        rows.append([name] + [f"{v / 1e6:.2f}" for v in counts.values()])
    table(["model"] + list(counts), rows)


def bench_mixer():
    print(f"## GRFM vs full self-attention, width {dim}, batch 1, forward+backward, ms\n")
    layer_config = IrisConfig(dim=dim, heads=dim // 64)
    grfm_layer = CoreLayer(layer_config)
    for p in grfm_layer.modulation.parameters():  # non-zero gates so every branch does real work
        nn.init.normal_(p, std=0.02)
    attention_layer = copy.deepcopy(grfm_layer)
    attention_layer.mixer = SelfAttentionMixer(dim, layer_config.heads)
    modulation = grfm_layer.modulation(torch.randn(1, dim)).detach()  # Iris.velocity computes it ahead
    text_kv = grfm_layer.cross_attention.key_values(torch.randn(1, 77, dim)).detach()
    mask = torch.ones(1, 1, 1, 77, dtype=torch.bool)
    rows = []
    for side in (8, 16, 32, 64):
        hw, n = (side, side), side * side
        x = torch.randn(1, n, dim, requires_grad=True)
        layer_ms = [1e3 * median_time(lambda: layer(x, modulation, hw, text_kv, mask).sum().backward())
                    for layer in (grfm_layer, attention_layer)]
        mixer_ms = [1e3 * median_time(lambda: layer.mixer(x, hw).sum().backward())
                    for layer in (grfm_layer, attention_layer)]
        with torch.no_grad():
            kernels = [count_kernels(lambda: layer(x, modulation, hw, text_kv, mask))
                       for layer in (grfm_layer, attention_layer)]
        rows.append([n, f"{layer_ms[0]:.1f}", f"{layer_ms[1]:.1f}", f"{layer_ms[1] / layer_ms[0]:.2f}x",
                     f"{mixer_ms[0]:.1f}", f"{mixer_ms[1]:.1f}", f"{mixer_ms[1] / mixer_ms[0]:.2f}x", *kernels])
    table(["tokens", "GRFM layer", "attn layer", "speed-up", "GRFM alone", "attn alone", "speed-up",
           "GRFM layer kernels", "attn layer kernels"], rows)
    growth = float(rows[-1][1]) / float(rows[-2][1])
    print(f"GRFM layer time growth 1024 -> 4096 tokens: {growth:.2f}x (attention: "
          f"{float(rows[-1][2]) / float(rows[-2][2]):.2f}x); kernels of one layer forward (training.count_kernels)\n")
    print("GRFM's Fourier pathway alone, forward+backward, ms: torch.fft against the DFT as two real matmuls\n")
    by_fft = FourierMixer(dim, layer_config.fourier_blocks, layer_config.softshrink, "torch")
    by_dft = FourierMixer(dim, layer_config.fourier_blocks, layer_config.softshrink, "dft")
    by_dft.load_state_dict(by_fft.state_dict())
    rows = []
    for side in (8, 16, 32, 64):
        grid = torch.randn(1, side, side, dim, requires_grad=True)
        rows.append([side * side] + [f"{1e3 * median_time(lambda: mixer(grid).sum().backward()):.2f}"
                                     for mixer in (by_fft, by_dft)])
    table(["tokens", "torch.fft", "DFT matmuls (fft_impl='dft')"], rows)


def bench_scan():
    print(f"## Linear recurrence h_t = a_t h_(t-1) + b_t, (1, N, {dim}), forward+backward, ms\n")
    rows = []
    for n in (256, 1024, 4096):
        log_a = torch.rand(1, n, dim).log().requires_grad_()
        b = torch.randn(1, n, dim).requires_grad_()
        loop_ms = 1e3 * median_time(lambda: sequential_scan(log_a, b).sum().backward(), repeats=3)
        scan_ms = [1e3 * median_time(lambda: linear_scan(log_a, b, chunk=chunk).sum().backward())
                   for chunk in (4, 8, 16)]
        rows.append([n, f"{loop_ms:.1f}"] + [f"{ms:.2f}" for ms in scan_ms] + [f"{loop_ms / min(scan_ms):.0f}x"])
    table(["tokens", "loop", "chunk 4", "chunk 8", "chunk 16", "loop / best"], rows)


@torch.no_grad()
def bench_latency():
    print("## Inference latency (batch 1, 77 text tokens, patch 2) and peak RSS of this process\n")
    rows = []
    for name in ("tiny", "small"):
        model = SIZES[name]().eval()
        for size in (256, 512):
            z = torch.randn(1, 16, size // 16, size // 16)
            t, text, mask = torch.rand(1), torch.randn(1, 77, 384), torch.ones(1, 77, dtype=torch.bool)
            for r in (4, 8, 16):
                reset_peak_rss()
                ms = 1e3 * median_time(lambda: model(z, t, text, mask, iters=r), repeats=3)
                rows.append([name, size, r, f"{ms:.0f}", f"{peak_rss_mb():.0f}"])
        model = None  # free it before the next size is built
    vae = WaveletVAE(channels=(64, 128, 256), blocks_per_stage=2).eval()
    for size in (256, 512):
        reset_peak_rss()
        ms = 1e3 * median_time(lambda: vae.decode(torch.randn(1, 16, size // 16, size // 16)), repeats=3)
        rows.append(["VAE decoder", size, "-", f"{ms:.0f}", f"{peak_rss_mb():.0f}"])
    table(["model", "px", "r", "ms / forward", "peak RSS MB"], rows)


@torch.no_grad()
def bench_step():
    print("## One guided sampling step: iris_small, 512 px (256 tokens), r = 4, batch 2, 77 text tokens, ms\n")
    model = wake_up(SIZES["small"]().eval())
    z, t = torch.randn(2, 16, 32, 32), torch.rand(2)
    text, mask = torch.randn(2, 77, 384), torch.ones(2, 77, dtype=torch.bool)
    prompt = model.encode_prompt(text, mask)
    per_step = 1e3 * median_time(lambda: model(z, t, text, mask, iters=4))
    encoded_once = 1e3 * median_time(lambda: model.velocity(z, t, prompt, iters=4))
    encode = 1e3 * median_time(lambda: model.encode_prompt(text, mask))
    table(["prompt encoded every step", "prompt encoded once per sampling call", "encode_prompt alone"],
          [[f"{per_step:.0f}", f"{encoded_once:.0f}", f"{encode:.1f}"]])


@torch.no_grad()
def bench_flops():
    print("## Achieved FLOP/s against this machine's fp32 matmul peak\n")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / median_time(lambda: a @ b)
    rows = [["matmul 2048^3", f"{peak / 1e9:.1f}", "100%"]]
    model = iris_tiny().eval()
    for size in (256, 512):
        args = (torch.randn(1, 16, size // 16, size // 16), torch.rand(1), torch.randn(1, 77, 384),
                torch.ones(1, 77, dtype=torch.bool))
        counter = FlopCounterMode(display=False)
        with counter:
            model(*args, iters=8)
        rate = counter.get_total_flops() / median_time(lambda: model(*args, iters=8), repeats=3)
        rows.append([f"iris_tiny {size}px r=8", f"{rate / 1e9:.1f}", f"{100 * rate / peak:.0f}%"])
    table(["workload", "GFLOP/s", "of peak"], rows)
    print("FLOPs counted by torch.utils.flop_counter: matmuls, convolutions and attention; the FFTs,\n"
          "the scan and other elementwise work are not counted, so the real rate is a little higher.\n")


def measure_training_step(model, step):
    """One training step's memory and work: step() runs it whole (the forward under autocast,
    the backward, the optimizer's step where it has one). -> dict of bytes (weights,
    gradients, AdamW, EMA, saved activations), FLOPs, kernels."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):  # every tensor autograd keeps for backward, once per storage, weights aside
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    flops = FlopCounterMode(display=False)

    def counted_step():
        with flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()
    kernels = count_kernels(counted_step)
    n = sum(p.numel() for p in model.parameters())
    return dict(weights=4 * n, gradients=4 * n, adamw=8 * n, ema=4 * n, activations=sum(saved.values()),
                flops=flops.get_total_flops(), kernels=kernels)


# T4 assumptions for the estimate: what a well-fed T4 sustains, not its data-sheet peak (65 TFLOP/s
# fp16, 320 GB/s); saved activations are written once and read twice (backward, recompute-free);
# eager PyTorch's launch and Python overhead per kernel as measured on an H200 (docs/results.md,
# "On a real GPU": a launch-bound GRFM step), which a T4's host is no faster at.
T4_FLOPS, T4_BANDWIDTH, T4_SECONDS_PER_KERNEL = 20e12, 250e9, 33e-6


def t4_seconds(m):
    return m["flops"] / T4_FLOPS + 3 * m["activations"] / T4_BANDWIDTH + m["kernels"] * T4_SECONDS_PER_KERNEL


def config_vae():
    """The VAE train_vae.py trains for the config, and the side of the images a step takes
    (its crops, if it trains on crops)."""
    settings = script_settings("train_vae", configs)
    vae = WaveletVAE(settings["channels"], settings["latent_channels"], settings["blocks_per_stage"])
    return vae, settings["crop_size"] or settings["image_size"], settings


def bench_memory():
    print(f"## One training step of {' '.join(configs)} in {dtype} autocast, measured on this CPU\n")
    autocast, _ = mixed_precision(dtype, "cpu")
    rows, total_minutes = [], 0.0
    vae, size, vae_settings = config_vae()
    batch = vae_settings["batch_size"]
    x = torch.rand(batch, 3, size, size) * 2 - 1

    def vae_step():
        with autocast:
            wavelet_hat, mean, logvar = vae(x)
        vae_loss(wavelet_hat.float(), x, mean.float(), logvar.float())[0].backward()
    measured = [("train_vae", vae, measure_training_step(vae, vae_step),
                 vae_settings["max_steps"], f"{batch} x {size}px")]

    flow_settings = script_settings("train_flow", configs)
    size, batch, patch, train_iters = (flow_settings[k] for k in ("image_size", "batch_size", "patch_size",
                                                                   "train_iters"))
    encoder = load_text_encoder(flow_settings["text_encoder"])
    model = build_generator(flow_settings, encoder.width)
    flow_step = flow_training_step(model, batch, size, patch, dtype, encoder.width, 77)  # the longest captions
    # memory at the largest r (flat in r with backprop_iters); FLOPs and kernels grow linearly
    # in r, so the step at the mean r drawn is the line through the smallest and the largest
    low, high = (measure_training_step(model, lambda: flow_step(r)) for r in (min(train_iters), max(train_iters)))
    share = (sum(train_iters) / len(train_iters) - min(train_iters)) / max(1, max(train_iters) - min(train_iters))
    flow = dict(high, **{k: low[k] + share * (high[k] - low[k]) for k in ("flops", "kernels")})
    flow["frozen"] = 4 * sum(p.numel() for m in (vae, encoder) for p in m.parameters())  # VAE and text encoder
    measured.append(("train_flow", model, flow, flow_settings["max_steps"],
                     f"{batch} x {(size // 16 // patch) ** 2} tokens, r={min(train_iters)}..{max(train_iters)}"))
    for script, module, m, max_steps, shape in measured:
        held = sum(v for k, v in m.items() if k not in ("flops", "kernels"))
        seconds = t4_seconds(m)
        total_minutes += max_steps * seconds / 60
        rows.append([script, shape, f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M",
                     f"{(m['weights'] + m['gradients'] + m['adamw'] + m['ema']) / 2**30:.2f}",
                     f"{m['activations'] / 2**30:.2f}", f"{held / 2**30:.2f}", f"{m['flops'] / 1e12:.2f}",
                     f"{m['kernels']:.0f}", f"{1e3 * seconds:.0f}", max_steps, f"{max_steps * seconds / 60:.0f}"])
    table(["stage", "batch", "params", "weights+grads+AdamW+EMA GiB", "activations GiB", "total GiB", "TFLOPs/step",
           "kernels/step", "T4 ms/step (est.)", "max_steps", "T4 min (est.)"], rows)
    print(f"T4 estimate = FLOPs / {T4_FLOPS / 1e12:.0f} TFLOP/s + 3 x activation bytes / {T4_BANDWIDTH / 1e9:.0f} GB/s "
          f"+ kernels x {T4_SECONDS_PER_KERNEL * 1e6:.0f} us: {total_minutes:.0f} min for both stages. Not counted: "
          f"CUDA's own\n~0.4 GiB, the allocator's slack, sample grids and checkpoints. A T4 has 15 GiB.\n")


def bench_train():
    print(f"## Training steps of {' '.join(configs)} as train_vae.py and train_flow.py take them, fp32 on this CPU\n")
    _, scaler = mixed_precision("float32", "cpu")
    vae, side, settings = config_vae()
    vae, batch = vae.to(memory_format=torch.channels_last), settings["batch_size"]
    optimizer = make_optimizer(vae, 1e-6, 0.0, settings["muon"], ends=(vae.encoder[0], vae.decoder[-1]))
    x = torch.rand(batch, 3, side, side) * 2 - 1

    def vae_step():
        wavelet_hat, mean, logvar = vae(x)
        vae_loss(wavelet_hat, x, mean, logvar)[0].backward()
        optimizer_step(vae, optimizer, scaler, settings["grad_clip"])
    rows = [training_row("train_vae", settings, f"{batch} x {side} px", vae_step, optimizer)]
    settings = script_settings("train_flow", configs)
    side, batch, patch = settings["image_size"], settings["batch_size"], settings["patch_size"]
    model = build_generator(settings, 384)
    optimizer = make_optimizer(model, 1e-6, 0.0, settings["muon"], ends=(model.patch_embed, model.unpatchify))
    # r: the mean of the draws (training.draw_iters), the median of train_iters when drawn uniformly
    r = round(settings["train_iters_mean"]) or sorted(settings["train_iters"])[len(settings["train_iters"]) // 2]
    flow_step = flow_training_step(model, batch, side, patch, "float32", optimizer=optimizer)
    rows.append(training_row("train_flow", settings, f"{batch} x {(side // 16 // patch) ** 2} tokens, r = {r}",
                             lambda: flow_step(r), optimizer))
    table(["script", "batch", "optimizer", "ms / step", "of it the optimizer's step", "max_steps",
           "minutes of steps"], rows)
    print("Data, evaluations, sample grids and checkpoints come on top (train_flow.py: drawing and encoding the data\n"
          "set once, docs/speedrun.md).\n")


def training_row(script, settings, batch, step, optimizer):
    seconds = median_time(step)
    for p in (p for group in optimizer.param_groups for p in group["params"]):
        p.grad = torch.randn_like(p) * 1e-3
    optimizer_seconds = median_time(optimizer.step)
    return [script, batch, "Muon + AdamW" if settings["muon"] else "AdamW", f"{1e3 * seconds:.0f}",
            f"{1e3 * optimizer_seconds:.0f} ms", settings["max_steps"], f"{settings['max_steps'] * seconds / 60:.1f}"]


def flow_training_step(model, batch, size, patch, dtype, text_width=384, text_length=12, optimizer=None):
    """-> step(iters): train_flow.py's step (training.generator_step) of `model`, autocast in
    dtype and `optimizer` (fused AdamW if None), on random latents and captions (a shapes
    caption's length)."""
    z, t = torch.randn(batch, 16, size // 16, size // 16), torch.rand(batch)
    prompt = Prompt(torch.randn(batch, text_length, text_width), torch.ones(batch, text_length, dtype=torch.bool))
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast, scaler = mixed_precision(dtype, "cpu")
    return lambda iters: generator_step(model, optimizer, scaler, autocast, z, prompt, t, torch.randn_like(z), iters,
                                        [torch.arange(batch)])


def bench_kernels():
    settings = script_settings("train_flow", configs)
    size, patch, train_iters = settings["image_size"], settings["patch_size"], settings["train_iters"]
    r = train_iters[len(train_iters) // 2]
    print(f"## Kernels in one train_flow.py step of {' '.join(configs)}: {settings['model_size']}, "
          f"{(size // 16 // patch) ** 2} tokens, r = {r}, backprop {settings['backprop_iters']}, forward + backward + "
          f"AdamW, {dtype} autocast\n")
    rows = []
    for mixer in ("grfm", "attention"):
        torch.manual_seed(seed)
        model = build_generator(settings | dict(mixer=mixer), 384)
        step = flow_training_step(model, 2, size, patch, dtype)  # the count does not depend on the batch
        step(r)  # the first step creates AdamW's state
        rows.append([mixer, count_kernels(lambda: step(r))])
    table(["mixer", "kernels (ops that are not views)"], rows)
    print("Counted on the CPU (training.count_kernels): on a GPU each kernel is one launch,\n"
          f"and eager PyTorch spends ~{T4_SECONDS_PER_KERNEL * 1e6:.0f} us of host time on each at these sizes.\n")


def bench_compile():
    settings = script_settings("train_flow", configs)
    size, patch, train_iters = settings["image_size"], settings["patch_size"], settings["train_iters"]
    batch = 4  # not the config's: compiling does not depend on it, and a CPU runs the config's slowly
    print(f"## train_flow.py's step on {' '.join(configs)} with compile=True (each Core layer, inductor), fp32, batch "
          f"{batch}, r in {train_iters}\n")
    torch._inductor.config.cpp.enable_kernel_profile = True  # fused kernels show in the profiler (count_kernels)
    rows = []
    for compiled, fft_impl in ((False, "torch"), (True, "torch"), (False, "dft"), (True, "dft")):
        torch.manual_seed(seed)
        model = build_generator(settings, 384, fft_impl=fft_impl)
        if compiled:
            model.compile_core()
        step = flow_training_step(model, batch, size, patch, "float32")
        torch._dynamo.reset()
        graphs_before, start = torch._dynamo.utils.counters["stats"]["unique_graphs"], time.perf_counter()
        for r in train_iters:  # the first step of each r compiles what it needs
            step(r)
        first = time.perf_counter() - start
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        r = train_iters[len(train_iters) // 2]
        rows.append(["compiled" if compiled else "eager", fft_impl, f"{first:.0f}",
                     f"{1e3 * median_time(lambda: step(r), repeats=3):.0f}", count_kernels(lambda: step(r)),
                     graphs if compiled else "-"])
    layer, side = build_generator(settings, 384).core[0], size // 16 // patch
    width = layer.norm1.normalized_shape[0]
    text_kv = layer.cross_attention.key_values(torch.randn(2, 12, width))
    explained = torch._dynamo.explain(layer)(torch.randn(2, side * side, width), torch.randn(2, 7 * width),
                                             (side, side), text_kv, torch.ones(2, 1, 1, 12, dtype=torch.bool))
    table(["", "fft_impl", "first step of each r, s", f"ms / step (r = {r})", "kernels / step", "graphs compiled"],
          rows)
    print(f"one Core layer under torch._dynamo.explain: {explained.graph_count} graph(s), "
          f"{explained.graph_break_count} graph break(s)\n")


def run_on_executorch(module, x, partitioners):
    """-> (output of the ExecuTorch program, its size in bytes)"""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    exported = torch.export.export(module.eval(), (x,))
    program = to_edge_transform_and_lower(exported, partitioner=partitioners).to_executorch()
    return Runtime.get().load_program(program.buffer).load_method("forward").execute([x])[0], len(program.buffer)


def bench_runtime():

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    print("## ExecuTorch kernels against eager PyTorch (why export_mobile.py does what it does)\n")
    rows = []
    gelu, x = nn.GELU(approximate="tanh"), 4 * torch.randn(1, 256, 384)
    for name, partitioners in (("all of XNNPACK", [XnnpackPartitioner()]),
                               ("export_mobile.py's", [xnnpack_partitioner()])):
        out, _ = run_on_executorch(gelu, x, partitioners)
        rows.append([f"GELU(tanh), {name} partitioner", f"{(out - gelu(x)).abs().max().item():.1e}"])
    for width in (64, 576):
        norm, x = nn.LayerNorm(width).half(), (3 * torch.randn(2, 256, width) + 1).half()
        out, _ = run_on_executorch(norm, x, [])
        reference = F.layer_norm(x.float(), (width,))
        eager = (norm(x).float() - reference).abs().max().item()
        rows.append([f"fp16 layer_norm, width {width} (eager fp16: {eager:.1e})",
                     f"{(out.float() - reference).abs().max().item():.1e}"])
    norm, x = nn.GroupNorm(32, 256).half(), (3 * torch.randn(1, 256, 64, 64) + 1).half()
    out, _ = run_on_executorch(norm, x, [])
    group_norm_error = (out.float() - F.group_norm(x.float(), 32)).abs().max().item()
    rows.append(["fp16 group_norm, 256 channels", f"{group_norm_error:.1e}"])
    table(["kernel", "max abs diff"], rows)
    convs = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.SiLU(), nn.Conv2d(256, 256, 3, padding=1)).half()
    x = torch.randn(1, 256, 16, 16).half()
    weights = sum(p.numel() * p.element_size() for p in convs.parameters())
    sizes = [run_on_executorch(convs, x, partitioners)[1] for partitioners in ([], [XnnpackPartitioner()])]
    print(f"two fp16 3x3 convs, 256 channels: {weights / 1e6:.2f} MB of weights; .pte {sizes[0] / 1e6:.2f} MB "
          f"with portable kernels, {sizes[1] / 1e6:.2f} MB with XNNPACK (which stores them as fp32)\n")


def bench_browser():
    if browser.missing():
        raise SystemExit(f"error: the browser section cannot run here: {browser.missing()}")
    if not export_dirs:
        raise SystemExit("error: the browser section needs --export_dirs=FOLDER[,FOLDER] "
                         "(export_mobile.py writes them)")
    runtime = [os.path.join(browser.WEB, 'node_modules', f) for f in (
        'onnxruntime-web/dist/ort.wasm.min.mjs', 'onnxruntime-web/dist/ort-wasm-simd-threaded.mjs',
        'onnxruntime-web/dist/ort-wasm-simd-threaded.wasm', '@huggingface/tokenizers/dist/tokenizers.min.mjs')]
    runtime_mb = sum(map(os.path.getsize, runtime)) / 1e6
    print(f"## The web page in headless Chromium (WASM, {threads} threads) against run_mobile.py (ONNX Runtime)\n")
    rows = []
    for folder in export_dirs.split(","):
        manifest = read_manifest(folder)
        settings = f"{manifest['image_size']}², {manifest['steps']} steps, r={manifest['iters']}"
        files_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                       if f.endswith('.onnx') or f == 'tokenizer.json') / 1e6
        python_png = os.path.join(folder, 'bench-onnx.png')
        measured = subprocess.run([sys.executable, 'run_mobile.py', f'--export_dir={folder}', '--format=onnx',
                                   f'--output={python_png}'], capture_output=True, text=True)
        if measured.returncode:
            raise SystemExit(f"error: run_mobile.py failed on {folder}: {measured.stderr.strip()[-500:]}")
        python_s, python_mb = (float(re.search(pattern, measured.stdout).group(1))
                               for pattern in (r'([\d.]+) s\n', r'peak RSS (\d+) MB'))
        with browser.web_page(folder, f'?threads={threads}') as (page, profile):
            # run_mobile.py's noise (its seed 0), so that the first image can be compared with its PNG
            seconds = [browser.draw_with_noise(page, initial_noise(manifest, 0), torch.Generator().manual_seed(1),
                                               manifest['steps'])]
            differs = np.abs(browser.canvas_pixels(page).astype(int) - np.asarray(Image.open(python_png))).max()
            seconds += [page.evaluate('window.iris.draw()') for _ in range(2)]  # the first loaded every file
            peak_mb = browser.renderer_peak_mb(profile)
            if screenshot and folder == export_dirs.split(",")[0]:
                page.locator('body').screenshot(path=screenshot)
        rows.append([folder, settings, f"{seconds[0]:.1f} s", f"{min(seconds[1:]):.1f} s", f"{python_s:.1f} s",
                     f"{peak_mb:.0f} MB", f"{python_mb:.0f} MB", f"{files_mb:.1f} + {runtime_mb:.1f} MB",
                     f"{differs}/255"])
    table(["export", "image", "page: first image", "page: next", "run_mobile.py", "tab peak RSS",
           "run_mobile.py peak RSS", "download (models + runtime)", "page against run_mobile.py"], rows)
    if screenshot:
        print(f"wrote {screenshot}\n")


benches = {"params": bench_params, "mixer": bench_mixer, "scan": bench_scan, "step": bench_step,
           "latency": bench_latency, "flops": bench_flops, "train": bench_train, "memory": bench_memory,
           "kernels": bench_kernels, "compile": bench_compile, "runtime": bench_runtime, "browser": bench_browser}
unknown = set(sections.split(",")) - set(benches)
if unknown:
    raise SystemExit(f"error: unknown bench.py section(s) {', '.join(sorted(unknown))}; "
                     f"choose from {','.join(benches)}")
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
for section in sections.split(","):
    benches[section]()
