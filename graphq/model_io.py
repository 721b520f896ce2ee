"""Loading ONNX models and writing output folders safely (temporary name, rename when complete)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.output_files import (
    DISK_ERRORS,
    check_writable_parent,
    remove_stale_staging,
    resolve_output_path,
    staging_prefix,
)

MODEL_FILENAME = "model.onnx"


def resolve_model_file(path: str | Path) -> Path:
    """An export folder (holding model.onnx) or a .onnx file -> the .onnx file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILENAME
        if not candidate.is_file():
            onnx_files = sorted(path.glob("*.onnx"))
            if len(onnx_files) != 1:
                raise GraphqError(
                    f"{path} holds no {MODEL_FILENAME}: pass a model.onnx file or a folder made by 'graphq export'"
                )
            candidate = onnx_files[0]
        return candidate
    if not path.exists():
        raise GraphqError(f"model {path} does not exist: pass a model.onnx file or an export folder")
    if path.suffix != ".onnx":
        raise GraphqError(f"{path} is not an .onnx file: pass a model.onnx file or an export folder")
    return path


def load_model(path: str | Path) -> ir.Model:
    """Load an ONNX model (external data stays on disk until read)."""
    model_file = resolve_model_file(path)
    try:
        model = ir.load(model_file)
    except Exception as exc:  # protobuf raises DecodeError, and others for truncated files
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GraphqError(
            f"{model_file} is not a readable ONNX model ({first_line}): re-export it with 'graphq export'"
        ) from exc
    inline_external_attributes(model)
    check_external_data(model, model_file)
    return model


def inline_external_attributes(model: ir.Model) -> int:
    """Read into memory the tensors of node attributes (Constant values) kept in an external file.

    onnx's save_model puts those beside the initializers for models over 2 GB (optimum's model.onnx_data); the
    graph slices graphq runs are built from bytes, where such a relative reference cannot resolve. They are small
    (shapes, masks); the initializers stay lazily mapped. Returns how many were read."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.Tensor(attr.value.numpy(), name=attr.value.name))
                count += 1
    return count


def check_external_data(model: ir.Model, model_file: Path) -> None:
    """Every weight kept outside the graph lies inside an existing data file beside it.

    Weights are read lazily, so a missing or truncated model.onnx.data would otherwise surface in the middle of a
    quantization as an OSError or a numpy buffer error."""
    sizes: dict[Path, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        path = Path(tensor.path)
        if path not in sizes:
            if not path.is_file():
                raise GraphqError(
                    f"{model_file} keeps its weights in {tensor.location}, which is missing beside it: "
                    "copy the whole export folder"
                )
            stat = path.stat()
            if stat.st_nlink > 1:
                # onnx and onnx_ir refuse to read such a file (a possible hard-link attack) at the first weight read.
                raise GraphqError(
                    f"{tensor.location} beside {model_file} has {stat.st_nlink} hard links, which onnx refuses to "
                    "read: copy the export folder without hard links (cp -r, not cp -l)"
                )
            sizes[path] = stat.st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[path]:
            raise GraphqError(
                f"{tensor.location} is truncated: {value.name} ends at byte {end} but the file has {sizes[path]} bytes; "
                "copy the export folder again"
            )


def read_json_object(path: Path, remedy: str) -> dict:
    """A JSON file holding an object, as a dict ({} when the file does not exist); a damaged one is one GraphqError
    naming the file and ``remedy`` (what to do about it)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraphqError(f"{path} is not valid JSON ({exc}): {remedy}") from exc
    if not isinstance(data, dict):
        raise GraphqError(f"{path} holds a JSON {type(data).__name__}, not an object: {remedy}")
    return data


def read_model_config(model_dir: Path) -> dict:
    """The export's config.json ({} when there is none); a damaged one is bad input, named up front."""
    return read_json_object(model_dir / "config.json", "restore the export's config.json")


def read_report(output_dir: Path) -> dict:
    """A quantize output's report.json ({} when there is none)."""
    return read_json_object(output_dir / "report.json", "restore it from the quantize output, or delete it")


def model_context_length(model_dir: Path) -> int | None:
    """max_position_embeddings from the export's config.json, when it says."""
    value = read_model_config(model_dir).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "DequantizeLinear")


def quantized_op_count(model: ir.Model) -> int:
    """How many quantized-linear nodes (graphq's or another tool's) a graph holds."""
    return sum(node.op_type in QUANTIZED_OPS for node in model.graph)


