"""One number for how far a pruned model's outputs are from the original's, used to compare
candidate plans: the KL divergence of the softmax for logits (what a classifier or a language
model decides with), the relative squared L2 error for every other output."""

from __future__ import annotations

import numpy as np
import onnx

from .calibrate import make_session
from .data import CalibrationData
from .graph import fixed_batch_size, whole_batches
from .verify import drop_units, logit_outputs

LOGIT_ELEMENTS = 1 << 21  # logits turned into float64 log-probabilities per step (16 MB per temporary)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class OutputError:
    """Running sums over batches: per output, KL(original || pruned) per row for logits, else
    ||got - ref||^2 / ||ref||^2; `value()` is their mean over the outputs."""

    def __init__(self, names: list[str], logits: set[str]):
        self.logits = {name for name in names if name in logits}
        self.sums = dict.fromkeys(names, 0.0)
        self.norms = dict.fromkeys(names, 0.0)

    def add(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        for name in self.sums:
            ref, out = reference[name], got[name]
            if name in self.logits and ref.ndim >= 1 and ref.shape[-1] > 1:
                ref_rows, out_rows = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, ref.shape[-1])
                rows = max(1, LOGIT_ELEMENTS // ref.shape[-1])  # a 49k vocabulary: 42 rows, not 1024 (2 GB of temporaries)
                for start in range(0, len(ref_rows), rows):  # float64 copies of a few rows at a time
                    lp, lq = _log_softmax(ref_rows[start:start + rows]), _log_softmax(out_rows[start:start + rows])
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
    score candidate models by `OutputError`."""

    def __init__(self, original: onnx.ModelProto, data: CalibrationData, batch_size: int, samples: int):
        session = make_session(original, spinning=False)
        self.names = [o.name for o in session.get_outputs()]
        step = fixed_batch_size(original) or 1  # a fixed batch runs whole batches only
        per_sample = sum(int(np.prod(v.shape)) for v in session.run(self.names, next(iter(data.batches(step))))) / step
        wanted = max(1, min(samples, data.n_samples, int(ELEMENTS_MAX // max(per_sample, 1))))
        self.samples = whole_batches(wanted, step)
        self.batches = list(data.take(0, self.samples).batches(step if step > 1 else batch_size))
        self.outputs = [dict(zip(self.names, session.run(self.names, batch), strict=True)) for batch in self.batches]
        self.logits = logit_outputs(original)

    def error(self, model: onnx.ModelProto, changes: dict[str, tuple[int, np.ndarray]]) -> float:
        """The candidate's OutputError; inputs whose units shrank are fed their kept units, outputs
        that shrank (a KV cache) are not the model's answer and are left out."""
        session = make_session(model, spinning=False, rewritten=True)
        model = None  # onnxruntime has its own copy: a caller that passed a temporary frees it now
        compared = [name for name in self.names if name not in changes]
        error = OutputError(compared, self.logits)
        for batch, expected in zip(self.batches, self.outputs, strict=True):
            got = session.run(compared, {k: drop_units(v, changes.get(k)) for k, v in batch.items()})
            error.add(expected, dict(zip(compared, got, strict=True)))
        return error.value()
