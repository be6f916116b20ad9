"""
The IRIS generator: a recurrent-depth diffusion transformer that predicts the
rectified-flow velocity of a VAE latent, conditioned on text.

    z (B, 16, H/16, W/16) -> patch embed + 2D sin-cos -> Prelude -> e
    s_0 = e;  s_{i+1} = Core(injection([s_i, e]), c_i)  for i = 0 .. r-1    (shared weights)
    Coda(s_r) -> final adaLN -> unpatchify -> v (B, 16, H/16, W/16)

The Core is ONE block of `core_layers` layers applied r times (r = 4..16, chosen at run
time), so a phone holds a small model and trades compute for quality with `--iters`.
Feeding the prelude output e into every iteration is Huginn's input injection
(Geiping et al. 2025, arXiv 2502.05171); without it deep recurrence drifts.

Each Core layer mixes tokens with GRFM (below) instead of self-attention, so its cost
grows like N log N rather than N^2, attends to the text tokens with cross-attention, and
is conditioned with adaLN-Zero (DiT, Peebles & Xie 2022, arXiv 2212.09748) on
c_i = emb(t) + emb(i / r) + MLP(pooled text). IrisConfig(text_layers=k) first re-reads the frozen
text encoder's tokens with k trainable transformer layers (a text stage), so that it can learn
which colour goes with which shape where the encoder alone gives nearly a bag of words (on the
scenes it did not help at 3000 steps: docs/results.md).

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

The file reads top-down: the config, the embeddings, the three GRFM views and GRFM, attention,
the blocks (the Core layer among them), then Iris, whose velocity() is the whole forward pass
with the shape of every tensor. At the end: the fast paths (each the speed-up of a plain
reference above, and tested against it) and the model sizes. `python bench.py` measures
them; tests are in test_iris.py.
"""
import contextlib
import math
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
    prelude_blocks: int = 2      # depthwise-conv blocks before the Core
    core_layers: int = 2         # layers in the shared Core block
    coda_blocks: int = 2         # window-attention blocks after it
    mlp_ratio: float = 4.0
    text_dim: int = 384          # width of the text encoder's tokens (MiniLM 384, CLIP-L 768)
    fourier_blocks: int = 8      # AFNO's block-diagonal split of the channels
    softshrink: float = 0.01
    window: int = 8              # Coda's local attention window, in tokens
    mixer: str = "grfm"          # the Core's token mixer: GRFM or full self-attention (the baseline)
    backprop_iters: int = 0      # train through only the last k core iterations (0 = all)
    fft_impl: str = "torch"      # the complex FFT, or the DFT as real matmuls (for export)
    text_encoder: str = "minilm"  # the token space text_proj was trained on (text.py); samplers must match it
    control: str = ""            # "" (no adapter) or the signal a ControlAdapter reads (data.CONTROLS)
    iteration_embedding: str = "progress"  # what the Core is told of its iteration: i / r, or nothing (Huginn)
    state_init: str = "prelude"  # the Core's start s_0: the Prelude's e, or noise (Huginn's s_0 ~ N(0, I))
    text_layers: int = 0         # trainable transformer layers over the frozen encoder's tokens (0 = none)


