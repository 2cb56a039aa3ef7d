"""The shape of the simulator's reports (``besa_rs.simulate`` / ``simulate_matrix``), as typed
dicts. The Rust engine builds them (``besa_sim::model``, serialized field by field); these
types only describe them for type checkers and readers. Fields that exist only in full mode are
optional keys. See docs/simulator.md for what each number means."""

from __future__ import annotations

from typing import Literal, TypedDict

#: The cycle models.
Mode = Literal["reference", "full"]


class Eval(TypedDict):
    """One evaluation of the reference threshold search."""

    ratio: float
    threshold: float
    g: int
    d: int
    e: int
    ns: int
    dense_width: int
    sparse_width: int
    dense_cycles: int
    sparse_cycles: int
    cycles: int
    flops: int


class Chunk(TypedDict):
    """The reference search on one matrix (or one column chunk of a ``down`` matrix)."""

    cols: list[int]
    cycles: int
    dense_cycles: int
    flops: int
    best: Eval
    evals: list[Eval]


class Step(TypedDict):
    """One workload (decode: 1 token, prefill) of one matrix in the full model."""

    tokens: int
    cycles: int
    compute_cycles: int
    data_cycles: int
    dense_cycles: int
    dense_compute_cycles: int
    dense_data_cycles: int
    dense_columns: int
    dense_width: int
    speedup: float
    bound: Literal["memory", "compute"]


class FullResult(TypedDict):
    """The full model of one matrix."""

    format: str  # one of besa_rs.simulation.FORMATS
    format_ok: bool
    value_bytes: int
    metadata_bytes: int
    dense_bytes: int
    bandwidth_bound: float
    decode: Step
    prefill: Step


class _MatrixFull(TypedDict, total=False):
    full: FullResult


class MatrixReport(_MatrixFull):
    """Everything reported for one matrix (``full`` in full mode only)."""

    name: str
    kind: str
    layer: int | None
    shape: list[int]
    dtype: str
    sparsity: float
    kept: int
    cycles: int
    dense_cycles: int
    flops: int
    speedup: float
    dense_columns: int
    threshold_ratios: list[float]
    thresholds: list[float]
    chunks: list[Chunk]


class _FullAggregates(TypedDict, total=False):
    decode_speedup: float
    prefill_speedup: float
    bandwidth_bound: float


class TypeSummary(_FullAggregates):
    """Averages over the matrices of one projection type (full-mode keys in full mode only)."""

    matrices: int
    avg_cycles: float
    dense_cycles: float
    speedup: float
    avg_flops: float
    sparsity: float
    avg_dense_columns: float


class Totals(_FullAggregates):
    """Totals over every simulated matrix (full-mode keys in full mode only)."""

    matrices: int
    cycles: int
    dense_cycles: int
    speedup: float
    flops: int
    sparsity: float


class Skipped(TypedDict):
    name: str
    reason: str


class RefParams(TypedDict):
    """The reference model's parameters."""

    pe_width: int
    pe_height: int
    start_ratio: float
    step: float
    hi: float
    lo: float
    max_moves: int
    float: Literal["f32", "f64"]


class FullParams(TypedDict):
    """The full model's hardware in engine units (Hz, bytes/s, bytes)."""

    pe_width: int
    pe_height: int
    clock_hz: float
    bandwidth: float
    value_bits: int
    act_bits: int
    index_bits: int
    format: str  # one of besa_rs.simulation.FORMATS
    prefill_tokens: int
    weight_buffer: int
    index_buffer: int
    input_buffer: int
    output_buffer: int


class Params(TypedDict):
    """The engine's parameters, as ``SimParams.as_dict()`` and a report's ``params``."""

    reference: RefParams
    full: FullParams | None
    chunk_kinds: list[str]


class SimReport(TypedDict):
    """A whole-model report: matrices sorted by layer, projection type and name; ``summary``
    per projection type in display order (q, k, v, o, qkv, gate, up, gate_up, down, others)."""

    mode: Mode
    path: str
    params: Params
    matrices: list[MatrixReport]
    summary: dict[str, TypeSummary]
    totals: Totals
    skipped: list[Skipped]


__all__ = [
    "Chunk",
    "Eval",
    "FullParams",
    "FullResult",
    "MatrixReport",
    "Mode",
    "Params",
    "RefParams",
    "SimReport",
    "Skipped",
    "Step",
    "Totals",
    "TypeSummary",
]
