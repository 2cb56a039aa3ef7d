"""Streamed block loading: prune a model that is never whole in memory.

The model is built as a skeleton whose parameters live on the ``meta`` device (no memory); the
modules outside the transformer blocks that run before block 0 (embeddings, position
embeddings; the final norm too, it is small) are read from the checkpoint. Each block's weights
are read from the memory-mapped safetensors shards when its turn comes (:meth:`load_block`),
pruned by the usual sequential driver, written straight into the output shards and sent back
to ``meta`` (:meth:`finish_block`). Host memory is then about the embeddings plus one block
plus the activation caches, whatever the model's size (docs/pruning.md, "Streamed loading").

The output files are laid out before the first block (:mod:`besa_rs.pruning.shards`): the same
shard plan, tensor names, dtypes and bytes as ``save_pretrained`` of the in-memory path. They
are filled in the run's checkpoint directory, so a killed run resumes with its finished blocks
already on disk, and are hard-linked into the output directory at the end.

Inside a torch.distributed process group (:mod:`besa_rs.pruning.distributed`) every rank builds
the skeleton and reads each block from the shards (which every rank must be able to read); only
rank 0 lays out and fills the output files, the other ranks free each block once it is pruned
(their copy is rank 0's: the pruned weights are broadcast after every block).

The in-memory path is used instead (with the reason) when streaming cannot give the same
result: weights that are not plain safetensors (``.bin``, besa-rs packed checkpoints), models
whose checkpoint names are converted at load time, models that keep some modules in float32,
or checkpoints whose tensor names do not match the model's at all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import dtypes
from ..errors import ConfigError, FormatError, ModelError, ShapeError, first_line
from . import quant
from .adapters import ModelAdapter, get_adapter
from .shards import DTYPE_NAMES, FileLayout, ShardWriter

#: ``--load`` choices
LOAD_MODES = ("auto", "streamed", "in-memory")
INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "50GB"  # save_pretrained's default: the same shard plan as the in-memory path


class StreamUnavailable(Exception):
    """Streaming cannot reproduce the in-memory result for this model (``reason``)."""


# ---------------------------------------------------------------------------------------------
# the input checkpoint
class SourceFiles:
    """Which safetensors file of a model directory holds each tensor, with its dtype and shape
    (headers only; nothing is read until :meth:`read`)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.dir = directory
        index = directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(f"{index}: unreadable index ({first_line(e)})") from None
            for f in files:
                if not (directory / f).is_file():
                    raise FormatError(f"{index}: shard {f!r} listed in the index is missing")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = None
        self.file_of: dict[str, str] = {}
        self.info: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (safetensors dtype, shape)
        for f in files:
            try:
                with safe_open(str(directory / f), framework="pt") as h:
                    for name in h.keys():  # noqa: SIM118 - safe_open is not a mapping
                        if weight_map is not None and weight_map.get(name) != f:
                            continue  # the index decides which copy counts
                        sl = h.get_slice(name)
                        self.file_of[name] = f
                        self.info[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            except FormatError:
                raise
            except Exception as e:
                raise FormatError(
                    f"{directory / f}: unreadable safetensors file ({first_line(e)})"
                ) from None
        if weight_map is not None:
            for name, f in weight_map.items():
                if name not in self.file_of:
                    raise FormatError(
                        f"{directory / f}: tensor {name!r} listed in {INDEX} is missing"
                    )

    def identity(self, windows: int = 16, width: int = 64) -> str:
        """A cheap fingerprint of the checkpoint's contents: every file's name, size and
        header, and ``windows`` evenly spaced ``width``-byte samples of every tensor's bytes
        (read with ``pread``: nothing is mapped or kept). Ranks of a distributed run compare it
        instead of hashing weights they never hold all at once."""
        import struct

        h = hashlib.sha256()
        for f in sorted(set(self.file_of.values())):
            path = self.dir / f
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise FormatError(f"{path}: cannot read ({e.strerror})") from None
            try:
                size = os.fstat(fd).st_size
                n = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
                raw = os.pread(fd, n, 8)
                h.update(f"{f}\0{size}\0".encode() + raw)
                header = json.loads(raw)
                for name in sorted(k for k in header if k != "__metadata__"):
                    start, end = header[name]["data_offsets"]
                    span = max(end - start - width, 0)
                    for k in range(windows if end > start else 0):
                        off = 8 + n + start + span * k // max(windows - 1, 1)
                        h.update(os.pread(fd, min(width, end - start), off))
            except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
                raise FormatError(
                    f"{path}: unreadable safetensors file ({first_line(e)})"
                ) from None
            finally:
                os.close(fd)
        return h.hexdigest()

    def read(self, names: Iterable[str]) -> Iterable[tuple[str, torch.Tensor]]:
        """Yields the tensors ``names`` (all present), opening each file once and closing it
        before the next one (so the mapped pages of a file do not outlive its group)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        for f, group in by_file.items():
            with safe_open(str(self.dir / f), framework="pt") as h:
                for n in group:
                    yield n, h.get_tensor(n)


# ---------------------------------------------------------------------------------------------
# the skeleton
def _empty_model(config: Any, dtype: torch.dtype) -> Any:
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a requirement (requirements/base.in)
        raise StreamUnavailable("the accelerate package is not installed") from None
    from transformers import AutoModelForCausalLM

    # parameters on meta, buffers (rotary frequencies, masks) computed on the CPU as usual
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # the meta placement above re-creates parameters and so unties them
    model.eval()
    return model


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(
            value, requires_grad=bool(old is not None and old.requires_grad)
        )
    else:
        mod._buffers[attr] = value


def _to_meta(module: nn.Module) -> None:
    """Frees a block: its parameters go back to ``meta`` (buffers, small and possibly computed
    by the model itself, stay); quantization parameters attached by the run are dropped (they
    are in the output by then)."""
    for m in module.modules():
        for n, p in m._parameters.items():
            if p is not None and p.device.type != "meta":
                m._parameters[n] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        if getattr(m, quant.ATTR, None) is not None:
            delattr(m, quant.ATTR)


@dataclass
class _Plan:
    layouts: dict[str, FileLayout]  # output file name -> layout
    file_of: dict[str, str]  # tensor name -> output file name
    index: dict[str, Any] | None  # model.safetensors.index.json, when sharded


class StreamedModel:
    """A causal LM read block by block from a Hugging Face safetensors directory ``path`` and
    written block by block into the output files, in ``dtype``.

    Raises :class:`StreamUnavailable` when only the in-memory path can give the same result,
    and a :class:`besa_rs.errors.BesaError` naming the file and tensor when the checkpoint does
    not match its config (missing tensor, missing shard, wrong shape)."""

    def __init__(self, path: str | os.PathLike[str], dtype: torch.dtype):
        from transformers import AutoConfig

        self.path = Path(path)
        self.dtype = dtype
        if not self.path.is_dir() or not any(self.path.glob("*.safetensors")):
            raise StreamUnavailable("the weights are not a directory of safetensors files")
        from ..models import check_model_files

        if check_model_files(self.path):
            raise StreamUnavailable("a packed checkpoint is decoded by besa-rs in memory")
        try:
            config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{self.path}: cannot read the model config: {first_line(e)}") from e
        try:
            model = _empty_model(config, dtype)
        except (ValueError, KeyError) as e:
            raise ModelError(f"{self.path}: cannot build the model: {first_line(e)}") from e
        self._unavailable_reasons(model)
        self.model: Any = model
        self.adapter: ModelAdapter = get_adapter(model)
        self.source = SourceFiles(self.path)
        self.block_prefix = [f"{self.adapter.blocks_path}.{i}." for i in range(len(self.adapter))]
        self._saved = self._saved_tensors()
        self._check_source()
        self._materialise_outer()
        self.workdir: Path | None = None
        self.writes = True  # False on the ranks of a distributed run other than rank 0
        self._writers: dict[str, ShardWriter] = {}
        self._plan: _Plan | None = None

    # -----------------------------------------------------------------------------------------
    def _unavailable_reasons(self, model: nn.Module) -> None:
        try:
            from transformers.conversion_mapping import extract_weight_conversions_for_model

            if extract_weight_conversions_for_model(model):  # type: ignore[arg-type]
                raise StreamUnavailable(
                    "its checkpoint names are converted when transformers loads it"
                )
        except ImportError:  # pragma: no cover - older transformers
            pass
        if self.dtype == torch.float16 and getattr(model, "_keep_in_fp32_modules", None):
            raise StreamUnavailable("transformers keeps some of its modules in float32")
        if getattr(model, "_keep_in_fp32_modules_strict", None):
            raise StreamUnavailable("transformers keeps some of its modules in float32")

    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` writes: the state dict without tied duplicates (meta tensors
        carry dtype and shape)."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return dict(remove_tied_weights_from_state_dict(self.model.state_dict(), self.model))

    def block_of(self, name: str) -> int | None:
        for i, p in enumerate(self.block_prefix):
            if name.startswith(p):
                return i
        return None

    def _check_source(self) -> None:
        """Every saved tensor is in the checkpoint with the shape the config gives it."""
        src = self.source
        if not any(n in src.info for n in self._saved if self.block_of(n) is not None):
            raise StreamUnavailable("its checkpoint's tensor names differ from the model's")
        for name, t in self._saved.items():
            if name not in src.info:
                if t.device.type != "meta":
                    continue  # a buffer the model computes itself (written as computed)
                where = self.block_of(name)
                what = f"block {where}" if where is not None else "the model"
                raise FormatError(
                    f"{self.path}: tensor {name!r} ({what}) is in no safetensors file"
                )
            sdt, shape = src.info[name]
            if shape != tuple(t.shape):
                raise ShapeError(
                    f"{self.path / src.file_of[name]}: tensor {name!r} has shape {list(shape)}, "
                    f"the model's config expects {list(t.shape)}"
                )
            if (sdt in dtypes.FLOATS) != t.is_floating_point():
                raise FormatError(
                    f"{self.path / src.file_of[name]}: tensor {name!r} is {sdt}, expected "
                    f"{DTYPE_NAMES.get(t.dtype, t.dtype)}"
                )

    def _outer_names(self) -> list[str]:
        """Tensors outside the blocks that pruning needs: all but an untied output embedding
        (the capture stops at the last block, so the head never runs)."""
        head_w = getattr(self.model.get_output_embeddings(), "weight", None)
        if head_w is getattr(self.model.get_input_embeddings(), "weight", None):
            head_w = None  # tied: it is the input embedding
        skip = {n for n, p in self.model.named_parameters() if head_w is not None and p is head_w}
        return [n for n in self._saved if self.block_of(n) is None and n not in skip]

    def _materialise_outer(self) -> None:
        names = self._outer_names()
        for n, t in self.source.read([n for n in names if n in self.source.info]):
            _set_tensor(self.model, n, self._cast(n, t))
        self.model.tie_weights()

    def release_outer(self) -> None:
        """Frees the tensors outside the blocks read for the calibration capture (embeddings,
        final norm) once it is done: nothing after it runs them, and the output files get them
        from the checkpoint (:meth:`begin`)."""
        blocks = set(map(id, self.adapter.blocks))
        todo = [self.model]
        while todo:
            m = todo.pop()
            for n, p in m._parameters.items():
                if p is not None and p.device.type != "meta":
                    m._parameters[n] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            todo.extend(c for c in m.children() if id(c) not in blocks)
        self.model.tie_weights()  # a tied head follows the embedding to meta

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The checkpoint's tensor as the in-memory path loads it: floating tensors in the
        model's dtype for that tensor, others as stored."""
        want = self._saved[name].dtype
        if t.is_floating_point() and t.dtype != want:
            t = t.to(want)
        return t

    # -----------------------------------------------------------------------------------------
    # blocks
    def load_block(self, i: int) -> None:
        """Reads block ``i``'s weights from the shards into the skeleton (CPU, model dtype)."""
        block = self.adapter.blocks[i]
        prefix = self.block_prefix[i]
        names = [prefix + n for n in block.state_dict()]
        # parameters (checked up front to be in the files) and the buffers stored there
        for n, t in self.source.read([n for n in names if n in self.source.info]):
            _set_tensor(self.model, n, self._cast(n, t))

    def release_block(self, i: int) -> None:
        _to_meta(self.adapter.blocks[i])

    def finish_block(self, i: int) -> None:
        """Writes block ``i`` (pruned; quantization parameters too) into the output files,
        makes them durable and frees the block."""
        if not self.writes:  # another rank of a distributed run: rank 0 writes
            self.release_block(i)
            return
        block = self.adapter.blocks[i]
        prefix = self.block_prefix[i]
        for n, t in block.state_dict().items():
            if prefix + n in self._saved:
                self._write(prefix + n, t)
        if self._quant is not None:
            for lname, lin in self.adapter.linears(i).items():
                params = getattr(lin, quant.ATTR, None)
                if params is None:
                    raise ModelError(f"block {i} {lname}: was not quantized")
                for k, t in quant.layer_tensors(prefix + lname, params).items():
                    self._writers[quant.QUANT_FILE].write(k, t)
        self._sync()
        self.release_block(i)

    # -----------------------------------------------------------------------------------------
    # output files
    def begin(
        self, workdir: str | os.PathLike[str], cfg: Any, first: int, last: int, resumed: bool
    ) -> None:
        """Lays out the output files in ``workdir`` (the checkpoint directory) and, for a fresh
        run, writes every tensor pruning does not change (outside the blocks and blocks outside
        ``first .. last - 1``) from the checkpoint. A resumed run reopens the files, which must
        have exactly this layout.

        In a distributed run only rank 0 does this (and :meth:`finish_block` writes only there);
        its error, if any, is raised on every rank."""
        from . import distributed

        self.workdir = Path(workdir)
        self._quant = quant.spec_of(cfg)
        self._range = (first, last)
        self.writes = distributed.is_main()
        distributed.on_main(
            "the layout of the output files", lambda: self._lay_out(first, last, resumed)
        )

    def _lay_out(self, first: int, last: int, resumed: bool) -> None:
        assert self.workdir is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        plan = self._plan_files(first, last)
        self._plan = plan
        for fname, layout in plan.layouts.items():
            self._writers[fname] = ShardWriter(self.workdir / fname, layout, create=not resumed)
        if resumed:
            return
        unchanged = [n for n in self._saved if not first <= self._block_index(n) < last]
        # one group per block (or the modules outside the blocks): each file is closed between
        # groups, so its mapped pages do not pile up
        for _, grp in itertools.groupby(unchanged, key=self._block_index):
            names = list(grp)
            for n in names:
                if n not in self.source.info:  # a buffer the model computes itself
                    self._write(n, self._saved[n])
            for n, t in self.source.read([n for n in names if n in self.source.info]):
                self._write(n, self._cast(n, t))
        self._sync()

    def _block_index(self, name: str) -> int:
        b = self.block_of(name)
        return -1 if b is None else b

    def _plan_files(self, first: int, last: int) -> _Plan:
        from huggingface_hub import split_torch_state_dict_into_shards

        split = split_torch_state_dict_into_shards(
            self._saved, filename_pattern="model{suffix}.safetensors", max_shard_size=MAX_SHARD_SIZE
        )
        layouts: dict[str, FileLayout] = {}
        file_of: dict[str, str] = {}
        for fname, names in split.filename_to_tensors.items():
            layouts[fname] = FileLayout(
                {n: (self._saved[n].dtype, tuple(self._saved[n].shape)) for n in names},
                {"format": "pt"},
            )
            file_of.update(dict.fromkeys(names, fname))
        index = None
        if split.is_sharded:
            index = {
                "metadata": {"total_parameters": self.model.num_parameters(), **split.metadata},
                "weight_map": split.tensor_to_filename,
            }
        if self._quant is not None:
            layouts[quant.QUANT_FILE] = self._quant_layout(first, last)
        return _Plan(layouts, file_of, index)

    def _quant_layout(self, first: int, last: int) -> FileLayout:
        """quantization.safetensors as :func:`besa_rs.pruning.quant.write_quant_file` writes it
        for a run that quantizes every linear layer of blocks ``first .. last - 1``."""
        spec = self._quant
        assert spec is not None
        tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        layers: dict[str, Any] = {}
        for i in range(first, last):
            for lname, lin in self.adapter.linears(i).items():
                base = self.block_prefix[i] + lname
                rows, cols = lin.weight.shape
                groups = cols // spec.group_width(cols, f"block {i} {lname}")
                tensors[f"{base}.weight_codes"] = (torch.uint8, (rows, cols))
                tensors[f"{base}.weight_scale"] = (lin.weight.dtype, (rows, groups))
                tensors[f"{base}.weight_zero_point"] = (torch.uint8, (rows, groups))
                layers[f"{base}.weight"] = {
                    "bits": spec.bits,
                    "group_size": spec.group_size,
                    "shape": [rows, cols],
                }
        self._quant_meta = quant.file_metadata(layers)
        return FileLayout(tensors, self._quant_meta)

    def _write(self, name: str, t: torch.Tensor) -> None:
        assert self._plan is not None
        self._writers[self._plan.file_of[name]].write(name, t)

    def _sync(self) -> None:
        for w in self._writers.values():
            w.sync()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}

    # -----------------------------------------------------------------------------------------
    def save_into(self, directory: Path) -> dict[str, Any] | None:
        """Puts the finished output files into ``directory`` (the output being built): the
        weight files (hard links to the checkpoint's copies, or copies), the index when sharded,
        config.json and generation_config.json as ``save_pretrained`` writes them, and
        quantization.safetensors. Returns the quantization summary for the report (None when
        not quantized)."""
        assert self._plan is not None and self.workdir is not None
        self.close()
        for fname in self._plan.layouts:
            src, dst = self.workdir / fname, directory / fname
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        if self._plan.index is not None:
            (directory / INDEX).write_text(
                json.dumps(self._plan.index, indent=2, sort_keys=True) + "\n"
            )
        model = self.model
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(directory)
        if getattr(model, "can_generate", lambda: False)():
            model.generation_config.save_pretrained(directory)
        if self._quant is None:
            return None
        return quant.file_summary(self._quant_meta)


