"""Random-weight initialisation shared by the coverage zoos (build_zoo_hf.py,
build_zoo_torchvision.py): the files test graph patterns, not accuracy, but activations must
not vanish."""

from __future__ import annotations

from collections.abc import Callable

import torch

BATCHES = 4


def calibrate_batchnorm(model: torch.nn.Module, run_batch: Callable[[int], object]) -> None:
    """Random BN scales and shifts, running statistics measured on random inputs
    (`run_batch(seed)` runs the model on one); with the default init (weight 1, bias 0, mean 0,
    var 1) deep conv nets' activations vanish. The rest of the model stays in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
        torch.nn.init.normal_(norm.bias, 0.0, 0.2)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    with torch.no_grad():
        for seed in range(BATCHES):
            run_batch(seed)
    model.eval()