# The values each choice of IrisConfig may take, the first its default; train_flow.py's
# settings offer the same
CHOICES = dict(mixer=("grfm", "attention"), fft_impl=("torch", "dft"), iteration_embedding=("progress", "none"),
               state_init=("prelude", "noise"))


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
    return torch.cat([sinusoidal_embedding(ys.flatten(), dim // 2), sinusoidal_embedding(xs.flatten(), dim // 2)],
                     dim=1)


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


class FourierMixer(nn.Module):
    """AFNO: rfft2 -> block-diagonal complex 2-layer MLP -> softshrink -> irfft2. With
    fft_impl='dft' the FFTs are real matmuls (rfft2_dft, under "Fast paths"), which every
    export runtime runs."""

    def __init__(self, dim, blocks, softshrink, fft_impl):
        super().__init__()
        if dim % blocks:
            raise ValueError(f"dim {dim} is not divisible by fourier_blocks {blocks}")
        if fft_impl not in CHOICES["fft_impl"]:
            raise ValueError(f"fft_impl must be 'torch' or 'dft', not {fft_impl!r}")
        self.blocks, self.block_size = blocks, dim // blocks
        self.softshrink, self.fft_impl = softshrink, fft_impl
        # (real, imag) parts of each block's complex weights and biases, as AFNO stores them
        self.w1 = nn.Parameter(0.02 * torch.randn(2, blocks, self.block_size, self.block_size))
        self.b1 = nn.Parameter(torch.zeros(2, blocks, self.block_size))
        self.w2 = nn.Parameter(0.02 * torch.randn(2, blocks, self.block_size, self.block_size))
        self.b2 = nn.Parameter(torch.zeros(2, blocks, self.block_size))

    def prepare(self):
        """-> (w1, b1, w2, b2): each complex product (xr + i xi)(wr + i wi) as ONE real matmul
        on interleaved [xr0, xi0, xr1, xi1, ...] vectors: row 2j + p acts on part p of x_j,
        column 2k + q makes part q of out_k. That is the memory layout of torch.view_as_real,
        so the FFT output needs no copy."""
        nb, bs = self.blocks, self.block_size
        prepared = []
        for (w_re, w_im), b in ((self.w1.float(), self.b1.float()), (self.w2.float(), self.b2.float())):
            weight = torch.stack([w_re, w_im, -w_im, w_re]).view(2, 2, nb, bs, bs)   # (p, q, block, j, k)
            prepared += [weight.permute(2, 3, 0, 4, 1).reshape(nb, 2 * bs, 2 * bs),
                         b.permute(1, 2, 0).reshape(nb, 1, 2 * bs)]
        return prepared

    def forward(self, x, prepared=None):
        # x: (B, h, w, D) -> (B, h, w, D); prepared: prepare()'s matrices, computed here if not given
        B, h, w, D = x.shape
        # The spectrum stays fp32, under autocast and in an fp16 model: view_as_complex and the
        # FFTs take no bf16, and the ortho FFT's sums over the grid lose low-precision mantissa bits.
        with full_precision(x):
            if self.fft_impl == "torch":
                spectrum = torch.view_as_real(torch.fft.rfft2(x.float(), dim=(1, 2), norm="ortho"))
            else:
                spectrum = rfft2_dft(x.float())
            freq_shape = spectrum.shape                                  # (B, h, w//2+1, D, 2)
            # (nb, M, 2 bs): one batched matmul per layer over all frequencies and batch items
            tokens = spectrum.reshape(-1, self.blocks, 2 * self.block_size).transpose(0, 1)
            w1, b1, w2, b2 = self.prepare() if prepared is None else prepared
            tokens = F.relu(torch.baddbmm(b1, tokens, w1))
            tokens = F.softshrink(torch.baddbmm(b2, tokens, w2), self.softshrink)
            spectrum = tokens.transpose(0, 1).reshape(freq_shape)
            if self.fft_impl == "torch":
                out = torch.fft.irfft2(torch.view_as_complex(spectrum.contiguous()), s=(h, w), dim=(1, 2), norm="ortho")
            else:
                out = irfft2_dft(spectrum, w)
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------
# GRFM pathway 2: gated linear recurrence (RG-LRU)


class RecurrentMixer(nn.Module):
    """Griffin's RG-LRU over the raster order of the grid (arXiv 2402.19427, eq. 1-4):
        r_t = sigmoid(W_a x_t),  i_t = sigmoid(W_x x_t),  a_t = sigmoid(Lambda)^(c r_t),
        h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t).
    W_a and W_x are block-diagonal (one block per head), as in Griffin: much faster than a
    dense D x 2D gate on long sequences. An image has no causal order, so half the
    channels run forward and half backward: bidirectional at the cost of one scan."""
    c = 8.0

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, block = heads, dim // heads
        self.gate_weight = nn.Parameter(torch.randn(heads, block, 2 * block) / math.sqrt(block))
        self.gate_bias = nn.Parameter(torch.zeros(heads, 2 * block))
        # Griffin's init: a = sigmoid(Lambda)^c uniform in [0.9, 0.999]
        a = torch.empty(dim).uniform_(0.9, 0.999)
        self.decay_logit = nn.Parameter(torch.logit(a ** (1 / self.c)))  # Griffin's Lambda

    def prepare(self):
        """-> log sigmoid(Lambda)^c (D,), so that log a_t = r_t times it."""
        return -self.c * F.softplus(-self.decay_logit.float())

    def forward(self, x, prepared=None):
        # x: (B, N, D), N in raster order; prepared: prepare()'s rates, computed here if not given
        B, N, D = x.shape
        gates = torch.einsum("bnhi,hio->bnho", x.view(B, N, self.heads, -1), self.gate_weight) + self.gate_bias
        # The recurrence runs in fp32 whatever the autocast dtype: h_t sums products of up to
        # N decays near 1, and bf16's 8-bit mantissa rounds 0.999 to 1.0.
        recurrence_gate, input_gate = torch.sigmoid(gates.float()).chunk(2, dim=-1)
        log_a = (self.prepare() if prepared is None else prepared) * recurrence_gate.reshape(B, N, D)
        b = torch.sqrt((-torch.expm1(2 * log_a)).clamp_min(1e-8)) * (input_gate.reshape(B, N, D) * x.float())
        # The backward half's tokens are flipped and stacked under the forward half as more
        # rows: one scan runs both directions.
        h = linear_scan(self._fold(log_a), self._fold(b))
        return torch.cat([h[:B], h[B:].flip(1)], dim=-1).to(x.dtype)

    @staticmethod
    def _fold(x):
        """(B, N, D) -> (2B, N, D/2): the first half of the channels, then the second half
        with its tokens in reverse order."""
        forward, backward = x.chunk(2, dim=-1)
        return torch.cat([forward, backward.flip(1)])


def sequential_scan(log_a, b):
    """The recurrence as written, h_t = a_t h_{t-1} + b_t with a_t = exp(log_a_t), one token at
    a time: the reference for linear_scan (under "Fast paths"), which RecurrentMixer calls; N
    sequential steps are too slow to train with."""
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        h = log_a[:, t].exp() * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------------------------------
# GRFM pathway 3: Manhattan spatial decay (RMT)


def decay_matrix(log_gamma, n):
    """log_gamma: (H,) -> (H, n, n) row-normalised 1D decay gamma^|i - j|."""
    position = torch.arange(n, device=log_gamma.device, dtype=log_gamma.dtype)
    decay = torch.exp(log_gamma[:, None, None] * (position[:, None] - position[None, :]).abs())
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

    def prepare(self, hw):
        """-> the 1D decays along the columns (H, h, h) and the rows (H, w, w)."""
        h, w = hw
        log_gamma = F.logsigmoid(self.gamma_logit.float())
        decay_h = decay_matrix(log_gamma, h)
        return decay_h, decay_h if w == h else decay_matrix(log_gamma, w)

    def forward(self, x, prepared=None):
        # x: (B, h, w, D); prepared: prepare()'s decays, computed here if not given.
        # Each 1D decay is one batched matmul over the heads g.
        B, h, w, D = x.shape
        G, C = self.heads, D // self.heads
        decay_h, decay_w = (d.to(x.dtype) for d in (self.prepare((h, w)) if prepared is None else prepared))
        v = self.value(x).view(B, h, w, G, C).permute(3, 1, 0, 2, 4).reshape(G, h, B * w * C)
        v = torch.bmm(decay_h, v)                                                     # along columns
        v = v.view(G, h, B, w, C).permute(0, 3, 2, 1, 4).reshape(G, w, B * h * C)
        v = torch.bmm(decay_w, v)                                                     # along rows
        return v.view(G, w, B, h, C).permute(2, 3, 1, 0, 4).reshape(B, h, w, D)


class GRFM(nn.Module):
    """The Gated Recurrent Fourier Mixer: three views of the h x w token grid, fused.
        y = W_o LN(g * fourier(x) + (1 - g) * recurrent(x) + alpha * spatial(x)),  g = sigmoid(W_g x)
    The gate picks, per token and channel, between the global spectral view and the
    ordered recurrent one; the Manhattan decay adds local 2D context at a learned weight
    alpha (per channel, from 0.1)."""

    def __init__(self, config):
        super().__init__()
        self.fourier = FourierMixer(config.dim, config.fourier_blocks, config.softshrink, config.fft_impl)
        self.recurrent = RecurrentMixer(config.dim, config.heads)
        self.spatial = SpatialMixer(config.dim, config.heads)
        self.gate = nn.Linear(config.dim, config.dim)
        self.alpha = nn.Parameter(torch.full((config.dim,), 0.1))
        self.norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.dim)

    def prepare(self, hw):
        """What the three pathways derive from their weights alone: the same at every Core
        iteration, so Iris.velocity computes it once per forward pass, not once per iteration."""
        return self.fourier.prepare(), self.recurrent.prepare(), self.spatial.prepare(hw)

    def forward(self, x, hw, prepared=None):
        # x: (B, N, D), N = h*w tokens in raster order; prepared: prepare(hw), computed here if not given
        B, N, D = x.shape
        grid = x.view(B, *hw, D)
        fourier_weights, recurrent_rates, spatial_decays = self.prepare(hw) if prepared is None else prepared
        g = torch.sigmoid(self.gate(x)).to(x.dtype)  # autocast returns the gate in bf16/fp16; lerp wants one dtype
        fourier = self.fourier(grid, fourier_weights).reshape(B, N, D)
        spatial = self.spatial(grid, spatial_decays).reshape(B, N, D)
        mixed = torch.lerp(self.recurrent(x, recurrent_rates), fourier, g) + self.alpha * spatial  # g*F + (1-g)*R
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

    def prepare(self, hw):
        return None  # nothing to compute ahead

    def forward(self, x, hw, prepared=None):
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

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, elementwise_affine=False)
        self.mixer = GRFM(config) if config.mixer == "grfm" else SelfAttentionMixer(config.dim, config.heads)
        self.norm2 = nn.LayerNorm(config.dim)
        self.cross_attention = Attention(config.dim, config.heads)
        self.norm3 = nn.LayerNorm(config.dim, elementwise_affine=False)
        self.ffn = FeedForward(config.dim, config.mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 7 * config.dim))

    def forward(self, x, modulation, hw, text_kv, text_mask, prepared=None):
        # modulation: self.modulation(c), (B, 7D); prepared: self.mixer.prepare(hw). Iris.velocity
        # computes both ahead for all iterations.
        shift1, scale1, gate1, gate2, shift3, scale3, gate3 = modulation.unsqueeze(1).chunk(7, dim=-1)
        x = x + gate1 * self.mixer(modulate(self.norm1(x), shift1, scale1), hw, prepared)
        x = x + gate2 * self.cross_attention(self.norm2(x), text_kv, text_mask)
        return x + gate3 * self.ffn(modulate(self.norm3(x), shift3, scale3))