# ---------------------------------------------------------------------------------------------
def checkpoint_is_streamed(ckdir: str | os.PathLike[str]) -> bool | None:
    """Whether the run that left ``ckdir`` streamed its blocks (None: no readable checkpoint)."""
    from .checkpoint import STATE

    try:
        state = json.loads((Path(ckdir) / STATE).read_text())
        return bool(state["fingerprint"].get("load") == "streamed")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def open_stream(
    model: str | os.PathLike[str],
    dtype: torch.dtype,
    load: str = "auto",
    resume_from: str | os.PathLike[str] | None = None,
) -> tuple[StreamedModel | None, str]:
    """The streamed model for ``--load`` ``load`` (auto | streamed | in-memory), or None and
    the reason the whole model is loaded in memory. ``resume_from``: the checkpoint directory
    of the run being resumed; ``auto`` then continues it the way it was made."""
    if load not in LOAD_MODES:
        raise ConfigError(f"unknown --load {load!r}: expected one of {', '.join(LOAD_MODES)}")
    if load == "in-memory":
        return None, "--load in-memory"
    if load == "auto" and resume_from is not None and checkpoint_is_streamed(resume_from) is False:
        return None, "the run being resumed was made in memory"
    from ..models import resolve_model

    try:
        return StreamedModel(resolve_model(model), dtype), "streamed"
    except StreamUnavailable as e:
        if load == "streamed":
            raise ConfigError(f"--load streamed: {model}: cannot be streamed: {e}") from None
        return None, str(e)


