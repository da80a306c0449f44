"""Static TensorRT 10/11 compatibility checks, without TensorRT: ONNX files against onnx-tensorrt's operator
matrix, and Python source against the APIs TensorRT 11 removed.

The facts live in ``tensorrt_support.json`` (package data beside this module), each with its source and
version: ``onnx_operators[<major>]`` is onnx-tensorrt's ``docs/operators.md`` (supported operators, their
supported types and restrictions), ``removed_in_11`` is NVIDIA's "Removed Python APIs and Replacements" page of
the 10.x -> 11.x migration guide (plus the related removals listed under ``from_related_pages``). Both are
incomplete where the JSON says so (``complete``, ``distinct_matrix_found``, ``notes``).
"""
from __future__ import annotations

import ast
import functools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ctxsim.errors import ArtifactError, ConfigError

__all__ = ["MAX_LISTED", "SUPPORT_FILE", "check_onnx_for_tensorrt", "load_support", "onnx_problems", "removed_api_uses"]

SUPPORT_FILE = Path(__file__).with_name("tensorrt_support.json")
#: how many problems an ArtifactError names before "(+N more)"
MAX_LISTED = 3

# ONNX TensorProto element types -> the matrix's type names (others keep their ONNX name, which no row lists)
_MATRIX_TYPE = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "INT8": "INT8", "INT4": "INT4",
    "INT32": "INT32", "INT64": "INT64", "UINT8": "UINT8", "BOOL": "BOOL", "FLOAT8E4M3FN": "FP8",
    "FLOAT4E2M1": "FP4",
}
# Operators whose every input carries the data type the matrix's column refers to (same-type operands).
_ALL_INPUTS = frozenset({
    "Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Mean", "Sum", "Equal", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "And", "Or", "Xor", "Concat", "PRelu",
})
# Operators whose typed data are other inputs than the first (Where: 0 is the BOOL condition).
_DATA_INPUTS = {"Where": (1, 2)}
# Operators without inputs: the type column refers to the output (the value they make).
_OUTPUT_TYPED = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


@functools.lru_cache(maxsize=1)
def load_support() -> dict[str, Any]:
    """The parsed ``tensorrt_support.json`` (cached; treat it as read-only)."""
    try:
        return json.loads(SUPPORT_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{SUPPORT_FILE.name} is missing or damaged ({type(e).__name__}); "
                            "reinstall ctxsim") from None


def _matrix(major: int) -> dict[str, Any]:
    table = load_support()["onnx_operators"]
    if str(major) not in table:
        raise ConfigError(f"no onnx-tensorrt operator matrix for TensorRT {major}; known: {', '.join(sorted(table))}")
    return table[str(major)]


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        onnx_name = TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"
    return _MATRIX_TYPE.get(onnx_name, onnx_name)


def _load_model(path_or_model: Any) -> Any:
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    path = Path(path_or_model)
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any decode failure means a damaged or foreign file
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None


def _tensor_types(model: Any) -> dict[str, int]:
    """Element type of every named tensor: initializers, graph inputs/outputs, inferred values, Constant outputs."""
    types: dict[str, int] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type:
                    types[node.output[0]] = attr.t.data_type
    return types


def _constants(model: Any) -> dict[str, Any]:
    """name -> TensorProto of every initializer and Constant(value=...) output (the values a check can read)."""
    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = attr.t
    return values


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _label(node: Any, index: int) -> str:
    return f"node {node.name!r}" if node.name else f"node #{index} (-> {', '.join(node.output) or '?'})"


def _typed_inputs(node: Any) -> list[str]:
    if node.op_type in _DATA_INPUTS:
        return [node.input[i] for i in _DATA_INPUTS[node.op_type] if i < len(node.input) and node.input[i]]
    if node.op_type in _ALL_INPUTS:
        return [name for name in node.input if name]
    return [node.input[0]] if node.input and node.input[0] else []


def _zero_point_problem(node: Any, index: int, label: str, constants: dict[str, Any], what: str) -> str | None:
    """The matrix's "zero point must be zero" rule for Q/DQ input ``index`` (absent counts as zero)."""
    from onnx import numpy_helper

    if len(node.input) <= index or not node.input[index]:
        return None
    name = node.input[index]
    if name not in constants:
        return f"{label} ({node.op_type}): {what} {name!r} is not a constant, and TensorRT requires it to be zero"
    values = numpy_helper.to_array(constants[name])
    if values.size and bool((values != 0).any()):
        return f"{label} ({node.op_type}): {what} {name!r} is not zero, and TensorRT requires it to be zero"
    return None


def _quantized_output_type(node: Any, types: dict[str, int]) -> int | None:
    """QuantizeLinear's output element type: ``output_dtype``, else the zero point's type, else uint8 (ONNX)."""
    from onnx import TensorProto

    for attr in node.attribute:
        if attr.name == "output_dtype" and attr.i:
            return int(attr.i)
    if len(node.input) > 2 and node.input[2]:
        return types.get(node.input[2])
    if node.output and node.output[0] in types:
        return types[node.output[0]]
    return TensorProto.UINT8


