"""Op rules of the analysis, one module per op family, registered by op type (registry.py).

Importing this package registers every rule; `CARRY`, `CONSUME` and `PRODUCE` map op types to
them. Adding an op is one function with `@carries("Op")` in the module of its family.
"""

from . import conv_pool, elementwise, flatten, matmul, norms, pixel_shuffle, recurrent, shape_targets, shapes, slicing  # noqa: F401 - registers the rules
from .registry import CARRY, CONSUME, PRODUCE, Carry, Coarsen, Effect, Flattened, Lock, Pin, Produced, SizeFollows, SizeRead, Through

__all__ = ["CARRY", "CONSUME", "PRODUCE", "Carry", "Coarsen", "Effect", "Flattened", "Lock", "Pin", "Produced", "SizeFollows", "SizeRead", "Through"]
