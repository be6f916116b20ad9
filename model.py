"""
The IRIS generator: a recurrent-depth diffusion transformer that predicts the
rectified-flow velocity of a VAE latent, conditioned on text.

    z (B, 16, H/16, W/16) -> patch embed + 2D sin-cos -> Prelude -> e
    s_0 = e;  s_{i+1} = Core(adapter([s_i, e]), c_i)  for i = 0 .. r-1    (shared weights)
    Coda(s_r) -> final adaLN -> unpatchify -> v (B, 16, H/16, W/16)

The Core is ONE block of `core_layers` layers applied r times (r = 4..16, chosen at run
time), so a phone holds a small model and trades compute for quality with `--iters`.
Feeding the prelude output e into every iteration is Huginn's input injection
(Geiping et al. 2025, arXiv 2502.05171); without it deep recurrence drifts.

Each Core layer mixes tokens with GRFM (below) instead of self-attention, so its cost
grows like N log N rather than N^2, attends to the text tokens with cross-attention, and
is conditioned with adaLN-Zero (DiT, Peebles & Xie 2022, arXiv 2212.09748) on
c_i = emb(t) + emb(i / r) + MLP(pooled text).

GRFM, the token mixer, fuses three views of the h x w token grid:
  1. Fourier: AFNO (Guibas et al. 2021, arXiv 2111.13587), a block-diagonal complex
     MLP on rfft2 of the grid, softshrink for sparsity, irfft2 back. Global, N log N.
  2. Recurrence: Griffin's RG-LRU (De et al. 2024, arXiv 2402.19427) over the raster
     order, half the channels forward and half backward, computed with a parallel scan.
  3. Spatial: RMT's Manhattan decay (Fan et al. 2023, arXiv 2309.11523),
     D[n, m] = gamma_h^(|y_n - y_m| + |x_n - x_m|) per head, applied separably.
  y = W_o LN(g * fourier + (1 - g) * recurrent + alpha * spatial),  g = sigmoid(W_g x)
IrisConfig(mixer="attention") puts full self-attention in GRFM's place: the baseline that
bench.py and the evals measure GRFM against.

Run `python bench.py` for parameter counts and timings; tests are in test_iris.py.
"""
import contextlib
import glob
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class IrisConfig:
    latent_channels: int = 16    # the VAE's latent channels
    patch_size: int = 2          # 2 for 256 px and up (512 px -> 256 tokens), 1 for small images
    dim: int = 384
    heads: int = 6               # attention heads and Manhattan-decay heads
    core_layers: int = 2         # layers in the shared Core block
    mlp_ratio: float = 4.0
    text_dim: int = 384          # width of the text encoder's tokens (MiniLM 384, CLIP-L 768)
    fourier_blocks: int = 8      # AFNO's block-diagonal split of the channels
    softshrink: float = 0.01
    window: int = 8              # Coda's local attention window, in tokens
    mixer: str = "grfm"          # the Core's token mixer: "grfm" or "attention" (full self-attention, the baseline)
    backprop_iters: int = 0      # train through only the last k core iterations (0 = all)
    fft_impl: str = "torch"      # "torch" (complex FFT) or "dft" (real matmuls, for export)
    text_encoder: str = "minilm"  # the token space text_proj was trained on (text.py); samplers must match it


# ---------------------------------------------------------------------------------------
# Embeddings