def onnx_problems(path_or_model: Any, major: int) -> list[str]:
    """One line per node that TensorRT ``major`` cannot take, judged by onnx-tensorrt's operator matrix.

    A node is a problem when its op is not a supported row of the matrix (custom domains included), when the type
    of its data input(s) is not among the row's supported types (element types from initializers, graph inputs
    and ``onnx.shape_inference.infer_shapes``; index/shape inputs such as Reshape's shape are not judged), or when
    it breaks a Q/DQ rule the matrix states: DequantizeLinear's ``x_zero_point`` and QuantizeLinear's
    ``y_zero_point`` must be zero, and QuantizeLinear must produce one of the types DequantizeLinear accepts.
    Tensors whose type cannot be inferred are not judged.
    """
    import onnx

    matrix = _matrix(major)
    ops: dict[str, Any] = matrix["ops"]
    unsupported: dict[str, str] = matrix.get("unsupported", {})
    model = _load_model(path_or_model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph shape inference rejects is still judged op by op
        inferred = model
    types, constants = _tensor_types(inferred), _constants(inferred)
    dq_types = set(ops.get("DequantizeLinear", {}).get("types", []))
    problems: list[str] = []
    for index, node in enumerate(_all_nodes(inferred.graph)):
        label = _label(node, index)
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS:
            problems.append(f"{label} ({node.domain}::{op}): custom-domain op, not in onnx-tensorrt's operator "
                            f"matrix for TensorRT {major}")
            continue
        if op not in ops:
            if op in unsupported:
                note = f" ({unsupported[op]})" if unsupported[op] else ""
                why = f"listed as unsupported by TensorRT {major}{note}"
            else:
                why = f"not in onnx-tensorrt's operator matrix for TensorRT {major}"
            problems.append(f"{label} ({op}): {why}")
            continue
        allowed = ops[op].get("types", [])
        names = [node.output[0]] if op in _OUTPUT_TYPED and node.output else _typed_inputs(node)
        for name in names:
            if name not in types:
                continue
            got = _type_name(types[name])
            if got not in allowed:
                problems.append(f"{label} ({op}): {name!r} is {got}, TensorRT {major} supports "
                                f"{', '.join(allowed) or 'no type'} for {op}")
        if op in ("Cast", "CastLike"):
            for name in node.output[:1]:
                if name in types and _type_name(types[name]) not in allowed:
                    problems.append(f"{label} ({op}): output {name!r} is {_type_name(types[name])}, TensorRT "
                                    f"{major} supports {', '.join(allowed)} for {op}")
        if op == "DequantizeLinear":
            problem = _zero_point_problem(node, 2, label, constants, "x_zero_point")
            if problem:
                problems.append(problem)
        elif op == "QuantizeLinear":
            problem = _zero_point_problem(node, 2, label, constants, "y_zero_point")
            if problem:
                problems.append(problem)
            out_type = _quantized_output_type(node, types)
            if out_type is not None and dq_types and _type_name(out_type) not in dq_types:
                problems.append(f"{label} ({op}): quantises to {_type_name(out_type)}; TensorRT {major} "
                                f"dequantises only {', '.join(sorted(dq_types))}")
    return problems


def check_onnx_for_tensorrt(path: str | Path, majors: Iterable[int] = (10, 11)) -> None:
    """Raise ArtifactError (one line, a few problems named) unless every TensorRT major in ``majors`` takes the
    ONNX file at ``path`` by onnx-tensorrt's operator matrix (see ``onnx_problems``)."""
    model = _load_model(path)
    problems = [f"TensorRT {major}: {p}" for major in majors for p in onnx_problems(model, int(major))]
    if problems:
        more = f" (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise ArtifactError(f"{Path(path).name} will not build as a TensorRT engine: "
                            f"{'; '.join(problems[:MAX_LISTED])}{more}; re-export it with `ctxsim export`")


# ---------------------------------------------------------------------------------------------- removed APIs
@functools.lru_cache(maxsize=1)
def _removed_index() -> tuple[dict[tuple[str, str], str], dict[str, str], dict[str, str]]:
    """(enum (Class, MEMBER) -> API, interface member -> API, bare class name -> API) of every removed name."""
    removed = load_support()["removed_in_11"]
    enum_members: dict[tuple[str, str], str] = {}
    members: dict[str, str] = {}
    classes: dict[str, str] = {}
    for api in [*removed["names"], *removed.get("from_related_pages", {})]:
        spelled = api.removesuffix("()")
        owner, _, member = spelled.rpartition(".")
        if not owner:
            classes[member] = spelled
        elif owner[:1] == "I" and owner[1:2].isupper():  # an interface (IBuilderConfig, ICudaEngine): any receiver
            members[member] = spelled
        else:  # an enum (BuilderFlag): matched by its path, as its members (FP16, INT8) are common words
            enum_members[(owner, member)] = spelled
    return enum_members, members, classes


def _owner_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def removed_api_uses(source_code: str) -> list[str]:
    """``"line N: Class.member"`` for every attribute access, name or import in ``source_code`` that uses a
    TensorRT API removed in 11.x (``removed_in_11`` of the support JSON), in line order.

    Receiver types are unknown statically, so interface members (``int8_calibrator``, ``set_calibration_profile``,
    ``device_memory_size`` but not ``device_memory_size_v2``) match on any object; enum members match by their
    path (``trt.BuilderFlag.FP16``); removed classes (``IAlgorithmSelector``) match as names, attributes
    (``trt.IInt8EntropyCalibrator2``, base classes included) and imports."""
    enum_members, members, classes = _removed_index()
    hits: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(source_code)):
        if isinstance(node, ast.Attribute):
            owner = _owner_name(node.value)
            if owner is not None and (owner, node.attr) in enum_members:
                hits.add((node.lineno, enum_members[(owner, node.attr)]))
            elif node.attr in members:
                hits.add((node.lineno, members[node.attr]))
            elif node.attr in classes:
                hits.add((node.lineno, classes[node.attr]))
        elif isinstance(node, ast.Name) and node.id in classes:
            hits.add((node.lineno, classes[node.id]))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in classes:
                    hits.add((node.lineno, classes[alias.name]))
    return [f"line {line}: {api}" for line, api in sorted(hits)]
