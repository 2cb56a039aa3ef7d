"""Settings of a pruning run (BESA and the baselines), their parsing (sparsity structure,
comparison group, quantization grid) and validation. Depends on no pruning method and imports
torch only when a setting needs it (the command line reads the defaults from here)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ShapeError
from ..models import parse_dtype

if TYPE_CHECKING:
    import torch

#: the built-in methods (:mod:`besa_rs.pruning.registry` knows every registered one)
METHODS = ("besa", "wanda", "sparsegpt", "magnitude")
METRICS = ("wanda", "magnitude", "sparsegpt")
OPTIMIZERS = ("adamw", "prodigy")
LR_SCHEDULES = ("budget", "constant")
LOSS_SCALINGS = ("auto", "dynamic", "off")

#: default learning rates when ``lr`` is not given. AdamW's is the rate at the reference step
#: count (``lr_reference_steps``, 32 = the default 32 calibration sequences): with the default
#: ``lr_schedule="budget"`` the rate per step is ``lr * lr_reference_steps / steps``.
DEFAULT_LR = {"adamw": 0.2, "prodigy": 1.0}
#: default learning rates of the learned weight clipping when ``clip_lr`` is not given
DEFAULT_CLIP_LR = {"adamw": 0.1, "prodigy": 1.0}
#: AdamW's epsilon when ``adam_eps`` is not given (:attr:`PruneConfig.adam_epsilon`): torch's
#: default for BESA alone, a smaller one when pruning jointly with quantization, where the
#: sparsity and clipping logits' gradients (about 4e-9 to 2e-8 on the default model) sit at or
#: below 1e-8 and the larger epsilon shrinks their steps (chosen on the validation split)
DEFAULT_ADAM_EPS = 1e-8
JOINT_ADAM_EPS = 1e-12
#: initialisations of BESA's learned clipping (``clip_init``)
CLIP_INITS = ("auto", "fixed", "search")
#: comparison groups of the unstructured magnitude and Wanda baselines
GROUPS = ("row", "layer")


def parse_structure(structure: str) -> tuple[int, int]:
    """``"unstructured"`` -> (0, 0); ``"2:4"`` -> (2, 4)."""
    if structure == "unstructured":
        return 0, 0
    try:
        n_s, m_s = structure.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ConfigError(
            f"unknown structure {structure!r}: expected 'unstructured' or N:M such as '2:4'"
        ) from None
    if not (0 < n < m):
        raise ConfigError(f"structure {structure!r}: N:M needs 0 < N < M")
    return n, m


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise ConfigError(
            f"unknown comparison group {group!r}: expected one of {', '.join(GROUPS)}"
        )
    return group


@dataclass(frozen=True)
class QuantSpec:
    """Bit width and group size of the weight quantization grid (``group_size = -1``: one group
    per row); the grid itself is :mod:`besa_rs.pruning.quant`."""

    bits: int
    group_size: int = 128

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def check(self) -> QuantSpec:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"wbits must be an integer in 2..8 (or 16 = off), got {self.bits!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs >= 1):
            raise ConfigError(
                f"group_size must be -1 (whole row) or a positive integer, got {gs!r}"
            )
        return self

    def group_width(self, cols: int, name: str = "") -> int:
        """Columns per group for a layer with ``cols`` input features; ``ShapeError`` naming the
        layer when ``group_size`` does not divide them."""
        if self.group_size == -1:
            return cols
        if cols % self.group_size:
            raise ShapeError(
                f"layer {name}: group size {self.group_size} does not divide its {cols} input "
                "features (use a divisor or -1 for whole rows)"
            )
        return self.group_size


def spec_of(cfg: Any) -> QuantSpec | None:
    """The grid of a :class:`PruneConfig`, or None when weights are not quantized."""
    if getattr(cfg, "wbits", None) is None:
        return None
    return QuantSpec(int(cfg.wbits), int(cfg.group_size))


@dataclass
class PruneConfig:
    """Every setting of :func:`besa_rs.prune`. Defaults are the ones documented in
    docs/pruning.md: BESA row-wise, Wanda importance, sigmoid smoothing, lambda 5, AdamW with a
    step budget of lr 0.2 x 32 steps (lr 0.2 per step at 32 steps), 1 epoch, batch of one
    sequence, dynamic loss scaling when the block runs in float16.

    Construction validates (:meth:`validate`): an invalid combination raises a one-line
    :class:`~besa_rs.errors.ConfigError`, from the API exactly as from the command line."""

    method: str = "besa"
    sparsity: float = 0.5
    structure: str = "unstructured"  # or "N:M" (baselines only)
    group: str = "row"  # magnitude / Wanda comparison group: "row" | "layer"
    granularity: str = "row"  # "row" | "layer" | "rowblock:K"
    metric: str = "wanda"  # BESA importance: wanda | magnitude | sparsegpt (diagonal)
    candidate_step: float = 0.01
    smoothing: bool = True  # w = softmax(sigmoid(beta)) (authors' default) vs softmax(beta)
    prune_dense: bool = False  # target = dense chain instead of dense block on pruned inputs
    lam: float = 5.0  # sparsity penalty weight
    optimizer: str = "adamw"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    # "budget": AdamW's rate per step is lr * lr_reference_steps / steps, so the logits travel
    # as far with 128 calibration sequences as with 32; "constant": lr on every step
    lr_schedule: str = "budget"
    lr_reference_steps: int = 32
    adam_eps: float | None = None  # AdamW's epsilon; None: adam_epsilon's rule
    d_coef: float = 5.0  # Prodigy; the published row-wise setting for LLaMA-7B/13B
    # float16 gradients underflow at LLaMA widths: "auto" = dynamic loss scaling when the block
    # runs in float16 (never for bfloat16/float32), "dynamic" = always, "off" = never
    loss_scaling: str = "auto"
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 100  # good steps before the scale doubles
    epochs: int = 1
    batch_size: int = 1  # calibration sequences per optimisation step
    seed: int = 0
    reconstruct: bool = False  # after any method: least-squares refit of the kept weights
    percdamp: float = 0.01  # SparseGPT / reconstruction dampening (fraction of mean diag(H))
    blocksize: int = 128  # SparseGPT column block
    device: str = "cpu"
    cache_device: str | None = None  # where activation caches live: None = the compute device
    cache_dtype: str | None = None  # None = the model's dtype; or "float32"
    first_block: int = 0
    num_blocks: int | None = None  # prune only this many blocks (from first_block); None = all
    progress: bool = True
    # weight quantization (docs/pruning.md, "Quantization"); wbits None (or 16) = off
    wbits: int | None = None  # 2..8 bits per weight
    group_size: int = 128  # input columns per scale / zero point; -1 = one group per row
    clip_lr: float | None = None  # BESA's learned clipping; None: DEFAULT_CLIP_LR[optimizer]
    # initial clipping: "fixed" = sigmoid(quant.CLIP_INIT_LOGIT) everywhere; "search" = per
    # group the shrink with the smallest activation-weighted RTN error (quant.search_clip_logits);
    # "auto" = search for joint pruning at 4 bits or more, fixed otherwise (chosen on the
    # validation split: docs/pruning.md, "Choosing the clipping")
    clip_init: str = "auto"

    # ---------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> PruneConfig:
        """Checks every setting and their combinations (idempotent); normalises ``wbits=16``
        to None and an N:M structure's sparsity to N/M. Returns ``self``."""
        from .registry import method_for, method_names

        if self.method not in method_names():
            raise ConfigError(
                f"unknown method {self.method!r}: expected one of {', '.join(method_names())}"
            )
        if self.metric not in METRICS:
            raise ConfigError(
                f"unknown metric {self.metric!r}: expected one of {', '.join(METRICS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.wbits == 16:
            self.wbits = None  # 16 bits = not quantized
        if self.wbits is not None:
            QuantSpec(self.wbits, self.group_size).check()
            if self.clip_lr is not None and not (self.clip_lr > 0):
                raise ConfigError(f"clip_lr must be > 0, got {self.clip_lr}")
        if self.clip_init not in CLIP_INITS:
            raise ConfigError(
                f"unknown clip_init {self.clip_init!r}: expected one of {', '.join(CLIP_INITS)}"
            )
        quant_only = self.wbits is not None and self.sparsity == 0
        if not quant_only and (
            not isinstance(self.sparsity, (int, float))
            or not (0.0 < float(self.sparsity) < 1.0)
            or math.isnan(self.sparsity)
        ):
            raise ConfigError(
                f"sparsity must be strictly between 0 and 1 (0 only with wbits), got {self.sparsity!r}"
            )
        check_group(self.group)
        method = method_for(self)
        n, m = parse_structure(self.structure)
        if m and not method.structured:
            raise ConfigError(
                f"structure N:M is for the uniform baselines (wanda, sparsegpt, magnitude); {self.method} learns an unstructured allocation"
            )
        if m and abs(self.sparsity - n / m) > 1e-9:
            # N:M fixes the sparsity; keep the two consistent so reports are not misleading
            self.sparsity = n / m
        self.granularity_rows()  # validates the syntax
        if not (0.0 < self.candidate_step <= 0.5):
            raise ConfigError(f"candidate_step must be in (0, 0.5], got {self.candidate_step}")
        if self.lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.adam_eps is not None and not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ConfigError(f"adam_eps must be a finite number > 0, got {self.adam_eps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown lr_schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}"
            )
        if not (isinstance(self.lr_reference_steps, int) and self.lr_reference_steps >= 1):
            raise ConfigError(f"lr_reference_steps must be >= 1, got {self.lr_reference_steps!r}")
        if self.loss_scaling not in LOSS_SCALINGS:
            raise ConfigError(
                f"unknown loss_scaling {self.loss_scaling!r}: expected one of {', '.join(LOSS_SCALINGS)}"
            )
        if not (math.isfinite(self.loss_scale_init) and self.loss_scale_init > 0):
            raise ConfigError(f"loss_scale_init must be > 0, got {self.loss_scale_init}")
        if self.loss_scale_growth_interval < 1:
            raise ConfigError(
                f"loss_scale_growth_interval must be >= 1, got {self.loss_scale_growth_interval}"
            )
        if not (self.d_coef > 0):
            raise ConfigError(f"d_coef must be > 0, got {self.d_coef}")
        if not (0 <= self.percdamp < 1):
            raise ConfigError(f"percdamp must be in [0, 1), got {self.percdamp}")
        if self.blocksize < 1:
            raise ConfigError(f"blocksize must be >= 1, got {self.blocksize}")
        if self.prune_dense and not method.dense_chain:
            raise ConfigError(
                f"prune_dense (targets from the dense chain) is for BESA; method {self.method!r} does not use it"
            )
        if self.cache_dtype is not None:
            parse_dtype(self.cache_dtype)  # ConfigError naming the accepted dtypes
        import torch

        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"unknown device {self.device!r}") from None
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        if self.first_block < 0 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ConfigError("first_block must be >= 0 and num_blocks >= 1")
        return self

    def granularity_rows(self) -> tuple[str, int]:
        """("row", 1) | ("layer", 0) | ("rowblock", K)."""
        g = self.granularity
        if g == "row":
            return "row", 1
        if g == "layer":
            return "layer", 0
        if g.startswith("rowblock:"):
            try:
                k = int(g.split(":", 1)[1])
            except ValueError:
                k = 0
            if k < 1:
                raise ConfigError(f"granularity {g!r}: rowblock:K needs a positive integer K")
            return "rowblock", k
        raise ConfigError(f"unknown granularity {g!r}: expected row, layer or rowblock:K")

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.optimizer])

    @property
    def clip_learning_rate(self) -> float:
        return float(self.clip_lr if self.clip_lr is not None else DEFAULT_CLIP_LR[self.optimizer])

    def step_lr(self, steps: int, lr: float | None = None) -> float:
        """Learning rate of each optimisation step of a block that takes ``steps`` steps, for the
        sparsity logits (``lr`` None: :attr:`learning_rate`) or another parameter group of the
        same loop (``lr``: its rate at the reference step count, e.g. the clipping's
        :attr:`clip_learning_rate`).

        AdamW with ``lr_schedule="budget"``: ``lr * lr_reference_steps / steps``. Adam's steps
        have size about ``lr`` whatever the gradient's scale, so the logits' total travel is
        ``lr * lr_reference_steps`` at every calibration size; more steps average more samples
        instead of going further. Prodigy estimates its own step size: its ``lr`` is used as is.
        """
        lr = self.learning_rate if lr is None else float(lr)
        if self.optimizer == "adamw" and self.lr_schedule == "budget":
            return lr * self.lr_reference_steps / max(int(steps), 1)
        return lr

    def uses_loss_scaling(self, compute_dtype: torch.dtype) -> bool:
        import torch

        if self.loss_scaling == "auto":
            return compute_dtype == torch.float16
        return self.loss_scaling == "dynamic"

    def torch_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return parse_dtype(self.cache_dtype) if self.cache_dtype else model_dtype

    @property
    def joint(self) -> bool:
        """Pruning jointly with quantization: ``wbits`` set and a sparsity above 0."""
        return self.wbits is not None and self.sparsity > 0

    @property
    def clip_init_mode(self) -> str:
        """``clip_init`` with ``auto`` resolved: ``search`` when pruning jointly (sparsity > 0)
        at 4 bits or more, where it was better on the validation split; ``fixed`` at 3 bits and
        below (where search was worse) and for learned clipping alone (not measured)."""
        if self.clip_init != "auto":
            return self.clip_init
        return "search" if self.joint and (self.wbits or 0) >= 4 else "fixed"

    @property
    def adam_epsilon(self) -> float:
        """``adam_eps`` with None resolved: :data:`JOINT_ADAM_EPS` when pruning jointly with
        quantization (``wbits`` set, sparsity > 0), else :data:`DEFAULT_ADAM_EPS`."""
        if self.adam_eps is not None:
            return float(self.adam_eps)
        return JOINT_ADAM_EPS if self.joint else DEFAULT_ADAM_EPS

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_eps"] = (
            self.adam_epsilon if self.method == "besa" and self.optimizer == "adamw" else None
        )
        d["lr"] = self.learning_rate if self.method == "besa" else None
        d["clip_lr"] = (
            self.clip_learning_rate if self.method == "besa" and self.wbits is not None else None
        )
        d["clip_init"] = (
            self.clip_init_mode if self.method == "besa" and self.wbits is not None else None
        )
        return d

    def fingerprint(self) -> dict[str, Any]:
        """Settings that must match for a run to be resumed."""
        d = dataclasses.asdict(self)
        for k in ("progress", "device", "cache_device"):
            d.pop(k)
        return d
