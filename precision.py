"""
The dtype a script computes in (its `dtype` setting): one autocast and one GradScaler, the
same on a GPU and a CPU, so the CPU runs every line a GPU will.
"""
import torch

from configurator import UsageError

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def native_bf16_cpu():
    """True where the CPU computes in bf16 natively (AMX tiles or AVX512-BF16: Sapphire Rapids,
    Zen 4). Elsewhere autocast emulates bf16, many times slower than fp32 (docs/results.md)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_dtype(dtype, device):
    """'auto' -> 'bfloat16' on GPUs with native bf16 (compute capability 8.0+: A100, L4, H100),
    'float16' on older ones (T4, V100: is_bf16_supported() says True there, but through
    emulation at fp32 speed or slower); on a CPU 'bfloat16' where it is native, else 'float32'."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if dtype != 'auto':
        return dtype
    if not device.startswith('cuda'):
        return 'bfloat16' if native_bf16_cpu() else 'float32'
    return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'


def mixed_precision(dtype, device):
    """-> (autocast context, GradScaler) for a resolved dtype, on a GPU or a CPU alike, so the
    CPU runs every line a GPU will. The scaler is on for fp16 only, whose 5-bit exponent
    flushes small gradients to zero; bf16 has fp32's range and needs none."""
    device_type = torch.device(device).type
    autocast = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != 'float32')
    return autocast, torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
