"""Mixed precision: the dtype a network's forward pass runs in, shared by the detector and the autoencoder.

bfloat16 keeps float32's exponent range, so neither stage needs loss scaling; weights, optimiser state and
losses stay float32. Only convolutions and matrix products run in bfloat16 (torch.autocast's own list).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Optional, Union

import torch

from .config import PRECISIONS
from .errors import UserError

Device = Union[str, torch.device]


def autocast_dtype(precision: str, device: Device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device``, or None for float32 throughout.

    "auto" takes bfloat16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA
    device that supports it) and float32 elsewhere, where bfloat16 would be emulated and slower.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        # Private probes of torch's own CPU dispatch; a torch without them is treated as lacking bfloat16.
        native = device.type == "cpu" and any(
            getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return torch.bfloat16 if native else None


def autocast(device: Device, dtype: Optional[torch.dtype]) -> AbstractContextManager:
    """``torch.autocast`` in ``dtype`` on ``device``'s type; a no-op when ``dtype`` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def name(dtype: Optional[torch.dtype]) -> str:
    """How manifests record a resolved precision."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"
