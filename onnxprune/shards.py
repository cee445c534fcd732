"""Calibration statistics are additive (DESIGN §4): compute them per shard of the data, save
them as .npz, merge them exactly, and run shards in local processes or on a Dask cluster."""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import CalibrationError
from .graph import copy_fields
from .preparation import calibration_statistics, prepare
from .stats import SiteStats
from .tensors import in_memory


def model_digest(model: onnx.ModelProto) -> str:
    """Fingerprint of the graph and weights: statistics only merge or apply to the same model."""
    digest = hashlib.sha256()
    graph = onnx.GraphProto()  # the graph without its initializers, built without copying the weights
    copy_fields(model.graph, graph, skip=("initializer",))
    digest.update(graph.SerializeToString(deterministic=True))
    for tensor in model.graph.initializer:  # the same digest for weights in memory and on disk
        tensor = in_memory(tensor)
        digest.update(tensor.name.encode())
        digest.update(tensor.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


@dataclass
class Statistics:
    """Per-site [1 X]^T [1 X] statistics of one model over some calibration samples."""

    digest: str
    sites: dict[str, SiteStats]
    strides: dict[str, int] = field(default_factory=dict)  # sites whose feature maps were subsampled

    def merge(self, other: Statistics) -> Statistics:
        """Exact merge of two shards' statistics (counts, sums and Grams add up)."""
        if other.digest != self.digest:
            raise CalibrationError(f"statistics of different models cannot be merged ({self.digest} vs {other.digest})")
        if set(other.sites) != set(self.sites):
            raise CalibrationError("statistics cover different activation sites (different --exclude?)")
        if other.strides != self.strides:
            raise CalibrationError("statistics were sampled with different spatial strides (different --spatial-stride?)")
        merged = {}
        for name, stats in self.sites.items():
            total = SiteStats(stats.count, stats.total.copy(), stats.gram.copy())
            total.add(other.sites[name])
            merged[name] = total
        return Statistics(self.digest, merged, dict(self.strides))

    def for_model(self, prepared) -> dict[str, SiteStats]:
        """The per-site statistics (a new dict: a sequential pass replaces its entries), after
        checking that they belong to this model and analysis."""
        if self.digest != model_digest(prepared.original):
            raise CalibrationError(f"these statistics were computed for another model (digest {self.digest})")
        missing = [s.tensor for s in prepared.analysis.sites() if s.tensor not in self.sites]
        if missing:
            raise CalibrationError(f"the statistics have no entry for activation site '{missing[0]}'")
        return dict(self.sites)

    def save(self, path: str | Path) -> None:
        """An .npz of plain arrays (no pickle): names, counts, sums and Grams per site."""
        names = sorted(self.sites)
        arrays = {"digest": np.array(self.digest), "sites": np.array(names, dtype=str)}
        for i, name in enumerate(names):
            stats = self.sites[name]
            arrays[f"count_{i}"] = np.array(stats.count, dtype=np.int64)
            arrays[f"total_{i}"] = stats.total
            arrays[f"gram_{i}"] = stats.gram
            arrays[f"stride_{i}"] = np.array(self.strides.get(name, 1), dtype=np.int64)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["sites"]]
                sites = {n: SiteStats(int(data[f"count_{i}"]), data[f"total_{i}"], data[f"gram_{i}"]) for i, n in enumerate(names)}
                strides = {n: int(data[f"stride_{i}"]) for i, n in enumerate(names) if f"stride_{i}" in data and int(data[f"stride_{i}"]) > 1}
                return cls(str(data["digest"]), sites, strides)
        except (OSError, KeyError, ValueError) as exc:
            raise CalibrationError(f"'{path}' is not an onnxprune statistics file ({exc})") from None

    @classmethod
    def merge_all(cls, parts: list[Statistics]) -> Statistics:
        if not parts:
            raise CalibrationError("no statistics to merge")
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part)
        return merged


def partial_statistics(model, calib, shard: tuple[int, int] = (0, 1), options: dict | None = None) -> Statistics:
    """Statistics of one contiguous shard (index, count) of the calibration samples."""
    prepared = prepare(model, calib, **(options or {}))
    return Statistics(model_digest(prepared.original), calibration_statistics(prepared, shard), prepared.subsampled)


def collect_sharded(model, calib, shards: int, scheduler: str | None = None, options: dict | None = None) -> Statistics:
    """Compute `shards` partial statistics in parallel and merge them.

    Local processes by default; `scheduler="local"` starts a Dask LocalCluster, any other
    value is the address of a Dask scheduler (needs `pip install onnxprune[distributed]`)."""
    jobs = [(model, calib, (i, shards), options) for i in range(shards)]
    if scheduler is None:
        with ProcessPoolExecutor(max_workers=shards, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_run_shard, jobs))
        return Statistics.merge_all(parts)
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise CalibrationError("a Dask scheduler needs the distributed extra: pip install 'onnxprune[distributed]'") from None
    if scheduler == "local":
        with LocalCluster(n_workers=shards, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
            return Statistics.merge_all(client.gather(client.map(_run_shard, jobs)))
    with Client(scheduler) as client:
        return Statistics.merge_all(client.gather(client.map(_run_shard, jobs)))


def _run_shard(job) -> Statistics:
    model, calib, shard, options = job
    return partial_statistics(model, calib, shard, options)
