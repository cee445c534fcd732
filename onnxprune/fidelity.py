"""One number for how far a pruned model's outputs are from the original's, used to compare
candidate plans: the KL divergence of the class distributions for logits and (log-)probabilities
(what a classifier or a language model decides with), the relative squared L2 error for every
other output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import make_session
from .data import CalibrationData
from .graph import fixed_batch_size, whole_batches
from .verify import PROBABILITIES, argmax_outputs, drop_units, logit_outputs

LOGIT_ELEMENTS = 1 << 21  # logits turned into float64 log-probabilities per step (16 MB per temporary)


TINY = 1e-30  # a probability that underflowed to 0 (the log of a Softmax output)


def _log_softmax(z: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """Log-probabilities of logits (or of probabilities, whose log is renormalised)."""
    z = np.log(np.maximum(z.astype(np.float64), TINY)) if probabilities else z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _row_chunks(rows: int, classes: int) -> list[slice]:
    """Slices of a few rows each, so float64 log-probabilities over a large vocabulary stay
    LOGIT_ELEMENTS per temporary (a 49k vocabulary: 42 rows, not 1024: 2 GB of temporaries)."""
    step = max(1, LOGIT_ELEMENTS // classes)
    return [slice(start, start + step) for start in range(0, rows, step)]


TOP_CLASSES = 1024  # a reference row over more than 4x this many classes keeps only its most likely ones


@dataclass
class TopClasses:
    """A reference's class scores over a large vocabulary, kept as the log-probabilities of each
    row's TOP_CLASSES most likely classes and the log of the rest's mass: 8 kB per row instead of
    a 49k-vocabulary's 196 kB, so candidates are scored on every held-out window. The KL is then
    that of the distributions with the rest merged into one class, a lower bound of the full KL
    (on SmolLM2 the top 1024 tokens hold 98% of the mass on average)."""

    index: np.ndarray  # [rows, k] int32
    logp: np.ndarray  # [rows, k] float32
    log_rest: np.ndarray  # [rows] float64

    @classmethod
    def of(cls, scores: np.ndarray, probabilities: bool) -> TopClasses:
        rows = scores.reshape(-1, scores.shape[-1])
        parts = []
        for chunk in _row_chunks(*rows.shape):
            lp = _log_softmax(rows[chunk], probabilities)
            index = np.argpartition(lp, -TOP_CLASSES, axis=-1)[:, -TOP_CLASSES:]
            top = np.take_along_axis(lp, index, -1)
            parts.append((index.astype(np.int32), top.astype(np.float32), _log_rest(top)))
        return cls(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    @property
    def size(self) -> int:
        return self.index.size + self.logp.size + self.log_rest.size

    def kl_sum(self, scores: np.ndarray, probabilities: bool) -> float:
        """Sum over the rows of KL(reference || scores) with the rest as one class."""
        rows, total = scores.reshape(-1, scores.shape[-1]), 0.0
        for chunk in _row_chunks(*rows.shape):
            lq = np.take_along_axis(_log_softmax(rows[chunk], probabilities), self.index[chunk], -1)
            lp, lp_rest = self.logp[chunk].astype(np.float64), self.log_rest[chunk]
            total += float(np.sum(np.exp(lp) * (lp - lq)) + np.sum(np.exp(lp_rest) * (lp_rest - _log_rest(lq))))
        return total


def _log_rest(top: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(top))) per row: the log-probability of every class not in `top`."""
    return np.log(np.maximum(-np.expm1(np.logaddexp.reduce(top.astype(np.float64), axis=-1)), TINY))


def compressible(scores: np.ndarray, kind: str | None) -> bool:
    """Whether a reference output is class scores over a vocabulary large enough to keep as TopClasses."""
    return kind is not None and scores.ndim >= 1 and scores.shape[-1] > 4 * TOP_CLASSES


class OutputError:
    """Running sums over batches: per output, KL(original || pruned) per row for class scores
    (`logits`: name -> kind, as `verify.logit_outputs`), else ||got - ref||^2 / ||ref||^2;
    `value()` is their mean over the outputs."""

    def __init__(self, names: list[str], logits: dict[str, str], axes: dict[str, int] | None = None):
        self.logits = {name: logits[name] for name in names if name in logits}
        self.axes = axes or {}  # class axes other than the last (the scores an ArgMax reads)
        self.sums = dict.fromkeys(names, 0.0)
        self.norms = dict.fromkeys(names, 0.0)

    def add(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        for name in self.sums:
            ref, out = reference[name], got[name]
            if isinstance(ref, TopClasses):
                self.sums[name] += ref.kl_sum(out, self.logits[name] == PROBABILITIES)
                self.norms[name] += len(ref.log_rest)
                continue
            if name in self.axes:
                ref, out = np.moveaxis(ref, self.axes[name], -1), np.moveaxis(out, self.axes[name], -1)
            if name in self.logits and ref.ndim >= 1 and ref.shape[-1] > 1:
                ref_rows, out_rows = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, ref.shape[-1])
                probabilities = self.logits[name] == PROBABILITIES
                for chunk in _row_chunks(*ref_rows.shape):  # float64 copies of a few rows at a time
                    lp = _log_softmax(ref_rows[chunk], probabilities)
                    lq = _log_softmax(out_rows[chunk], probabilities)
                    self.sums[name] += float(np.sum(np.exp(lp) * (lp - lq)))
                self.norms[name] += len(ref_rows)
            else:
                self.sums[name] += float(np.sum((out.astype(np.float64) - ref) ** 2))
                self.norms[name] += float(np.sum(ref.astype(np.float64) ** 2))

    def value(self) -> float:
        errors = [self.sums[n] / self.norms[n] if self.norms[n] > 0 else self.sums[n] for n in self.sums]
        return float(np.mean(errors)) if errors else 0.0


