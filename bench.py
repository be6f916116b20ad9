"""
Measures what the README claims about the generator on this machine, as tables:

    python bench.py                          # everything (1 minute on 2 CPU cores)
    python bench.py --sections=mixer,scan    # some of: params, mixer, scan, latency, flops, runtime
    python bench.py --threads=1

  params   parameters per component of iris_tiny / small / base
  mixer    forward+backward time of one GRFM core layer against the same layer with full
           self-attention (F.scaled_dot_product_attention) in its place, 64 .. 4096 tokens,
           side by side in one run; also the two token mixers alone
  scan     the parallel scan (model.linear_scan) against a Python loop over tokens, fwd+bwd,
           and the scan's chunk length
  latency  one generator forward (batch 1, 77 text tokens) at 256 and 512 px for r = 4, 8,
           16, with the process's peak RSS, and the VAE decoder
  flops    this machine's fp32 matmul peak, and the FLOP/s the generator reaches
  runtime  (not in the default; needs requirements-export.txt) the ExecuTorch kernels that
           export_mobile.py works around, each against eager PyTorch
Timings are medians of several runs after a warm-up. No test asserts on them.
"""
import copy
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import SIZES, Attention, CoreLayer, IrisConfig, count_parameters, linear_scan, iris_tiny
from run_mobile import peak_rss_mb
from vae import WaveletVAE

# -----------------------------------------------------------------------------
sections = "params,mixer,scan,latency,flops"
threads = 2
dim = 384            # width of the mixer comparison (iris_tiny's)
repeats = 5
seed = 0
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals())
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


class SelfAttentionMixer(nn.Module):
    """Full self-attention with GRFM's call signature, for a like-for-like swap."""

    def __init__(self, dim, heads):
        super().__init__()
        self.attention = Attention(dim, heads)

    def forward(self, x, hw):
        return self.attention(x)


def bench_params():
    print("## Parameters (generator, millions)\n")
    rows = []
    for name, factory in SIZES.items():
        counts = count_parameters(factory())
        rows.append([name] + [f"{v / 1e6:.2f}" for v in counts.values()])
    table(["model"] + list(counts), rows)


