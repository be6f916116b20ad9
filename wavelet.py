"""
Orthonormal Haar wavelet transform, the lossless first stage of the IRIS latent space.

    x: (B, 3, H, W)  --dwt-->  (B, 12, H/2, W/2)  --idwt-->  x  (exactly, up to float rounding)

Channels are ordered [LL, LH, HL, HH] x RGB: the first letter is the filter along rows (y),
the second along columns (x). LL is a half-size copy of the image (scaled by 2) and carries
the structure; LH, HL, HH carry vertical edges, horizontal edges and diagonals.

levels > 1 applies the same transform again to every subband (a Haar wavelet packet), so
the result stays one tensor, (B, 3 * 4**levels, H / 2**levels, W / 2**levels), and stays
orthonormal: the inverse is exact at any depth.
"""
import torch
import torch.nn.functional as F

# Rows: LL, LH, HL, HH. Columns: the 2x2 block's pixels (y, x) = (0,0), (0,1), (1,0), (1,1),
# the order F.pixel_unshuffle lays them out in. The matrix is symmetric and orthonormal,
# so it is its own inverse.
HAAR = 0.5 * torch.tensor([[1.0, 1.0, 1.0, 1.0],
                           [1.0, -1.0, 1.0, -1.0],
                           [1.0, 1.0, -1.0, -1.0],
                           [1.0, -1.0, -1.0, 1.0]])


def dwt(x, levels=1):
    """(B, C, H, W) -> (B, 4**levels * C, H / 2**levels, W / 2**levels), subband-major channels."""
    for _ in range(levels):
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"Haar DWT needs even height and width, got {H}x{W}: "
                             f"resize or crop the image to a multiple of {2 ** levels}")
        pixels = F.pixel_unshuffle(x, 2).view(B, C, 4, H // 2, W // 2)  # 2x2 block of each channel
        bands = torch.einsum('kj,bcjhw->bkchw', HAAR.to(x), pixels)       # k: subband, c: colour
        x = bands.reshape(B, 4 * C, H // 2, W // 2)
    return x


def idwt(y, levels=1):
    """Exact inverse of dwt: (B, 4**levels * C, h, w) -> (B, C, h * 2**levels, w * 2**levels)."""
    for _ in range(levels):
        B, C4, h, w = y.shape
        if C4 % 4:
            raise ValueError(f"inverse Haar DWT needs a multiple of 4 channels, got {C4}")
        bands = y.view(B, 4, C4 // 4, h, w)
        pixels = torch.einsum('kj,bkchw->bcjhw', HAAR.to(y), bands)
        y = F.pixel_shuffle(pixels.reshape(B, C4, h, w), 2)
    return y


def impose_lowpass(x, small, rounds=50):
    """The image nearest x (B, C, 2h, 2w) whose Haar LL subband is 2 * small (B, C, h, w),
    i.e. whose 2x2 block means are `small`, and whose values stay in [-1, 1]. Replacing the
    LL subband is the exact projection onto the first set, clamping onto the second; both
    are convex and meet (small's nearest-neighbour upsample lies in each), so alternating
    the two converges to a point of both (POCS). The last step is the LL projection."""
    for i in range(rounds):
        x = x.clamp(-1, 1) if i else x
        bands = dwt(x)
        bands[:, :small.shape[1]] = 2 * small  # the orthonormal LL of a 2x2 block is twice its mean
        x = idwt(bands)
    return x
