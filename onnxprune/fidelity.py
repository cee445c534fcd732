"""One number for how far a pruned model's outputs are from the original's, used to compare
candidate plans: the KL divergence of the class distributions for logits and (log-)probabilities
(what a classifier or a language model decides with), the relative squared L2 error for every
other output."""

from __future__ import annotations

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
            if name in self.axes:
                ref, out = np.moveaxis(ref, self.axes[name], -1), np.moveaxis(out, self.axes[name], -1)
            if name in self.logits and ref.ndim >= 1 and ref.shape[-1] > 1:
                ref_rows, out_rows = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, ref.shape[-1])
                rows = max(1, LOGIT_ELEMENTS // ref.shape[-1])  # a 49k vocabulary: 42 rows, not 1024 (2 GB of temporaries)
                probabilities = self.logits[name] == PROBABILITIES
                for start in range(0, len(ref_rows), rows):  # float64 copies of a few rows at a time
                    lp = _log_softmax(ref_rows[start:start + rows], probabilities)
                    lq = _log_softmax(out_rows[start:start + rows], probabilities)
                    self.sums[name] += float(np.sum(np.exp(lp) * (lp - lq)))
                self.norms[name] += len(ref_rows)
            else:
                self.sums[name] += float(np.sum((out.astype(np.float64) - ref) ** 2))
                self.norms[name] += float(np.sum(ref.astype(np.float64) ** 2))

    def value(self) -> float:
        errors = [self.sums[n] / self.norms[n] if self.norms[n] > 0 else self.sums[n] for n in self.sums]
        return float(np.mean(errors)) if errors else 0.0


ELEMENTS_MAX = 1 << 26  # original outputs kept to compare candidates with (256 MB of float32)


class ReferenceOutputs:
    """The original's outputs on the first samples of `data` (as many as ELEMENTS_MAX allows), to
    score candidate models by `OutputError`. An output that is an ArgMax's indices is scored by
    the class scores it reads (`verify.argmax_outputs`), fetched from both models."""

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
        per_sample = sum(int(np.prod(v.shape)) for v in session.run(self.names, next(iter(data.batches(step))))) / step
        wanted = max(1, min(samples, data.n_samples, int(ELEMENTS_MAX // max(per_sample, 1))))
        self.samples = whole_batches(wanted, step)
        self.batches = list(data.take(0, self.samples).batches(step if step > 1 else batch_size))
        self.outputs = [dict(zip(self.names, session.run(self.names, batch), strict=True)) for batch in self.batches]

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