def bench_mixer():
    print(f"## GRFM vs full self-attention, width {dim}, batch 1, forward+backward, ms\n")
    cfg = IrisConfig(dim=dim, heads=dim // 64)
    grfm_layer = CoreLayer(cfg)
    for p in grfm_layer.modulation.parameters():  # non-zero gates so every branch does real work
        nn.init.normal_(p, std=0.02)
    attention_layer = copy.deepcopy(grfm_layer)
    attention_layer.mixer = SelfAttentionMixer(dim, cfg.heads)
    c = torch.randn(1, dim)
    context, mask = torch.randn(1, 77, dim), torch.ones(1, 1, 1, 77, dtype=torch.bool)
    rows = []
    for side in (8, 16, 32, 64):
        hw, n = (side, side), side * side
        x = torch.randn(1, n, dim, requires_grad=True)
        layer_ms = [1e3 * median_time(lambda: layer(x, c, hw, context, mask).sum().backward())
                    for layer in (grfm_layer, attention_layer)]
        mixer_ms = [1e3 * median_time(lambda: layer.mixer(x, hw).sum().backward())
                    for layer in (grfm_layer, attention_layer)]
        rows.append([n, f"{layer_ms[0]:.1f}", f"{layer_ms[1]:.1f}", f"{layer_ms[1] / layer_ms[0]:.2f}x",
                     f"{mixer_ms[0]:.1f}", f"{mixer_ms[1]:.1f}", f"{mixer_ms[1] / mixer_ms[0]:.2f}x"])
    table(["tokens", "GRFM layer", "attn layer", "speed-up", "GRFM alone", "attn alone", "speed-up"], rows)
    growth = float(rows[-1][1]) / float(rows[-2][1])
    print(f"GRFM layer time growth 1024 -> 4096 tokens: {growth:.2f}x (attention: "
          f"{float(rows[-1][2]) / float(rows[-2][2]):.2f}x)\n")


def sequential_scan(a, b):
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def bench_scan():
    print(f"## Linear recurrence h_t = a_t h_(t-1) + b_t, (1, N, {dim}), forward+backward, ms\n")
    rows = []
    for n in (256, 1024, 4096):
        a = torch.rand(1, n, dim).requires_grad_()
        b = torch.randn(1, n, dim).requires_grad_()
        loop_ms = 1e3 * median_time(lambda: sequential_scan(a, b).sum().backward(), repeats=3)
        scan_ms = [1e3 * median_time(lambda: linear_scan(a, b, chunk=chunk).sum().backward())
                   for chunk in (16, 64, 256, n)]  # chunk = n is one flat Hillis-Steele scan
        rows.append([n, f"{loop_ms:.1f}"] + [f"{ms:.2f}" for ms in scan_ms] + [f"{loop_ms / min(scan_ms):.0f}x"])
    table(["tokens", "loop", "chunk 16", "chunk 64", "chunk 256", "flat", "loop / best"], rows)


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
        del model
    vae = WaveletVAE(channels=(64, 128, 256), blocks_per_stage=2).eval()
    for size in (256, 512):
        reset_peak_rss()
        ms = 1e3 * median_time(lambda: vae.decode(torch.randn(1, 16, size // 16, size // 16)), repeats=3)
        rows.append(["VAE decoder", size, "-", f"{ms:.0f}", f"{peak_rss_mb():.0f}"])
    table(["model", "px", "r", "ms / forward", "peak RSS MB"], rows)


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


def run_on_executorch(module, x, partitioners):
    """-> (output of the ExecuTorch program, its size in bytes)"""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    program = to_edge_transform_and_lower(torch.export.export(module.eval(), (x,)), partitioner=partitioners).to_executorch()
    return Runtime.get().load_program(program.buffer).load_method("forward").execute([x])[0], len(program.buffer)


def bench_runtime():
    from export_mobile import xnnpack_partitioner  # first: it quiets torchao's warnings (text.py)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    print("## ExecuTorch kernels against eager PyTorch (why export_mobile.py does what it does)\n")
    rows = []
    gelu, x = nn.GELU(approximate="tanh"), 4 * torch.randn(1, 256, 384)
    for name, partitioners in (("all of XNNPACK", [XnnpackPartitioner()]), ("export_mobile.py's", [xnnpack_partitioner()])):
        out, _ = run_on_executorch(gelu, x, partitioners)
        rows.append([f"GELU(tanh), {name} partitioner", f"{(out - gelu(x)).abs().max().item():.1e}"])
    for width in (64, 576):
        norm, x = nn.LayerNorm(width).half(), (3 * torch.randn(2, 256, width) + 1).half()
        out, _ = run_on_executorch(norm, x, [])
        reference = F.layer_norm(x.float(), (width,))
        rows.append([f"fp16 layer_norm, width {width} (eager fp16: {(norm(x).float() - reference).abs().max().item():.1e})",
                     f"{(out.float() - reference).abs().max().item():.1e}"])
    norm, x = nn.GroupNorm(32, 256).half(), (3 * torch.randn(1, 256, 64, 64) + 1).half()
    out, _ = run_on_executorch(norm, x, [])
    rows.append(["fp16 group_norm, 256 channels", f"{(out.float() - F.group_norm(x.float(), 32)).abs().max().item():.1e}"])
    table(["kernel", "max abs diff"], rows)
    convs = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.SiLU(), nn.Conv2d(256, 256, 3, padding=1)).half()
    x = torch.randn(1, 256, 16, 16).half()
    weights = sum(p.numel() * p.element_size() for p in convs.parameters())
    sizes = [run_on_executorch(convs, x, partitioners)[1] for partitioners in ([], [XnnpackPartitioner()])]
    print(f"two fp16 3x3 convs, 256 channels: {weights / 1e6:.2f} MB of weights; .pte {sizes[0] / 1e6:.2f} MB "
          f"with portable kernels, {sizes[1] / 1e6:.2f} MB with XNNPACK (which stores them as fp32)\n")


if __name__ == "__main__":
    benches = {"params": bench_params, "mixer": bench_mixer, "scan": bench_scan,
               "latency": bench_latency, "flops": bench_flops, "runtime": bench_runtime}
    unknown = set(sections.split(",")) - set(benches)
    if unknown:
        raise SystemExit(f"bench.py: unknown section(s) {', '.join(sorted(unknown))}; choose from {','.join(benches)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    for section in sections.split(","):
        benches[section]()
