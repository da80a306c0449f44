"""Embed a dataset with a PyTorch embedding network, batch by batch, into a float32 array."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from ctxsim.data.datasets import ImageDataset

__all__ = ["embed_dataset"]


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: ImageDataset, batch_size: int = 256,
                  device: str | torch.device = "cpu", num_workers: int = 0, amp_dtype: torch.dtype | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (embeddings [N, D] float32, labels [N] int64) in dataset order; the model is put in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    out, labels, done = [], [], 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            e = model(x)
        out.append(e.float().cpu())
        labels.append(torch.as_tensor(y))
        done += len(x)
        if progress:
            progress(done, len(dataset))
    model.train(was_training)
    return torch.cat(out).numpy(), torch.cat(labels).numpy().astype(np.int64)
