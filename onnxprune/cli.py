"""Command line: `onnxprune MODEL --calib FILE [-o OUT] [target] [options]`."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, tempfiles
from .allocate import DEFAULT_HEAD_GAIN, SEARCHED_HEAD_GAINS
from .api import DEFAULT_TOLERANCE, JUDGES, prune
from .calibrate import ROWS_PER_UNIT
from .errors import OnnxPruneError
from .inspect import inspect_model
from .interrupts import interrupted_signal, signals_raise
from .load import default_output_path, removed_on_failure, save_model_atomic
from .plan import ALLOCATIONS, DEFAULT_ALLOCATION
from .score import DEFAULT_ORDER, METHODS, ORDERS
from .sequential import SEQUENTIAL_SAMPLES
from .shards import Statistics, partial_statistics
from .sources import ImageOptions

SEQUENTIAL_DEFAULT = "auto"  # sequential for models without attention (api.resolve_fit)
EXIT_USAGE = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"onnxprune: error: {message} (see onnxprune --help)\n")
        sys.exit(EXIT_USAGE)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _auto_or(kind: type, lowest: float, what: str) -> Callable[[str], int | float | str]:
    """An argparse type: 'auto', or a number of `kind` >= `lowest`."""

    def parse(text: str) -> int | float | str:
        if text == "auto":
            return text
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= lowest:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {what}, got '{text}'")
        return value

    return parse


_stride = _auto_or(int, 1, "a positive integer")
_shrinkage = _auto_or(float, 0.0, "a number >= 0")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W integers, got '{text}'") from None
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W positive integers, got '{text}'")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxprune",
        description="Remove whole units (conv filters, neurons) from an ONNX model with Subspace Node Pruning. "
        "`onnxprune inspect MODEL` shows what can be pruned without calibrating; "
        "`onnxprune stats MODEL --calib F --shard I/K -o part.npz` computes a shard of the statistics.",
    )
    parser.add_argument("model", help="input .onnx model (never modified)")
    parser.add_argument("--calib", help=".npz with one array per graph input (samples on axis 0), a .npy for a single-input model, or a folder of images")
    parser.add_argument("--data-loader-script", metavar="FILE.py:FUNC", help="calibrate with FUNC() from FILE.py, a generator of {input name: array} batches (instead of --calib)")
    parser.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    images = parser.add_argument_group("image-folder calibration")
    images.add_argument("--input-size", type=_ints, metavar="H,W", help="resize images to H x W (default: the model's input size)")
    images.add_argument("--mean", type=_floats, default=(0.0,), metavar="M[,M,M]", help="per-channel mean subtracted after --scale (default 0)")
    images.add_argument("--std", type=_floats, default=(1.0,), metavar="S[,S,S]", help="per-channel std divided after the mean (default 1)")
    images.add_argument("--layout", choices=("NCHW", "NHWC"), help="input layout (default: guessed from the model input)")
    images.add_argument("--scale", type=float, default=1 / 255, help="pixel values are multiplied by this first (default 1/255)")
    parser.add_argument("-o", "--output", help="pruned model path (default: MODEL.pruned.onnx)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=_fraction, help="fraction of prunable units to REMOVE, spread over layers automatically (0..1)")
    target.add_argument("--flops", type=_fraction, help="fraction of the model's MACs to REMOVE (0..1)")
    target.add_argument("--params", type=_fraction, help="fraction of the model's parameters to REMOVE (0..1)")
    target.add_argument("--latency", type=_fraction, help="fraction of the measured onnxruntime CPU latency to REMOVE: the threshold "
                        "is searched by timing the rewritten model on this machine (a few seconds per step; see --latency-batch)")
    target.add_argument("--tolerance", type=_fraction, help=f"remove every unit whose normalised energy loss is <= T under the --allocation rule (default {DEFAULT_TOLERANCE} "
                        "when no target is given); with auto (the default) T sets the size instead: the MACs those units carry "
                        "under the global rule, spread by auto's chosen rule")
    parser.add_argument("--method", choices=METHODS, default="snp", help="pruning criterion: snp (default); lsq = weight-magnitude order + LS recovery; fluct = FLAP (fluctuation x weight norm, mean compensation); wanda = Wanda-sp (|W| x ||X||); l1/l2/variance/random = baselines without recovery")
    parser.add_argument("--order", choices=ORDERS, default=DEFAULT_ORDER,
                        help="SNP unit order: weighted = greedy pivoted Cholesky on the activations scaled by the consumer weights "
                        "(default: best at <= 30%% MACs removed, docs/benchmark.md); pivoted = on the activations alone (better "
                        "when pruning harder); obs = greedy removal by the exact output error of the recovery with the consumers' full "
                        "weights (slow on wide layers, no better on the benchmarks); variance; residual; zca = ranked by the energy each unit keeps after a symmetric (ZCA) "
                        "decorrelation, the seed paper's unnormalised-ZCA order")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=DEFAULT_ALLOCATION,
                        help="how the target is spread over layers: auto (default) = plan it with each of global, stream, "
                        "tempered and uniform, rewrite each, keep the one whose outputs are closest to the original's on the "
                        "held-out samples (no single rule won on every benchmark model; docs/benchmark.md), then try the chosen "
                        "rule with other head gains (--head-gain); with --latency L the candidates are compared at --flops L and the "
                        "latency search times the chosen rule's plans, with --tolerance T at the MACs the global rule removes at T; "
                        "under the sequential fit the uniform plan is refitted too "
                        "and the better refit kept (--judge); global = one "
                        "threshold on every layer's normalised energy loss; stream = the same, with each layer's loss measured "
                        "relative to the residual stream its output joins (best on SmolLM2, MiniLM-like encoders and ResNets; "
                        "the global rule on models without residual adds); uniform = the same fraction of every layer's units; "
                        "tempered = in between; sensitivity = every layer first pruned alone and the model's output error "
                        "measured, which rescales its energies before the one threshold (one extra model run per layer)")
    parser.add_argument("--head-gain", type=float, default=None, metavar="G",
                        help="multiply the attention heads' scores by G before the allocation: G > 1 keeps "
                        "more heads and removes more FFN neurons for the same target, G < 1 the reverse, 1 = heads scored "
                        f"like any unit (default {DEFAULT_HEAD_GAIN:g}, better than 1 under every allocation rule measured on "
                        f"MiniLM and SmolLM2; --allocation auto also tries its chosen rule with G = "
                        f"{' and '.join(f'{g:g}' for g in SEARCHED_HEAD_GAINS)} and keeps the lowest held-out error, as the "
                        "best G moved with the model and target: docs/transformers.md)")
    parser.add_argument("--sensitivity-samples", type=int, default=None, metavar="N",
                        help="calibration samples each sensitivity probe runs (default: about four calibration passes in all)")
    parser.add_argument("--round-to", type=int, default=8, metavar="N",
                        help="keep a multiple of N channels per layer (default 8: GPU engines such as TensorRT and cuDNN pick "
                        "tensor-core GEMM/conv kernels for channel counts that are multiples of 8, and onnxruntime's CPU "
                        "convolutions slow down on odd counts, so other counts can be slower than the original; an attention "
                        "head counts as its d_head channels; layers narrower than N are kept whole; use 1 for exact targets)")
    parser.add_argument("--min-keep", type=float, default=1, metavar="K", help="per-layer floor: K units, or a fraction of the layer's units when K < 1 (default 1)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="never prune the units of producer nodes matching this name pattern (fnmatch; repeatable)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="samples per onnxruntime run (default 32)")
    parser.add_argument("--verify-samples", type=int, metavar="N", help="calibration samples held out to verify the pruned model (default 10%%, at most 256)")
    parser.add_argument("--report-samples", type=int, default=0, metavar="N",
                        help="the last N calibration samples measure the report's fidelity alone (default 0: it is measured on the held-out "
                             "samples, which also choose the allocation and the refit and so read optimistic on new data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--latency-batch", type=int, default=1, metavar="B", help="with --latency: samples per timed run (default 1)")
    parser.add_argument("--latency-threads", type=int, default=0, metavar="T", help="with --latency: onnxruntime threads (default 0: its default)")
    parser.add_argument("--spatial-stride", type=_stride, default="auto", metavar="auto|S",
                        help="sample every S-th row and column of conv feature maps for the statistics (default auto: only "
                        "where their Gram matrices would cost more than a quarter of the model's MACs, and only while at least "
                        f"{ROWS_PER_UNIT} calibration rows per unit remain; 1 = every position)")
    recovery = parser.add_argument_group("recovery fit")
    modes = recovery.add_mutually_exclusive_group()
    modes.add_argument("--sequential", dest="sequential", action="store_const", const=True, default=SEQUENTIAL_DEFAULT,
                       help="refit each layer's least squares on the model as already pruned upstream, against the original "
                       "model's activations, segment by segment: errors of earlier layers are corrected instead of "
                       "compounding with depth. Default for models without attention (conv nets, CRNNs, MLPs), where "
                       "it was measured better with calibration data like the test data (Fashion-MNIST ResNet at 50%% / 70%% "
                       "MACs: 73.8 -> 88.1%% / 34.6 -> 81.4%% top-1; CRNN at 60%%: 52 -> 79%% of lines read; about 1.8x the "
                       "one-shot time). It fits the calibration data closely: with a narrow set (crops of 11 photos for "
                       "MobileNetV2) it generalised worse to other photos (docs/benchmark.md)")
    modes.add_argument("--one-shot", dest="sequential", action="store_const", const=False,
                       help="fit every layer on the unpruned model's activations: one calibration pass, the default for "
                       "transformers (MiniLM, SmolLM2: the sequential refit measured no better at about 3x the time), and "
                       "the safer choice with few or narrow calibration samples")
    recovery.add_argument("--sequential-samples", type=int, default=SEQUENTIAL_SAMPLES, metavar="N",
                          help=f"when the sequential refit runs: calibration samples it runs on, spread over the set (default "
                          f"{SEQUENTIAL_SAMPLES}: the pass's time grows with them; on 2048-image Fashion-MNIST sets, refitting on all 1844 "
                          "took 1.9x the time and gained 4 points of top-1 summed over 12 cells, mostly ShuffleNetV2 at 70%% MACs, "
                          "while VGG lost up to 0.7, docs/benchmark.md; 0 = every calibration sample)")
    recovery.add_argument("--rechoose", action=argparse.BooleanOptionalAction, default=True,
                          help="when the sequential refit runs: choose each layer's kept units again (the same count) on the model as "
                          "already pruned upstream, where its fit's held-out error is lower; the plan ranked them on the unpruned model "
                          "(default on: better or equal in 15 of 16 measured cells of the CNN and OCR benchmarks, EfficientNet-Lite0 at 30%% "
                          "MACs +9 points agreement, docs/benchmark.md; about 1.2x the sequential run's time)")
    recovery.add_argument("--judge", choices=JUDGES, default="refit",
                          help="with --allocation auto and the sequential refit: refit (default) = where auto's one-shot "
                          "choice is not uniform and uniform's one-shot error is within 1.5x of it, refit the uniform plan too and keep the refit whose outputs are closer to the "
                          "original's on the calibration and held-out samples (those the pass did not refit on where there are "
                          "enough: more calibration samples than --sequential-samples; one more refit pass; the refit reorders the "
                          "candidates at high ratios: Fashion-MNIST VGG / ShuffleNetV2 at 70%% MACs, docs/benchmark.md); "
                          "one-shot = keep auto's choice, one pass")
    recovery.add_argument("--shrinkage", type=_shrinkage, default="auto", metavar="auto|L",
                          help="when the sequential refit runs: shrinkage of each layer's fit toward the one-shot fit (default auto: chosen per "
                          "layer on the held-out verification samples; 0 = plain least squares)")
    shards = parser.add_argument_group("sharded calibration (statistics are additive)")
    shards.add_argument("--stats", nargs="+", metavar="NPZ", help="use statistics saved by `onnxprune stats` (merged) instead of calibrating; --calib still gives the verification samples")
    shards.add_argument("--workers", type=int, default=1, metavar="N", help="calibrate N shards in parallel local processes")
    shards.add_argument("--scheduler", metavar="ADDRESS", help="calibrate the shards on a Dask cluster: 'local' or a scheduler address (pip install onnxprune[distributed])")
    parser.add_argument("--report", metavar="FILE", action="append", default=[], help="also write the report: .json (all numbers) or .md (Markdown summary for CI logs / pull requests); repeatable")
    parser.add_argument("--plot", metavar="PNG", help="write a figure of units kept and MACs per layer (needs matplotlib: pip install onnxprune[plot])")
    parser.add_argument("--overwrite", action="store_true", help="allow the output path to be the input model")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    return parser


def _progress_factory(progress: Progress) -> Callable[[str, int], Callable[[int], None]]:
    def factory(description: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(description, total=total)
        return lambda advance: progress.advance(task, advance)
    return factory


def run(args: argparse.Namespace) -> int:
    if (args.calib is None) == (args.data_loader_script is None):
        raise OnnxPruneError("give calibration data with --calib FILE|FOLDER or --data-loader-script FILE.py:FUNC (one of them)")
    output = Path(args.output) if args.output else default_output_path(args.model)
    if output.is_dir():
        raise OnnxPruneError(f"output '{output}' is a folder; give a file name such as '{output / 'model.pruned.onnx'}'")
    for extra in [*args.report, *([args.plot] if args.plot else [])]:
        folder = Path(extra).parent
        if not folder.is_dir():
            raise OnnxPruneError(f"report folder '{folder}' (for '{extra}') does not exist")
    if Path(args.model).exists() and output.exists() and output.resolve() == Path(args.model).resolve() and not args.overwrite:
        raise OnnxPruneError(f"output '{output}' is the input model; choose another -o or pass --overwrite")
    options = dict(
        ratio=args.ratio, flops=args.flops, params=args.params, tolerance=args.tolerance, latency=args.latency,
        latency_batch=args.latency_batch, latency_threads=args.latency_threads,
        method=args.method, order=args.order, round_to=args.round_to, min_keep=args.min_keep,
        exclude=args.exclude, batch_size=args.batch_size, verify_samples=args.verify_samples, report_samples=args.report_samples, seed=args.seed,
        calib_samples=args.calib_samples, workers=args.workers, scheduler=args.scheduler, spatial_stride=args.spatial_stride,
        sequential=args.sequential, sequential_samples=args.sequential_samples, shrinkage=args.shrinkage, rechoose=args.rechoose, judge=args.judge, allocation=args.allocation, sensitivity_samples=args.sensitivity_samples,
        head_gain=args.head_gain,
        statistics=Statistics.merge_all([Statistics.load(p) for p in args.stats]) if args.stats else None,
        image_options=ImageOptions(size=args.input_size, mean=args.mean, std=args.std, layout=args.layout, scale=args.scale),
    )
    calib = args.calib if args.calib is not None else args.data_loader_script
    for path in [*args.report, *([args.plot] if args.plot else [])]:
        if Path(path).suffix.lower() not in (".json", ".md", ".png"):
            raise OnnxPruneError(f"report '{path}' must end in .json or .md (plots: .png)")
    stderr = Console(stderr=True)
    if args.quiet or not stderr.is_terminal:  # progress bars are for people; logs get the table only
        result = prune(args.model, calib, **options)
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=stderr, transient=True) as progress:
            result = prune(args.model, calib, progress=_progress_factory(progress), **options)
    written = save_model_atomic(result.model, output)
    if Path(args.model).exists() and output.resolve() == Path(args.model).resolve():
        written = []  # --overwrite: the input is already replaced, removing it would lose both
    with removed_on_failure(written):  # an interrupted run leaves neither the model nor half its reports
        result.report.output = str(output)
        for path in args.report:
            written.append(Path(path))
            if path.lower().endswith(".md"):
                Path(path).write_text(result.report.markdown())
            else:
                result.report.write_json(path)
        if args.plot:
            written.append(Path(args.plot))
            result.report.plot(args.plot)
    if not args.quiet:
        result.report.render(Console())
        Console().print(f"wrote {output}")
    else:
        for warning in result.report.warnings:
            sys.stderr.write(f"onnxprune: warning: {warning}\n")
    return 0


def build_stats_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxprune stats", description="Compute (a shard of) the calibration statistics of a model and save them as .npz.")
    parser.add_argument("model", help="input .onnx model")
    parser.add_argument("--calib", required=True, help="calibration data (as for pruning)")
    parser.add_argument("-o", "--output", required=True, help="statistics file to write (.npz)")
    parser.add_argument("--shard", default="0/1", metavar="I/K", help="compute shard I of K contiguous shards of the calibration samples (default 0/1)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="as for pruning (must match the pruning run)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B")
    parser.add_argument("--verify-samples", type=int, metavar="N", help="as for pruning (must match the pruning run)")
    parser.add_argument("--report-samples", type=int, default=0, metavar="N", help="as for pruning (must match the pruning run)")
    parser.add_argument("--calib-samples", type=int, metavar="N")
    parser.add_argument("--spatial-stride", type=_stride, default="auto", metavar="auto|S", help="as for pruning (must match the pruning run)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run_stats(args: argparse.Namespace) -> int:
    index, _, count = args.shard.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        raise OnnxPruneError(f"--shard must be I/K (e.g. 0/4), got '{args.shard}'") from None
    if not 0 <= shard[0] < shard[1]:
        raise OnnxPruneError(f"--shard {args.shard}: I must be in 0..K-1")
    options = dict(exclude=tuple(args.exclude), batch_size=args.batch_size, verify_samples=args.verify_samples,
                   calib_samples=args.calib_samples, spatial_stride=args.spatial_stride, report_samples=args.report_samples)
    partial_statistics(args.model, args.calib, shard, options).save(args.output)
    return 0


def build_inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxprune inspect", description="Show the prunable and pinned spaces of a model, without calibration.")
    parser.add_argument("model", help="input .onnx model")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON")
    parser.add_argument("--input-shapes", metavar="NAME:D,D,..", action="append", default=[], help="static shape of an input (dynamic dims default to 1, a KV cache's past length to 0)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="producer name pattern to treat as excluded")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, _, dims = item.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise OnnxPruneError(f"--input-shapes '{item}' is not NAME:D,D,... with integer dims") from None
        if not name:
            raise OnnxPruneError(f"--input-shapes '{item}' has no input name")
    return shapes


def run_inspect(args: argparse.Namespace) -> int:
    report = inspect_model(args.model, parse_shapes(args.input_shapes), args.exclude)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        report.render(Console())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"inspect": (build_inspect_parser, run_inspect), "stats": (build_stats_parser, run_stats)}
    command = argv[0] if argv and argv[0] in commands else None
    build, action = commands.get(command, (build_parser, run))
    args = build().parse_args(argv[1:] if command else argv)
    try:
        with signals_raise():  # SIGINT, SIGTERM and SIGHUP unwind the run and remove its files
            try:
                tempfiles.sweep_temporary_root()  # what killed runs left
                return action(args)
            finally:
                tempfiles.remove_all()
    except OnnxPruneError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"onnxprune: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        stopped = interrupted_signal(exc)
        sys.stderr.write(f"onnxprune: interrupted ({stopped.name})\n")
        return stopped.exit_code
    except OSError as exc:  # the environment, not a bug: a file that cannot be read or written
        if args.debug:
            traceback.print_exc()
        named = f"'{exc.filename}': " if exc.filename else ""
        sys.stderr.write(f"onnxprune: error: {named}{exc.strerror or exc}\n")
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"onnxprune: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)\n")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