ELEMENTS_MAX = 1 << 26  # original outputs kept to compare candidates with (256 MB of float32)
CLASS_ROWS_MAX = 1 << 13  # rows of compressed class scores scored per candidate (16 windows of 512 tokens)


class ReferenceOutputs:
    """The original's outputs on the first samples of `data` (as many as ELEMENTS_MAX allows), to
    score candidate models by `OutputError`. An output that is an ArgMax's indices is scored by
    the class scores it reads (`verify.argmax_outputs`), fetched from both models. Class scores
    over a large vocabulary are kept as `TopClasses`; the first batch's outputs are also kept
    whole (`first_outputs`, for verification's optimisation check)."""

    def __init__(self, original: onnx.ModelProto, data: CalibrationData, batch_size: int, samples: int):
        argmax = argmax_outputs(original)
        self.names = list(dict.fromkeys(argmax[o.name][0] if o.name in argmax else o.name for o in original.graph.output))
        self.logits = {**logit_outputs(original), **{scores: kind for scores, _, kind in argmax.values()}}
        self.axes = {scores: axis for scores, axis, _ in argmax.values() if axis != -1}
        self.outputs_of = {o.name: o.name for o in original.graph.output}  # fetched tensor -> the graph output it answers for
        for output, (scores, _, _) in argmax.items():
            self.outputs_of.setdefault(scores, output)
        session = _session_with_outputs(original, self.names)
        step = fixed_batch_size(original) or 1  # a fixed batch runs whole batches only
        first = dict(zip(self.names, session.run(self.names, next(iter(data.batches(step)))), strict=True))
        self.compressed = {name for name, value in first.items() if name not in self.axes and compressible(value, self.logits.get(name))}
        kept = {name: self._kept(name, value) for name, value in first.items()}
        per_sample = sum(value.size for value in kept.values()) / step
        wanted = max(1, min(samples, data.n_samples, int(ELEMENTS_MAX // max(per_sample, 1))))
        if self.compressed:  # a compressed row costs little memory but a candidate's run: bound the time
            rows = max(len(kept[name].log_rest) for name in self.compressed) / step
            wanted = max(1, min(wanted, int(CLASS_ROWS_MAX // max(rows, 1))))
        self.samples = whole_batches(wanted, step)
        # one sample per run where the outputs are compressed: the whole first batch stays as it is
        size = step if step > 1 or self.compressed else batch_size
        self.batches = list(data.take(0, self.samples).batches(size))
        self.outputs, self.first_outputs = [], {}
        for i, batch in enumerate(self.batches):
            again = i == 0 and size == step  # the run that sized the reference was this batch
            outputs = first if again else dict(zip(self.names, session.run(self.names, batch), strict=True))
            if i == 0:
                self.first_outputs = outputs
            self.outputs.append(kept if again else {name: self._kept(name, value) for name, value in outputs.items()})

    def _kept(self, name: str, value: np.ndarray) -> np.ndarray | TopClasses:
        return TopClasses.of(value, self.logits[name] == PROBABILITIES) if name in self.compressed else value

    def error(self, model: onnx.ModelProto, changes: dict[str, tuple[int, np.ndarray]]) -> float:
        """The candidate's OutputError; inputs whose units shrank are fed their kept units, outputs
        that shrank (a KV cache) are not the model's answer and are left out."""
        compared = [name for name in self.names if self.outputs_of[name] not in changes]
        session = _session_with_outputs(model, compared, rewritten=True)
        model = None  # onnxruntime has its own copy: a caller that passed a temporary frees it now
        error = OutputError(compared, self.logits, self.axes)
        for batch, expected in zip(self.batches, self.outputs, strict=True):
            got = session.run(compared, {k: drop_units(v, changes.get(k)) for k, v in batch.items()})
            error.add(expected, dict(zip(compared, got, strict=True)))
        return error.value()


def _session_with_outputs(model: onnx.ModelProto, names: list[str], rewritten: bool = False):
    """A session that can fetch `names`: inner tensors among them become graph outputs for the
    session's copy only (the model is left as it was)."""
    outputs = {o.name for o in model.graph.output}
    extra = [name for name in names if name not in outputs]
    for name in extra:
        model.graph.output.add().name = name  # untyped: onnxruntime infers it
    try:
        return make_session(model, spinning=False, rewritten=rewritten)
    finally:
        for _ in extra:
            model.graph.output.pop()