def prune_streamed(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calib_tokens: torch.Tensor,
    config: Any = None,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    resume: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Prunes the Hugging Face model directory (or built-in name) ``model`` with streamed block
    loading and writes the pruned model to ``out``: the directory ``besa-rs prune`` writes
    (weights, config, ``tokenizer`` or the model's own, report, heatmap). ``config`` and keyword
    ``overrides`` as in :func:`besa_rs.prune`. Progress is checkpointed in ``OUT.checkpoint``
    after every block; ``resume=True`` continues a killed run. Returns the report.

    Inside an initialised torch.distributed process group call it on every rank with the same
    arguments (the whole calibration set on each): the samples are split over the ranks, every
    rank streams the blocks from ``model`` (readable by all ranks), and rank 0 checks the paths
    and writes ``out`` and the checkpoint (``out`` must be on a file system every rank shares).
    Every rank returns the report once ``out`` is complete.

    A model object already in memory is pruned in place with :func:`besa_rs.prune` instead."""
    import dataclasses
    import sys

    from ..models import load_tokenizer, parse_dtype, resolve_model
    from . import distributed
    from .checkpoint import STATE, Checkpointer
    from .config import PruneConfig
    from .output import check_prune_paths, write_outputs
    from .sequential import run_pruning

    cfg = dataclasses.replace(config or PruneConfig(), **overrides).validate()
    out = Path(out)
    ckdir = out.with_name(out.name + ".checkpoint")

    def check_paths() -> bool:  # rank 0 only: it may remove a killed run's debris
        for note in check_prune_paths(
            model, out, ckdir, overwrite=overwrite, resume=resume, json_path=None
        ):
            print(f"besa-rs: {note}", file=sys.stderr)
        return resume and (ckdir / STATE).is_file()

    resuming = distributed.on_main("the checks of the paths", check_paths)
    main = distributed.is_main()
    try:
        stream = StreamedModel(resolve_model(model), parse_dtype(dtype))
    except StreamUnavailable as e:
        raise ConfigError(f"{model}: cannot be streamed: {e}; use besa_rs.prune") from None
    if tokenizer is None and main:
        tokenizer = load_tokenizer(model)
    ck = Checkpointer(ckdir, cfg, calib_tokens, resume=resuming, streamed=True)
    try:
        report = run_pruning(stream.model, calib_tokens, cfg, checkpoint=ck, stream=stream)
    except Exception:
        stream.close()
        if main and not (ckdir / STATE).is_file():
            shutil.rmtree(ckdir, ignore_errors=True)
        raise
    report["model"] = str(model)
    report["resumed_from_block"] = ck.resumed_from
    report["load"] = {"mode": "streamed", "reason": "streamed"}
    if main:
        write_outputs(stream.model, tokenizer, report, out, overwrite=overwrite, stream=stream)
        shutil.rmtree(ckdir, ignore_errors=True)
    else:
        stream.close()
    # the other ranks return when rank 0 has written the outputs (or fail if it fails)
    distributed.barrier("the writing of the outputs")
    return report
