"""The one device selector for training, evaluation and the command-line tools."""
from __future__ import annotations

import torch


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` = cuda, else mps, else cpu. Asking for an absent device is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device=mps but MPS is not available")
    if name not in ("cpu", "mps"):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, mps")
    return torch.device(name)
