"""What the coverage zoos (build_zoo_hf.py, build_zoo_torchvision.py) share: the random-weight
BatchNorm initialisation (the files test graph patterns, not accuracy, but activations must not
vanish) and the build loop that skips a failing architecture and goes on."""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from pathlib import Path

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


def short(error: Exception) -> str:
    """The error's first line and the last lines of its traceback."""
    last = traceback.format_exception(error)[-3:]
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n  {''.join(last).strip()}"


def build_each(names: list[str], build: Callable[[str], tuple[str, list[str]]]) -> int:
    """Build every name (`build` returns a summary line and the files it skipped); one that fails
    is reported and skipped. Exit status 1 if anything was skipped."""
    failed: list[str] = []
    for name in names:
        try:
            summary, skipped = build(name)
            failed += skipped
            print(summary, flush=True)
        except Exception as error:  # one architecture failing must not stop the others
            failed.append(name)
            print(f"{name}: SKIPPED: {short(error)}", flush=True)
    if failed:
        print(f"skipped: {', '.join(failed)}")
    return 1 if failed else 0


def zoo_arguments(doc: str, names: list[str], default_out: str, argv: list[str] | None) -> argparse.Namespace:
    """--out (created) and --only NAME... of a coverage zoo script."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"output folder (default {default_out})")
    parser.add_argument("--only", nargs="+", choices=sorted(names), metavar="NAME", help=f"build only these: {', '.join(names)}")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args