def model_size_bytes(model_file: Path) -> int:
    """The model file plus any external data files beside it that it references."""
    total = model_file.stat().st_size
    for candidate in model_file.parent.iterdir():
        if candidate.name.startswith(model_file.name) and candidate != model_file:
            total += candidate.stat().st_size
    return total


#: Initializers smaller than this stay in memory when spilled (norm weights, biases: not worth a file read).
SPILL_MIN_BYTES = 1 << 20


class InitializerSpill:
    """In-memory initializers moved into one file and pointed at it: they are then read through a memory map when
    used (their pages can be dropped again) instead of being held. ``restore`` reads back those still pointing at
    the file and deletes it."""

    def __init__(self, path: Path, min_bytes: int | None = None):
        self.path, self.bytes = path, 0
        self.min_bytes = SPILL_MIN_BYTES if min_bytes is None else min_bytes
        path.write_bytes(b"")

    def move(self, values) -> int:
        """Spill those of ``values`` (ir.Values) that hold an in-memory tensor of at least min_bytes; returns the
        bytes moved."""
        moved = 0
        with open(self.path, "ab") as file:
            for value in values:
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < self.min_bytes:
                    continue
                data = tensor.tobytes()
                file.write(data)
                value.const_value = ir.ExternalTensor(self.path.name, self.bytes, len(data), tensor.dtype,
                                                      shape=tensor.shape, name=tensor.name or value.name,
                                                      base_dir=self.path.parent)
                self.bytes += len(data)
                moved += len(data)
        return moved

    def restore(self, model: ir.Model) -> None:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and Path(tensor.path) == self.path:
                value.const_value = ir.tensor(tensor.numpy().copy(), name=tensor.name)
                tensor.release()
        self.path.unlink(missing_ok=True)


def save_model(model: ir.Model, model_file: Path) -> None:
    """Save with weights in ``<model>.data`` beside the graph: no protobuf 2 GB limit, and lazy loading later.

    Tensors still mapped from the source model's data file are copied into the new one, so the output folder
    stands on its own.
    """
    ir.save(model, model_file, external_data=model_file.name + ".data")


def check_output_dir(output_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    output_dir = resolve_output_path(output_dir, "output folder")
    for source in inputs:
        source = source.resolve()
        if output_dir == source or output_dir in source.parents:
            raise GraphqError(
                f"output folder {output_dir} would overwrite the input {source}: choose another output folder"
            )
    if output_dir.exists() and not overwrite:
        raise GraphqError(f"output folder {output_dir} already exists: choose another or pass --overwrite")
    if output_dir.exists() and not output_dir.is_dir():
        raise GraphqError(f"output folder {output_dir} is a file: choose another output folder")
    check_writable_parent(output_dir, "output folder")


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False, inputs: list[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``output_dir``; rename it into place only when the block succeeds.

    Staging left by a dead process for the same output is cleaned first (see remove_stale_staging)."""
    output_dir = Path(output_dir)
    remove_stale_staging(output_dir)
    check_output_dir(output_dir, list(inputs), overwrite)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir), suffix=".partial", dir=output_dir.parent))
    except OSError as exc:
        raise GraphqError(f"cannot create output folder {output_dir}: {exc.strerror or exc}; choose another place") from exc
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder should look like any other
    try:
        yield staging
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir), suffix=".old", dir=output_dir.parent))
            os.replace(output_dir, old / "previous")
            os.replace(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            kept = f"{output_dir} is as it was" if output_dir.exists() else "nothing was written"
            raise GraphqError(
                f"cannot write {output_dir}: {exc.strerror}; free some space or choose another place ({kept})"
            ) from exc
        raise


def copy_side_files(source_dir: Path, target_dir: Path) -> None:
    """Copy tokenizer and config files (everything but ONNX models and their data) beside the new model."""
    for item in source_dir.iterdir():
        if not item.is_file() or item.suffix in (".onnx", ".data", ".onnx_data") or ".onnx" in item.name:
            continue
        if item.name in ("report.json",) or item.name.startswith("."):
            continue
        if item.name.startswith(("quant_model_weight_", "quant_model_description_")):
            continue  # another run's deployment artifacts: they describe that run's model, not this one
        shutil.copy2(item, target_dir / item.name)