class TextLayer(nn.Module):
    """norm -> self-attention over the prompt's tokens, then norm -> FFN (a pre-norm
    transformer layer): the optional text stage, where a frozen encoder's tokens, which
    barely tell "a red circle and a blue square" from its colours swapped, can be re-read
    into the features that bind a colour to its shape and a shape to its side."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, mlp_ratio)

    def forward(self, x, mask):
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.ffn(self.norm2(x))


class CodaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.window = config.window
        self.norm1 = nn.LayerNorm(config.dim)
        self.attention = Attention(config.dim, config.heads)
        self.norm2 = nn.LayerNorm(config.dim)
        self.ffn = FeedForward(config.dim, config.mlp_ratio)

    def forward(self, x, hw):
        x = x + window_attention(self.attention, self.norm1(x), hw, self.window)
        return x + self.ffn(self.norm2(x))


class ControlAdapter(nn.Module):
    """Spatial control, ControlNet-like (Zhang et al. 2023, arXiv 2302.05543) but as light as
    T2I-Adapter (Mou et al. 2023, arXiv 2302.08453). Once per control map (B, 1, H, W) in
    [0, 1] at pixel resolution, forward() gives a hint h (B, N, D) on the generator's grid.
    Before every Core iteration, inject() turns it into tokens added to the state s_i. It
    reads s_i (what the iterations have drawn so far, the caption's words included) and the
    conditioning c (time and the pooled caption), so it can undo what a caption says against
    the map, which a hint added once, before the Core, cannot see to undo.
        tokens = W_out (y(s_i + h) - y(s_i)),   y(x) = x + FFN(adaLN(x, c))
    is exactly zero for h = 0, so strength s (h -> s h) runs from the base generator (0) to
    the trained adapter (1); W_out starts at zero, so a new adapter leaves the output
    unchanged, bit for bit, and training starts from the base model's behaviour."""

    def __init__(self, dim, patch_size, mlp_ratio, widths=(16, 32, 64, 128)):
        super().__init__()
        layers = [nn.Conv2d(1, widths[0], 3, padding=1), nn.SiLU()]
        for width_in, width_out in zip(widths, widths[1:] + widths[-1:]):  # 4 halvings: pixels -> the latent grid
            layers += [nn.Conv2d(width_in, width_out, 3, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(widths[-1], dim, patch_size, stride=patch_size))  # latent cells -> tokens
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ffn = FeedForward(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, dim, bias=False)  # no bias: no hint, no change

    def forward(self, control_map):
        return self.features(control_map).flatten(2).transpose(1, 2)

    def inject(self, hint, s, c):
        shift, scale = self.modulation(c).unsqueeze(1).chunk(2, dim=-1)
        y = lambda x: x + self.ffn(modulate(self.norm(x), shift, scale))  # noqa: E731
        return self.out(y(s + hint) - y(s))


# ---------------------------------------------------------------------------------------
# The generator


class Iris(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.dim
        if D % config.heads or (D // config.heads) % 2 or D % 4:
            raise ValueError(f"dim {D} must split into {config.heads} heads of even width and be a multiple of 4")
        for name, allowed in CHOICES.items():
            value = getattr(config, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
        self.patch_embed = nn.Conv2d(config.latent_channels, D, config.patch_size, stride=config.patch_size)
        self.text_proj = nn.Linear(config.text_dim, D)
        self.time_embed = ScalarEmbedder(D, scale=1000.0)      # t in [0, 1] spread like DDPM's 1000 steps
        # i / r in [0, 1)
        self.progress_embed = ScalarEmbedder(D, scale=1000.0) if config.iteration_embedding == "progress" else None
        self.text_pool = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        # the text stage (text_layers > 0): each token's place in the prompt, learned from zero
        # for the 77 a text encoder gives at most (text.MAX_TOKENS), then the layers
        self.text_positions = nn.Parameter(torch.zeros(77, D)) if config.text_layers else None
        self.text_layers = nn.ModuleList([TextLayer(D, config.heads, config.mlp_ratio)
                                          for _ in range(config.text_layers)])
        self.prelude = nn.ModuleList([PreludeBlock(D, config.mlp_ratio) for _ in range(config.prelude_blocks)])
        self.injection = nn.Linear(2 * D, D)  # Huginn's adapter: [s_i, e] -> D
        self.core = nn.ModuleList([CoreLayer(config) for _ in range(config.core_layers)])
        self.coda = nn.ModuleList([CodaBlock(config) for _ in range(config.coda_blocks)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.unpatchify = nn.ConvTranspose2d(D, config.latent_channels, config.patch_size, stride=config.patch_size)
        self.control_adapter = ControlAdapter(D, config.patch_size, config.mlp_ratio) if config.control else None
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in filter(None, (self.time_embed, self.progress_embed)):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every Core layer starts as the identity, and the output as zero (DiT)
        for layer in self.core:
            nn.init.zeros_(layer.modulation[-1].weight)
            nn.init.zeros_(layer.modulation[-1].bias)
        for module in (self.final_modulation[-1], self.unpatchify):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        if self.control_adapter is not None:  # a new adapter leaves the base generator's output unchanged
            nn.init.zeros_(self.control_adapter.out.weight)

    def check_latent_size(self, height, width):
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent {height}x{width} is not divisible by patch_size {p}: "
                             f"image sides must be multiples of {16 * p}")

    def encode_prompt(self, text, text_mask):
        """What depends on the prompt only, computed once per prompt (a sampler reuses it at
        every step, and the Core at every iteration): text: (B, L, text_dim) token embeddings,
        text_mask: (B, L) bool, True for real tokens. -> (text_kv, text_cond, text_mask) with
        text_kv (core_layers, 2, B, heads, L, D/heads) every cross-attention's keys and
        values, and text_cond (B, D) the pooled text's share of the adaLN conditioning."""
        if not torch.compiler.is_compiling() and not bool(text_mask.any(dim=1).all()):  # reading it breaks the graph
            raise ValueError("a prompt has no unmasked text token; "
                             "encode '' (not nothing) for the unconditional branch")
        context = self.text_proj(text)
        if self.text_layers:
            context = context + self.text_positions[:context.shape[1]]
            for layer in self.text_layers:
                context = layer(context, text_mask[:, None, None, :])
        keep = text_mask[:, :, None].to(context.dtype)
        text_cond = self.text_pool((context * keep).sum(1) / keep.sum(1).clamp_min(1))
        text_kv = torch.stack([layer.cross_attention.key_values(context) for layer in self.core])
        return text_kv, text_cond, text_mask

    def encode_control(self, control_map, strength=1.0):
        """A control map (B, 1, H, W) in [0, 1] (data.control_map) -> its hint (B, N, D),
        scaled by strength, that velocity() injects before every Core iteration; once per
        sampling call."""
        if self.control_adapter is None:
            raise ValueError("this generator has no control adapter; train one with train_control.py")
        return strength * self.control_adapter(control_map)

    def prelude_forward(self, z, t, text_cond):
        """Everything before the Core: -> e (B, N, D) the prelude's tokens and c_base (B, D)
        the conditioning of time and text."""
        x = self.patch_embed(z)
        hw = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = x + position_embedding(*hw, x.shape[-1], x.device, x.dtype)
        for block in self.prelude:
            x = block(x, hw)
        return x, self.time_embed(t) + text_cond

    def core_condition(self, c_base, progress):
        """c_i = c_base + emb(i / r), and from it each Core layer's adaLN-Zero modulation.
        progress (B,) -> a list of (B, 7D), one per layer; (r, 1) -> a list of (r, B, 7D): every
        iteration's at once, one matmul per layer instead of one per layer and iteration. The
        core is told its progress rather than i, because r at inference may exceed every r
        seen in training."""
        c = c_base if self.progress_embed is None else (
            c_base + self.progress_embed(progress.flatten()).view(*progress.shape, -1))
        return [layer.modulation(c) for layer in self.core]

    def core_iteration(self, s, e, modulations, text_kv, text_mask, hw, prepared):
        """s_{i+1} = Core(injection([s_i, e]), c_i); modulations: core_condition()'s for c_i;
        prepared: each layer's mixer.prepare(hw)."""
        s = self.injection(torch.cat([s, e], dim=-1))
        for layer, modulation, layer_kv, layer_prepared in zip(self.core, modulations, text_kv, prepared):
            s = layer(s, modulation, hw, layer_kv, text_mask[:, None, None, :], layer_prepared)
        return s

    def compile_core(self):
        """torch.compile each Core layer rather than the unrolled recurrence: one graph then
        serves every iteration and every r, where a graph of the loop grows with r and is
        rebuilt for each r. Gradient-free iterations (backprop_iters) add one more graph."""
        for layer in self.core:
            layer.compile()

    def coda_forward(self, s, c_base, hw):
        """Core state (B, N, D) -> velocity (B, 16, h, w)."""
        for block in self.coda:
            s = block(s, hw)
        shift, scale = self.final_modulation(c_base).unsqueeze(1).chunk(2, dim=-1)
        s = modulate(self.final_norm(s), shift, scale)
        return self.unpatchify(s.transpose(1, 2).reshape(len(s), -1, *hw))

    def core_noise(self, z):
        """A noise-started Core's s_0 ~ N(0, I) (B, N, D) for latents z (B, 16, h, w), drawn
        from torch's generator on z's device in fp32, in the order a runner given the Prelude's
        e (B, N, D) draws it (mobile.MobileGenerator)."""
        h, w = (side // self.config.patch_size for side in z.shape[-2:])
        return torch.randn(len(z), h * w, self.config.dim, device=z.device)

    def forward(self, z, t, text, text_mask, iters, control_map=None, every_iteration=False, core_start=None):
        """z: (B, 16, H/16, W/16) noisy latent; t: (B,) in [0, 1]; text: (B, L, text_dim)
        token embeddings with text_mask: (B, L) bool, True for real tokens; iters: core
        iterations r; control_map: an optional control map (B, 1, H, W) for the adapter.
        Returns the velocity, shaped like z; with every_iteration, the velocities read after
        each iteration that keeps gradients (k, B, 16, H/16, W/16), the last being r's.
        core_start: a noise-started Core's s_0 (B, N, D), drawn here when None."""
        hint = None if control_map is None else self.encode_control(control_map)
        return self.velocity(z, t, self.encode_prompt(text, text_mask), iters, hint, every_iteration=every_iteration,
                             core_start=core_start)[0]

    def velocity(self, z, t, encoded_prompt, iters, hint=None, exit_tolerance=0.0, every_iteration=False,
                 core_start=None):
        """forward() with the prompt encoded ahead by encode_prompt() and the control map by
        encode_control() (its hint) -> (v, the iterations each sample ran (B,)).
        export_mobile.py exports the stages separately, so that a phone encodes a prompt once
        and picks r at run time. exit_tolerance > 0: adaptive iterations, iters the most each
        sample may use (iterate_core). every_iteration: v is forward()'s read-outs."""
        self.check_latent_size(*z.shape[-2:])
        hw = (z.shape[-2] // self.config.patch_size, z.shape[-1] // self.config.patch_size)  # token grid h, w; N = h w
        text_kv, text_cond, text_mask = encoded_prompt   # (layers, 2, B, heads, L, D/heads), (B, D), (B, L)
        e, c_base = self.prelude_forward(z, t, text_cond)  # (B, N, D), (B, D)
        # What no iteration changes, computed once: each iteration's conditioning and what
        # the mixers derive from their weights
        if self.progress_embed is None:  # every iteration is conditioned alike
            modulations = [self.core_condition(c_base, None)] * iters  # r x layers x (B, 7D)
        else:
            progress = torch.arange(iters, device=z.device, dtype=torch.float32)[:, None] / iters  # (r, 1): i / r
            modulations = list(zip(*self.core_condition(c_base, progress)))  # r x layers x (B, 7D)
        prepared = [layer.mixer.prepare(hw) for layer in self.core]
        # Truncated backprop (Huginn): only the last k iterations keep activations for
        # the backward pass, so training memory does not grow with r.
        first_with_grad = iters - self.config.backprop_iters if self.config.backprop_iters else 0
        # Views taken outside no_grad keep their gradient functions, which module hooks (the
        # FLOP counter's) look for in a gradient-free iteration
        text_kv = text_kv.unbind(0)                      # layers x (2, B, heads, L, D/heads)

        def iteration(i, s):                             # s_i (B, N, D) -> s_{i+1} (B, N, D)
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_with_grad):
                if hint is not None:
                    s = s + self.control_adapter.inject(hint, s, c_base)  # hint (B, N, D)
                return self.core_iteration(s, e, modulations[i], text_kv, text_mask, hw, prepared)
        if self.config.state_init == "prelude":          # s_0 (B, N, D)
            s = e
        else:  # drawn by the caller for the whole batch (generator_step), or here
            s = (self.core_noise(z) if core_start is None else core_start).to(e)
        if every_iteration:  # the Coda reads every state that learns (flow.flow_loss's loop_distill)
            readouts = []
            for i in range(iters):
                s = iteration(i, s)
                if i >= first_with_grad:
                    readouts.append(self.coda_forward(s, c_base, hw))
            return torch.stack(readouts), torch.full((len(z),), float(iters), device=z.device)
        s, used = iterate_core(iteration, s, iters, exit_tolerance)  # s_r (B, N, D), used (B,)
        return self.coda_forward(s, c_base, hw), used   # v (B, 16, H/16, W/16)


def iterate_core(iteration, s, iters, exit_tolerance=0.0):
    """s_{i+1} = iteration(i, s_i) for i = 0 .. iters-1 -> (s, the iterations each sample ran
    (B,): all iters without exit_tolerance).

    exit_tolerance > 0: adaptive iterations (inference), iters the most. A sample stops once
    an iteration changes its state by at most that, relative to its norm,
    ||s_{i+1} - s_i|| <= tol ||s_{i+1}||, and keeps that state while the others run on."""
    if not exit_tolerance:
        for i in range(iters):
            s = iteration(i, s)
        return s, torch.full((len(s),), float(iters), device=s.device)
    running = torch.ones(len(s), dtype=torch.bool, device=s.device)
    used = torch.zeros(len(s), device=s.device)
    for i in range(iters):
        s_next = iteration(i, s)
        used += running
        change = (s_next - s).flatten(1).norm(dim=1) / s_next.flatten(1).norm(dim=1).clamp_min(1e-12)
        s = torch.where(running[:, None, None], s_next, s)
        running &= change > exit_tolerance
        if not running.any():
            break
    return s, used


def count_parameters(model):
    """Parameters per component, in the order data flows through them."""
    groups = {
        "embed": [model.patch_embed, model.time_embed, model.progress_embed],
        "text": [model.text_proj, model.text_positions, model.text_layers, model.text_pool],
        "prelude": [model.prelude],
        "core": [model.injection, model.core],
        "coda": [model.coda, model.final_modulation, model.unpatchify],
    }
    if model.control_adapter is not None:
        groups["control"] = [model.control_adapter]
    counts = {name: sum(p.numel() for m in modules if m is not None
                        for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()))
              for name, modules in groups.items()}
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
# Fast paths. Each computes what a plain reference above computes, for speed or for export,
# and a test holds it to that reference:
#   rfft2_dft / irfft2_dft  = torch.fft.rfft2 / irfft2      test_fourier_dft_matrices_match_the_torch_fft
#   linear_scan             = sequential_scan               test_parallel_scan_matches_a_sequential_loop_...


@lru_cache(maxsize=32)
def _dft_matrices(h, w):
    """rfft2/irfft2 (norm="ortho") on an h x w grid as four real matrices.

    Along w (real -> half spectrum, k = 0 .. w//2): [Yr; Yi] = [C_w; S_w] x.
    Along h (complex): [Zr; Zi] = [[C_h, -S_h], [S_h, C_h]] [Yr; Yi]; the inverse is the
    conjugate (C_h is symmetric). Back along w is irfft's c2r: x = [2 C_w^T, 2 S_w^T] [Yr; Yi],
    each bin counted twice except DC and Nyquist, whose imaginary parts it ignores.
    Here C = cos(2 pi k n / N) / sqrt(N) and S = -sin(2 pi k n / N) / sqrt(N).
    """
    n_h, n_w = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    angle_h = 2 * math.pi * torch.outer(n_h, n_h) / h
    angle_w = 2 * math.pi * torch.outer(torch.arange(w // 2 + 1, dtype=torch.float64), n_w) / w
    cos_h, sin_h = torch.cos(angle_h) / math.sqrt(h), -torch.sin(angle_h) / math.sqrt(h)
    cos_w, sin_w = torch.cos(angle_w) / math.sqrt(w), -torch.sin(angle_w) / math.sqrt(w)
    twice = torch.full((w // 2 + 1, 1), 2.0, dtype=torch.float64)
    twice[0] = 1
    if w % 2 == 0:
        twice[-1] = 1
    forward_w = torch.cat([cos_w, sin_w])
    forward_h = torch.cat([torch.cat([cos_h, -sin_h], 1), torch.cat([sin_h, cos_h], 1)])
    inverse_h = torch.cat([torch.cat([cos_h, sin_h], 1), torch.cat([-sin_h, cos_h], 1)])
    inverse_w = torch.cat([twice * cos_w, twice * sin_w]).T
    return tuple(m.float() for m in (forward_w, forward_h, inverse_h, inverse_w))


def rfft2_dft(x):
    """x: (B, h, w, D) real -> (B, h, w//2+1, D, 2), equal to view_as_real(rfft2(x, norm='ortho')):
    two real matmuls, which export to any runtime; its cost grows as N^2 against the FFT's N log N
    (bench.py --sections=mixer measures where they cross)."""
    B, h, w, D = x.shape
    forward_w, forward_h, _, _ = (m.to(x) for m in _dft_matrices(h, w))
    y = torch.matmul(forward_w, x)                                                 # (B, h, [re; im] k, D)
    y = y.view(B, h, 2, -1, D).transpose(1, 2).reshape(B, 2 * h, -1)               # (B, [re; im] h, k D)
    return torch.matmul(forward_h, y).view(B, 2, h, -1, D).permute(0, 2, 3, 4, 1)


def irfft2_dft(spectrum, w):
    """The inverse of rfft2_dft: (B, h, w//2+1, D, 2) -> (B, h, w, D), equal to
    irfft2(view_as_complex(spectrum), s=(h, w), norm='ortho')."""
    B, h, k, D, _ = spectrum.shape
    _, _, inverse_h, inverse_w = (m.to(spectrum) for m in _dft_matrices(h, w))
    y = torch.matmul(inverse_h, spectrum.permute(0, 4, 1, 2, 3).reshape(B, 2 * h, k * D))
    return torch.matmul(inverse_w, y.view(B, 2, h, k, D).transpose(1, 2).reshape(B, h, 2 * k, D))


CHUNK = 8  # tokens per closed-form chunk: bench.py --sections=scan measures the choice


def _shift(x, steps):
    """x (B, N, ...) moved `steps` tokens later, zeros in front: x_{t - steps} at t."""
    return F.pad(x, [0, 0] * (x.dim() - 2) + [steps, 0])[:, :x.shape[1]]


def _hillis_steele(a, b):
    """h_t = a_t h_{t-1} + b_t over dim 1 in log2(N) shift-multiply-add steps (Hillis & Steele
    1986): exact for any a in [0, 1], as it only multiplies decays. Shifting zeros into a is
    safe: a token whose span already starts at token 0 only ever meets the zero state h_{-1}."""
    shift = 1
    while shift < a.shape[1]:
        b = b + a * _shift(b, shift)
        if 2 * shift < a.shape[1]:  # the decays' products are needed only by a next step
            a = a * _shift(a, shift)
        shift *= 2
    return b


def _chunked_scan(log_a, b, chunk):
    # Inside a chunk the recurrence has a closed form: with A_t = a_1 ... a_t = exp(cumsum(log a)),
    #     h_t = A_t * sum_{s <= t} b_s / A_s
    # two prefix sums instead of a loop. 1 / A_s must stay finite, so log a is clamped at
    # -60 / chunk: a state that shrinks 1800-fold per token is forgotten either way. A
    # Hillis-Steele scan over the chunks' last states, which has no such limit, then carries
    # each chunk's state into the next.
    B, N, D = b.shape
    n_chunks = -(-N // chunk)
    if n_chunks * chunk > N:  # pad after the last token: a = 1, b = 0
        log_a, b = F.pad(log_a, (0, 0, 0, n_chunks * chunk - N)), F.pad(b, (0, 0, 0, n_chunks * chunk - N))
    # M @ x is the inclusive cumsum of x over its second-to-last dim: a matmul, which every
    # runtime runs fast (ExecuTorch has no fast cumsum); built where it is used, on b's device
    prefix_sum = torch.ones(chunk, chunk, device=b.device, dtype=b.dtype).tril()
    with full_precision(b):  # autocast would run these matmuls in bf16 / fp16
        decay = torch.matmul(prefix_sum, log_a.clamp_min(-60 / chunk).reshape(B, n_chunks, chunk, D)).exp()
        h = decay * torch.matmul(prefix_sum, b.reshape(B, n_chunks, chunk, D) / decay)
    if n_chunks > 1:
        chunk_state = _hillis_steele(decay[:, :, -1], h[:, :, -1])  # the true state at each chunk's last token
        h = h + decay * _shift(chunk_state, 1)[:, :, None]  # plus the state entering each chunk
    return h.view(B, n_chunks * chunk, D)[:, :N]


class _LinearScan(torch.autograd.Function):
    """The backward pass of a linear recurrence is the same recurrence run the other way:
    with g_t = dL/dh_t + a_{t+1} g_{t+1} (a backward scan: the forward one on flipped tokens),
    dL/db_t = g_t and dL/dlog_a_t = g_t a_t h_{t-1} = g_t (h_t - b_t). One more scan instead
    of autograd through every step."""

    @staticmethod
    def forward(ctx, log_a, b, chunk):
        h = _chunked_scan(log_a, b, chunk)
        ctx.save_for_backward(log_a, b, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, grad_h):
        log_a, b, h = ctx.saved_tensors
        # flipped, log a_{t+1} is the flipped log a one token later, 0 before the first
        g = _chunked_scan(_shift(log_a.flip(1), 1), grad_h.flip(1), ctx.chunk).flip(1)
        return g * (h - b), g, None


def linear_scan(log_a, b, chunk=CHUNK):
    """h_t = a_t * h_{t-1} + b_t over dim 1 of (B, N, D) with a_t = exp(log_a_t) <= 1 and
    h_{-1} = 0, without a loop over tokens."""
    if torch.is_grad_enabled() and (log_a.requires_grad or b.requires_grad):
        return _LinearScan.apply(log_a, b, chunk)
    return _chunked_scan(log_a, b, chunk)  # plain tensor ops: what torch.export traces


# ---------------------------------------------------------------------------------------
# Sizes (seed figures: Tiny ~19M, Small ~47M, Base ~135M generator parameters)


def iris_tiny(**overrides):
    return Iris(IrisConfig(**{**dict(dim=384, heads=6, core_layers=3), **overrides}))


def iris_small(**overrides):
    return Iris(IrisConfig(**{**dict(dim=576, heads=9, core_layers=4), **overrides}))


def iris_base(**overrides):
    return Iris(IrisConfig(**{**dict(dim=896, heads=14, core_layers=5), **overrides}))


SIZES = {"tiny": iris_tiny, "small": iris_small, "base": iris_base}


def build_generator(settings, text_dim, **overrides):
    """The generator train_flow.py trains for its settings (a dict of them): model_size's, with
    dim, heads and core_layers overriding it where non-zero. bench.py and check_gpu.py build a
    config's generator with it too; overrides: more IrisConfig fields (fft_impl="dft")."""
    sizes = {k: settings[k] for k in ("dim", "heads", "core_layers") if settings[k]}
    return SIZES[settings["model_size"]](**sizes, text_dim=text_dim, **{k: settings[k] for k in (
        "patch_size", "mixer", "text_encoder", "backprop_iters", "iteration_embedding", "state_init",
        "text_layers")}, **overrides)