def sinusoidal_embedding(x, dim, max_period=10000.0):
    """x: (B,) real numbers -> (B, dim) cos/sin features at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ScalarEmbedder(nn.Module):
    """A scalar (the time t, the core's progress i/r) -> a D-dim vector, as DiT embeds t."""

    def __init__(self, dim, scale, frequency_dim=256):
        super().__init__()
        self.scale, self.frequency_dim = scale, frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(sinusoidal_embedding(x * self.scale, self.frequency_dim).to(self.mlp[0].weight.dtype))


@lru_cache(maxsize=32)
def _sincos_2d(h, w, dim):
    # Half the channels encode the row, half the column (DiT's 2D sin-cos), in token units,
    # so any grid size works: a fixed learned table would tie the model to one resolution.
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.cat([sinusoidal_embedding(ys.flatten(), dim // 2), sinusoidal_embedding(xs.flatten(), dim // 2)], dim=1)


def position_embedding(h, w, dim, device, dtype):
    return _sincos_2d(h, w, dim).to(device=device, dtype=dtype)


def full_precision(x):
    """A region that autocast must leave in fp32 (see its callers); a no-op when autocast is
    off, so torch.export never sees it."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class FeedForward(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        hidden = int(dim * ratio)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


# ---------------------------------------------------------------------------------------
# GRFM pathway 1: Fourier (AFNO)


@lru_cache(maxsize=32)
def _dft_matrices(h, w):
    """Real matrices that do rfft2/irfft2 (norm="ortho") on an h x w grid as matmuls.

    Forward along w (real -> half spectrum): Y = (Cw + i Sw) x, Cw, Sw: (w//2+1, w).
    Along h (complex): Z = (Ch + i Sh) Y. The inverse along h uses the conjugate (Ch is
    symmetric); the inverse along w is irfft's c2r: x = Awr Yr + Awi Yi, with each bin
    counted twice except DC and Nyquist, whose imaginary parts it ignores (sin = 0 there).
    """
    n_h, n_w = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    k_w = torch.arange(w // 2 + 1, dtype=torch.float64)
    angle_h = 2 * math.pi * torch.outer(n_h, n_h) / h
    angle_w = 2 * math.pi * torch.outer(k_w, n_w) / w
    cos_h, sin_h = torch.cos(angle_h) / math.sqrt(h), -torch.sin(angle_h) / math.sqrt(h)
    cos_w, sin_w = torch.cos(angle_w) / math.sqrt(w), -torch.sin(angle_w) / math.sqrt(w)
    twice = torch.full((w // 2 + 1, 1), 2.0, dtype=torch.float64)
    twice[0] = 1
    if w % 2 == 0:
        twice[-1] = 1
    inv_cos_w, inv_sin_w = (twice * cos_w).T, (twice * sin_w).T
    return tuple(m.float() for m in (cos_h, sin_h, cos_w, sin_w, inv_cos_w, inv_sin_w))


def rfft2_dft(x):
    """x: (B, h, w, D) real -> (real, imag), each (B, h, w//2+1, D); equals torch.fft.rfft2(norm='ortho')."""
    cos_h, sin_h, cos_w, sin_w, _, _ = (m.to(x) for m in _dft_matrices(x.shape[1], x.shape[2]))
    y_re, y_im = torch.einsum("kw,bhwd->bhkd", cos_w, x), torch.einsum("kw,bhwd->bhkd", sin_w, x)
    z_re = torch.einsum("kh,bhwd->bkwd", cos_h, y_re) - torch.einsum("kh,bhwd->bkwd", sin_h, y_im)
    z_im = torch.einsum("kh,bhwd->bkwd", cos_h, y_im) + torch.einsum("kh,bhwd->bkwd", sin_h, y_re)
    return z_re, z_im


def irfft2_dft(z_re, z_im, w):
    """Inverse of rfft2_dft back to a real (B, h, w, D) grid; equals torch.fft.irfft2(s=(h, w), norm='ortho')."""
    cos_h, sin_h, _, _, inv_cos_w, inv_sin_w = (m.to(z_re) for m in _dft_matrices(z_re.shape[1], w))
    y_re = torch.einsum("kh,bhwd->bkwd", cos_h, z_re) + torch.einsum("kh,bhwd->bkwd", sin_h, z_im)
    y_im = torch.einsum("kh,bhwd->bkwd", cos_h, z_im) - torch.einsum("kh,bhwd->bkwd", sin_h, z_re)
    return torch.einsum("nk,bhkd->bhnd", inv_cos_w, y_re) + torch.einsum("nk,bhkd->bhnd", inv_sin_w, y_im)


class FourierMixer(nn.Module):
    """AFNO: rfft2 -> block-diagonal complex 2-layer MLP -> softshrink -> irfft2."""

    def __init__(self, dim, blocks, softshrink, fft_impl):
        super().__init__()
        if dim % blocks:
            raise ValueError(f"dim {dim} is not divisible by fourier_blocks {blocks}")
        if fft_impl not in ("torch", "dft"):
            raise ValueError(f"fft_impl must be 'torch' or 'dft', not {fft_impl!r}")
        self.blocks, self.block_size = blocks, dim // blocks
        self.softshrink, self.fft_impl = softshrink, fft_impl
        # (real, imag) parts of each block's complex weights and biases, as AFNO stores them
        self.w1 = nn.Parameter(0.02 * torch.randn(2, blocks, self.block_size, self.block_size))
        self.b1 = nn.Parameter(torch.zeros(2, blocks, self.block_size))
        self.w2 = nn.Parameter(0.02 * torch.randn(2, blocks, self.block_size, self.block_size))
        self.b2 = nn.Parameter(torch.zeros(2, blocks, self.block_size))

    @staticmethod
    def _as_real(w, b):
        # A complex product (xr + i xi)(wr + i wi) as ONE real matmul on interleaved
        # [xr0, xi0, xr1, xi1, ...] vectors: rows 2j act on xr_j, rows 2j+1 on xi_j.
        # That is the memory layout of torch.view_as_real, so the FFT output needs no copy.
        w_re, w_im = w
        from_re = torch.stack([w_re, w_im], dim=-1)     # (nb, bs, bs, 2): xr_j -> (re, im) of out_k
        from_im = torch.stack([-w_im, w_re], dim=-1)    # xi_j -> (re, im) of out_k
        nb, bs = w_re.shape[:2]
        weight = torch.stack([from_re, from_im], dim=2).reshape(nb, 2 * bs, 2 * bs)
        bias = b.permute(1, 2, 0).reshape(nb, 1, 2 * bs)
        return weight, bias

    def forward(self, x):
        # x: (B, h, w, D) -> (B, h, w, D)
        B, h, w, D = x.shape
        # The spectrum stays fp32, under autocast and in an fp16 model: view_as_complex and the
        # FFTs take no bf16, and the ortho FFT's sums over the grid lose low-precision mantissa bits.
        with full_precision(x):
            if self.fft_impl == "torch":
                spectrum = torch.view_as_real(torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho"))
            else:
                spectrum = torch.stack(rfft2_dft(x.float()), dim=-1)
            freq_shape = spectrum.shape                                  # (B, h, w//2+1, D, 2)
            # (nb, M, 2 bs): one batched matmul per layer over all frequencies and batch items
            tokens = spectrum.reshape(-1, self.blocks, 2 * self.block_size).transpose(0, 1)
            w1, b1 = self._as_real(self.w1.float(), self.b1.float())
            w2, b2 = self._as_real(self.w2.float(), self.b2.float())
            tokens = F.relu(torch.baddbmm(b1, tokens, w1))
            tokens = F.softshrink(torch.baddbmm(b2, tokens, w2), self.softshrink)
            spectrum = tokens.transpose(0, 1).reshape(freq_shape)
            if self.fft_impl == "torch":
                out = torch.fft.irfft2(torch.view_as_complex(spectrum.contiguous()), s=(h, w), dim=(1, 2), norm="ortho")
            else:
                out = irfft2_dft(spectrum[..., 0], spectrum[..., 1], w)
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------
# GRFM pathway 2: gated linear recurrence (RG-LRU) with a parallel scan


CHUNK = 16  # scan chunk length: bench.py --sections=scan measures the choice


def _hillis_steele(a, b, dim, reverse=False):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along `dim` (h_{t+1} if reverse) in log2(n)
    shift-multiply-add steps (Hillis & Steele 1986). Returns (product of the a's so far,
    h). Exact in fp32 because it only multiplies numbers in [0, 1], unlike
    exp(cumsum(log a)), which overflows."""
    n = a.shape[dim]
    shift = 1
    while shift < n:
        pad = [0, 0] * (a.dim() - 1 - dim) + ([0, shift] if reverse else [shift, 0])
        start = shift if reverse else 0
        a_prev = F.pad(a, pad, value=1.0).narrow(dim, start, n)
        b_prev = F.pad(b, pad, value=0.0).narrow(dim, start, n)
        b = b + a * b_prev
        a = a * a_prev
        shift *= 2
    return a, b


def _chunked_scan(a, b, chunk, reverse):
    # A Hillis-Steele scan inside chunks of `chunk` tokens, then one over the chunk ends,
    # then each chunk adds its incoming state: log2(chunk) + 1 passes over the data
    # instead of log2(N) for a flat scan.
    B, N, D = a.shape
    if N <= chunk:
        return _hillis_steele(a, b, 1, reverse)[1]
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    after = (0, 0, pad, 0) if reverse else (0, 0, 0, pad)  # padding after the last token in scan order
    a = F.pad(a, after, value=1.0).view(B, n_chunks, chunk, D)
    b = F.pad(b, after, value=0.0).view(B, n_chunks, chunk, D)
    decay, local = _hillis_steele(a, b, 2, reverse)
    last = 0 if reverse else -1
    _, chunk_end = _hillis_steele(decay[:, :, last], local[:, :, last], 1, reverse)   # true state at each chunk's end
    if reverse:                                                                    # state entering each chunk
        incoming = F.pad(chunk_end, (0, 0, 0, 1))[:, 1:]
    else:
        incoming = F.pad(chunk_end, (0, 0, 1, 0))[:, :-1]
    h = (local + decay * incoming.unsqueeze(2)).reshape(B, n_chunks * chunk, D)
    return h[:, pad:] if reverse else h[:, :N]


class _LinearScan(torch.autograd.Function):
    """The backward pass of a linear recurrence is the same recurrence run the other way:
    with g_t = dL/dh_t in total, g_t = grad_t + a_{t+1} g_{t+1}, dL/db_t = g_t and
    dL/da_t = g_t h_{t-1}. One more scan instead of autograd through every scan step."""

    @staticmethod
    def forward(ctx, a, b, chunk, reverse):
        h = _chunked_scan(a, b, chunk, reverse)
        ctx.save_for_backward(a, h)
        ctx.chunk, ctx.reverse = chunk, reverse
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        next_, prev = ((0, 0, 1, 0), (0, 0, 0, 1)) if ctx.reverse else ((0, 0, 0, 1), (0, 0, 1, 0))
        a_next = F.pad(a, next_).narrow(1, 1 - int(ctx.reverse), a.shape[1])
        h_prev = F.pad(h, prev).narrow(1, int(ctx.reverse), h.shape[1])
        g = _chunked_scan(a_next, grad_h, ctx.chunk, not ctx.reverse)
        return g * h_prev, g, None, None


def linear_scan(a, b, reverse=False, chunk=CHUNK):
    """h_t = a_t * h_{t-1} + b_t over dim 1 of (B, N, D), h_{-1} = 0 (h_{t+1} and h_N = 0
    if reverse), without a loop over tokens."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _LinearScan.apply(a, b, chunk, reverse)
    return _chunked_scan(a, b, chunk, reverse)  # plain tensor ops: what torch.export traces


class RecurrentMixer(nn.Module):
    """Griffin's RG-LRU over the raster order of the grid (arXiv 2402.19427, eq. 1-4):
        r_t = sigmoid(W_a x_t),  i_t = sigmoid(W_x x_t),  a_t = sigmoid(Lambda)^(c r_t),
        h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t).
    W_a and W_x are block-diagonal (one block per head), as in Griffin: 3x faster than a
    dense D x 2D gate at 4096 tokens here. An image has no causal order, so half the
    channels run forward and half backward: bidirectional at the cost of one scan."""
    c = 8.0

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, block = heads, dim // heads
        self.gate_weight = nn.Parameter(torch.randn(heads, block, 2 * block) / math.sqrt(block))
        self.gate_bias = nn.Parameter(torch.zeros(heads, 2 * block))
        # Griffin's init: a = sigmoid(Lambda)^c uniform in [0.9, 0.999]
        a = torch.empty(dim).uniform_(0.9, 0.999)
        self.log_lambda = nn.Parameter(torch.logit(a ** (1 / self.c)))

    def forward(self, x):
        # x: (B, N, D), N in raster order
        B, N, D = x.shape
        gates = torch.einsum("bnhi,hio->bnho", x.view(B, N, self.heads, -1), self.gate_weight) + self.gate_bias
        # The recurrence runs in fp32 whatever the autocast dtype: h_t sums products of up to
        # N decays near 1, and bf16's 8-bit mantissa rounds 0.999 to 1.0.
        recurrence_gate, input_gate = torch.sigmoid(gates.float()).chunk(2, dim=-1)
        log_a = -self.c * F.softplus(-self.log_lambda.float()) * recurrence_gate.reshape(B, N, D)  # log sigmoid(L)^(cr)
        a = torch.exp(log_a)
        b = torch.sqrt((-torch.expm1(2 * log_a)).clamp_min(1e-8)) * (input_gate.reshape(B, N, D) * x.float())
        half = D // 2
        h = torch.cat([linear_scan(a[..., :half], b[..., :half]),
                       linear_scan(a[..., half:], b[..., half:], reverse=True)], dim=-1)
        return h.to(x.dtype)


# ---------------------------------------------------------------------------------------
# GRFM pathway 3: Manhattan spatial decay (RMT)


def decay_matrix(gamma, n):
    """gamma: (H,) -> (H, n, n) row-normalised 1D decay gamma^|i - j|."""
    pos = torch.arange(n, device=gamma.device, dtype=gamma.dtype)
    distance = (pos[:, None] - pos[None, :]).abs()
    decay = gamma[:, None, None] ** distance
    return decay / decay.sum(dim=-1, keepdim=True)


class SpatialMixer(nn.Module):
    """Per head h: out_n = sum_m D[n, m] (W_v x)_m with D[n, m] = gamma_h^(|dy| + |dx|),
    row-normalised so the output is a weighted mean whose scale does not grow with the
    grid. D factorises into gamma^|dy| * gamma^|dx|, so it is applied as a 1D decay along
    the columns, then along the rows: O(N (h + w)) instead of O(N^2)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.value = nn.Linear(dim, dim)
        # RMT's spread of decay rates: head k sees ~2^(k+1) tokens far
        gamma = 1 - 2.0 ** (-1 - torch.arange(heads, dtype=torch.float32) * 4 / max(heads - 1, 1))
        self.gamma_logit = nn.Parameter(torch.logit(gamma.clamp(0.3, 0.97)))

    def forward(self, x):
        # x: (B, h, w, D)
        B, h, w, D = x.shape
        v = self.value(x).view(B, h, w, self.heads, D // self.heads)
        gamma = torch.sigmoid(self.gamma_logit).float()
        v = torch.einsum("gij,bjwgc->biwgc", decay_matrix(gamma, h).to(v.dtype), v)    # along columns
        v = torch.einsum("gij,bhjgc->bhigc", decay_matrix(gamma, w).to(v.dtype), v)    # along rows
        return v.reshape(B, h, w, D)


class GRFM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fourier = FourierMixer(cfg.dim, cfg.fourier_blocks, cfg.softshrink, cfg.fft_impl)
        self.recurrent = RecurrentMixer(cfg.dim, cfg.heads)
        self.spatial = SpatialMixer(cfg.dim, cfg.heads)
        self.gate = nn.Linear(cfg.dim, cfg.dim)
        self.alpha = nn.Parameter(torch.full((cfg.dim,), 0.1))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, hw):
        # x: (B, N, D), N = h*w tokens in raster order
        B, N, D = x.shape
        grid = x.view(B, *hw, D)
        g = torch.sigmoid(self.gate(x)).to(x.dtype)  # autocast returns the gate in bf16/fp16; lerp wants one dtype
        fourier = self.fourier(grid).reshape(B, N, D)
        spatial = self.spatial(grid).reshape(B, N, D)
        mixed = torch.lerp(self.recurrent(x), fourier, g) + self.alpha * spatial  # g*F + (1-g)*R, one kernel
        return self.out(self.norm(mixed))


# ---------------------------------------------------------------------------------------
# Attention: cross-attention to the text (Core) and local window attention (Coda)


class Attention(nn.Module):
    """Multi-head attention with F.scaled_dot_product_attention: self-attention, or
    cross-attention to keys and values computed once by key_values(context)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, x):
        B, N, D = x.shape
        return x.view(B, N, self.heads, D // self.heads).transpose(1, 2)

    def key_values(self, context):
        """(B, L, D) -> (2, B, heads, L, D / heads): keys and values, stacked (a view, no copy)."""
        B, L, D = context.shape
        return self.key_value(context).view(B, L, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x, key_values=None, mask=None):
        # x: (B, N, D); key_values: from key_values(), or None for self-attention;
        # mask: broadcastable to (B, heads, N, L), True = attend
        B, N, D = x.shape
        k, v = self.key_values(x) if key_values is None else key_values
        out = F.scaled_dot_product_attention(self.split_heads(self.query(x)), k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(B, N, D))


class SelfAttentionMixer(Attention):
    """Full self-attention over all h*w tokens with GRFM's call signature: the Core's token
    mixer with IrisConfig(mixer="attention"), the baseline GRFM is measured against."""

    def forward(self, x, hw):
        return super().forward(x)


def window_attention(attention, x, hw, window):
    """Self-attention inside non-overlapping window x window tiles of the grid (Swin
    without the shift: the Core already mixes globally, the Coda only sharpens locally).
    A grid that does not tile is padded, and the padding is masked out of the keys."""
    B, N, D = x.shape
    h, w = hw
    wh, ww = min(window, h), min(window, w)
    pad_h, pad_w = -h % wh, -w % ww
    grid = F.pad(x.view(B, h, w, D), (0, 0, 0, pad_w, 0, pad_h))
    H, W = h + pad_h, w + pad_w
    tiles = grid.view(B, H // wh, wh, W // ww, ww, D).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, D)
    mask = None
    if pad_h or pad_w:
        valid = F.pad(x.new_ones(1, h, w), (0, pad_w, 0, pad_h)).view(1, H // wh, wh, W // ww, ww)
        mask = valid.permute(0, 1, 3, 2, 4).reshape(-1, 1, 1, wh * ww).bool().repeat(B, 1, 1, 1)
    out = attention(tiles, mask=mask)
    out = out.view(B, H // wh, W // ww, wh, ww, D).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, D)
    return out[:, :h, :w].reshape(B, N, D)


# ---------------------------------------------------------------------------------------
# Blocks


class PreludeBlock(nn.Module):
    """norm -> depthwise 3x3 -> GELU -> pointwise, then norm -> FFN: cheap local features."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pointwise = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, mlp_ratio)

    def forward(self, x, hw):
        B, N, D = x.shape
        y = self.norm1(x).transpose(1, 2).reshape(B, D, *hw)
        y = F.gelu(self.depthwise(y)).flatten(2).transpose(1, 2)
        x = x + self.pointwise(y)
        return x + self.ffn(self.norm2(x))


class CoreLayer(nn.Module):
    """adaLN-Zero(c) -> GRFM -> gate; norm -> cross-attention -> gate; adaLN -> FFN -> gate."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.mixer = GRFM(cfg) if cfg.mixer == "grfm" else SelfAttentionMixer(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.cross_attention = Attention(cfg.dim, cfg.heads)
        self.norm3 = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.ffn = FeedForward(cfg.dim, cfg.mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 7 * cfg.dim))

    def forward(self, x, c, hw, text_kv, text_mask):
        shift1, scale1, gate1, gate2, shift3, scale3, gate3 = self.modulation(c).unsqueeze(1).chunk(7, dim=-1)
        x = x + gate1 * self.mixer(modulate(self.norm1(x), shift1, scale1), hw)
        x = x + gate2 * self.cross_attention(self.norm2(x), text_kv, text_mask)
        return x + gate3 * self.ffn(modulate(self.norm3(x), shift3, scale3))


class CodaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.window = cfg.window
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attention = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.mlp_ratio)

    def forward(self, x, hw):
        x = x + window_attention(self.attention, self.norm1(x), hw, self.window)
        return x + self.ffn(self.norm2(x))


# ---------------------------------------------------------------------------------------
# The generator


class Iris(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        D = cfg.dim
        if D % cfg.heads or (D // cfg.heads) % 2 or D % 4:
            raise ValueError(f"dim {D} must split into {cfg.heads} heads of even width and be a multiple of 4")
        if cfg.mixer not in ("grfm", "attention"):
            raise ValueError(f"mixer must be 'grfm' or 'attention', not {cfg.mixer!r}")
        self.patch_embed = nn.Conv2d(cfg.latent_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.text_proj = nn.Linear(cfg.text_dim, D)
        self.time_embed = ScalarEmbedder(D, scale=1000.0)      # t in [0, 1] spread like DDPM's 1000 steps
        self.progress_embed = ScalarEmbedder(D, scale=1000.0)  # i / r in [0, 1)
        self.text_pool = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.prelude = nn.ModuleList([PreludeBlock(D, cfg.mlp_ratio) for _ in range(2)])
        self.adapter = nn.Linear(2 * D, D)
        self.core = nn.ModuleList([CoreLayer(cfg) for _ in range(cfg.core_layers)])
        self.coda = nn.ModuleList([CodaBlock(cfg) for _ in range(2)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.unpatchify = nn.ConvTranspose2d(D, cfg.latent_channels, cfg.patch_size, stride=cfg.patch_size)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for embedder in (self.time_embed, self.progress_embed):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every Core layer starts as the identity, and the output as zero (DiT)
        for layer in self.core:
            nn.init.zeros_(layer.modulation[-1].weight)
            nn.init.zeros_(layer.modulation[-1].bias)
        for module in (self.final_modulation[-1], self.unpatchify):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def check_latent_size(self, height, width):
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent {height}x{width} is not divisible by patch_size {p}: "
                             f"image sides must be multiples of {16 * p}")

    def prelude_forward(self, z, t, text, text_mask):
        """Everything before the Core: -> e (B, N, D) the prelude's tokens, c_base (B, D)
        the conditioning of time and text, and text_kv (core_layers, 2, B, heads, L, D/heads):
        each Core layer's cross-attention keys and values of the text, the same in every
        iteration, so computed here once instead of r times."""
        x = self.patch_embed(z)
        hw = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = x + position_embedding(*hw, x.shape[-1], x.device, x.dtype)
        context = self.text_proj(text)
        keep = text_mask[:, :, None].to(context.dtype)
        pooled = (context * keep).sum(1) / keep.sum(1).clamp_min(1)
        c_base = self.time_embed(t) + self.text_pool(pooled)
        for block in self.prelude:
            x = block(x, hw)
        return x, c_base, torch.stack([layer.cross_attention.key_values(context) for layer in self.core])

    def core_iteration(self, s, e, c_base, progress, text_kv, text_mask, hw):
        """s_{i+1} = Core(adapter([s_i, e]), c_i), progress: (B,) = i / r. The core is told its
        progress rather than i, because r at inference may exceed every r seen in training."""
        c = c_base + self.progress_embed(progress)
        s = self.adapter(torch.cat([s, e], dim=-1))
        for layer, layer_kv in zip(self.core, text_kv):
            s = layer(s, c, hw, layer_kv, text_mask[:, None, None, :])
        return s

    def coda_forward(self, s, c_base, hw):
        """Core state (B, N, D) -> velocity (B, 16, h, w)."""
        for block in self.coda:
            s = block(s, hw)
        shift, scale = self.final_modulation(c_base).unsqueeze(1).chunk(2, dim=-1)
        s = modulate(self.final_norm(s), shift, scale)
        return self.unpatchify(s.transpose(1, 2).reshape(len(s), -1, *hw))

    def forward(self, z, t, text, text_mask, iters):
        """z: (B, 16, H/16, W/16) noisy latent; t: (B,) in [0, 1]; text: (B, L, text_dim)
        token embeddings with text_mask: (B, L) bool, True for real tokens; iters: core
        iterations r. Returns the velocity, shaped like z. export_mobile.py exports the
        three stages separately, so that a phone picks r at run time too."""
        self.check_latent_size(*z.shape[-2:])
        if not torch.compiler.is_compiling() and not bool(text_mask.any(dim=1).all()):  # reading it breaks the graph
            raise ValueError("a prompt has no unmasked text token; encode '' (not nothing) for the unconditional branch")
        hw = (z.shape[-2] // self.config.patch_size, z.shape[-1] // self.config.patch_size)
        e, c_base, text_kv = self.prelude_forward(z, t, text, text_mask)
        s = e
        # Truncated backprop (Huginn): only the last k iterations keep activations for
        # the backward pass, so training memory does not grow with r.
        first_with_grad = iters - self.config.backprop_iters if self.config.backprop_iters else 0
        for i in range(iters):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_with_grad):
                progress = torch.full((len(z),), i / iters, device=z.device)
                s = self.core_iteration(s, e, c_base, progress, text_kv, text_mask, hw)
        return self.coda_forward(s, c_base, hw)


def count_parameters(model):
    """Parameters per component, in the order data flows through them."""
    groups = {
        "embed": [model.patch_embed, model.text_proj, model.time_embed, model.progress_embed, model.text_pool],
        "prelude": [model.prelude],
        "core": [model.adapter, model.core],
        "coda": [model.coda, model.final_modulation, model.unpatchify],
    }
    counts = {name: sum(p.numel() for m in modules for p in m.parameters()) for name, modules in groups.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    return counts


def wake_up(model, std=0.02):
    """adaLN-Zero starts every gate and the output at zero, so an untrained model outputs
    0 whatever its input: give those weights small random values, as after some training,
    for tests and export checks that must see every pathway."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=std)
    return model


# ---------------------------------------------------------------------------------------
# Sizes (seed figures: Tiny ~19M, Small ~47M, Base ~135M generator parameters)


def iris_tiny(**overrides):
    return Iris(IrisConfig(**{**dict(dim=384, heads=6, core_layers=3), **overrides}))


def iris_small(**overrides):
    return Iris(IrisConfig(**{**dict(dim=576, heads=9, core_layers=4), **overrides}))


def iris_base(**overrides):
    return Iris(IrisConfig(**{**dict(dim=896, heads=14, core_layers=5), **overrides}))


SIZES = {"tiny": iris_tiny, "small": iris_small, "base": iris_base}


def newest_generator_run():
    from safetensors import safe_open
    runs = []
    for path in glob.glob("out*/ckpt.safetensors"):
        with safe_open(path, framework="pt") as f:
            if "text_encoder" in (f.metadata() or {}).get("model_config", ""):  # a generator, not a VAE
                runs.append(path)
    if not runs:
        raise SystemExit("error: no generator checkpoint under out*/; train one with `python train_flow.py config/shapes.py` "
                         "or pass --out_dir")
    return os.path.dirname(max(runs, key=os.path.getmtime))


def load_generator(out_dir="", device="cpu", **overrides):
    """The EMA generator of a train_flow.py / distill.py run ('' = the newest under out*/),
    the run's settings and its folder. overrides change inference-only fields, e.g.
    fft_impl="dft" for export."""
    from training import read_checkpoint, submodule_state
    out_dir = out_dir or newest_generator_run()
    path = os.path.join(out_dir, "ckpt.safetensors")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no generator checkpoint at {path}; train one with `python train_flow.py config/<name>.py` "
                         f"or point --out_dir at one")
    tensors, meta = read_checkpoint(path, prefixes=("ema.",))
    if "text_encoder" not in meta["model_config"]:
        raise SystemExit(f"error: {path} is a VAE checkpoint, not a generator; point --out_dir at a train_flow.py "
                         f"or distill.py run")
    model = Iris(IrisConfig(**{**meta["model_config"], **overrides}))
    model.load_state_dict(submodule_state(tensors, "ema."))
    return model.to(device).eval().requires_grad_(False), meta["config"], out_dir
