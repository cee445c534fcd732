"""Operator tables: how each ONNX op treats a unit (channel / feature) axis."""

import onnx

# Ops of other domains are never taken for the standard op of the same name: onnxruntime's
# com.microsoft.nchwc Conv reads blocked weights and channel counts, for instance.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def op_key(node: onnx.NodeProto) -> str:
    """The name the op tables and rule registries know `node` by: its op type for a standard
    ONNX op, qualified by its domain otherwise (so that no rule matches it)."""
    return node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}.{node.op_type}"


# Element-wise ops with one data input: unit i of the output depends only on unit i of the input.
UNARY_PASS_THROUGH = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf",
    "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Abs", "Neg",
    "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Cast", "Identity",
    "Dropout", "PRelu",
})

# Ops that act on each channel of an NCHW tensor separately (the unit axis must be axis 1).
CHANNEL_WISE = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
})

# Per-channel normalisations whose parameters (inputs 1..) are indexed by channel (axis 1).
CHANNEL_PARAM_OPS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}

# Element-wise ops with broadcasting over several inputs.
BROADCAST_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where"})

REDUCE_OPS = frozenset({
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp",
})

# Ops whose MACs onnxprune counts (the rest are cheap next to them).
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

# Recurrent ops: gates per hidden unit in W [directions, gates * hidden, input] (and in R).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
