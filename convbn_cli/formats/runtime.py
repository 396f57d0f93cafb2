"""Writing, opening and running each model file format: one writer and one reader per format, one check of what
a model takes and gives, and one wrapper for models that take raw pixels.

Readers turn every failure of the file into one TargetError line naming it. A reader gives an `Opened`: the Keras
model (for .keras) or nothing, a predict function (images -> logits, NumPy), what it takes and gives, and what the
file says about itself (formats/catalog.py). Which formats exist, their names and suffixes: formats/catalog.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from ..errors import ConvbnError, TargetError
from ..model.fold import PIXELS_INPUT, takes_pixels
from ..readers import check_files, read_bytes
from ..tf_setup import quiet_native
from .catalog import (
    METADATA_KEY,
    check_keras_archive,
    metadata_text,
    read_metadata,
    write_keras_metadata,
    write_manifest,
)

ONNX_OPSET = 17  # onnxruntime has run it since 1.11 (2022)
MAX_ONNX_BYTES = 256 << 20  # the model and its external data


@dataclass
class Opened:
    """A model file, opened.

    fmt: its format (formats/catalog.py). model: the Keras model (a .keras file), else None.
    predict: images (NumPy float32, as the file's input takes them) -> logits (NumPy).
    shape: (H, W, C) of its input; classes: scores per image. takes_pixels: its input is raw 0-255 pixels (an
    export with its preprocessing inside). about: what the file says about itself ({} when nothing).
    """

    fmt: str
    predict: Callable
    shape: tuple
    classes: int
    takes_pixels: bool = False
    about: dict = field(default_factory=dict)
    model: Optional[object] = None


def _cut(e: Exception, n: int = 300) -> str:
    return " ".join(str(e).split())[:n]


def check_signature(path, inputs: list, outputs: list) -> tuple:
    """((H, W, C), classes) of a model with one input of images of a known size (N, H, W, C) and one output of
    one score per class (N, classes): what every command here measures. `inputs`, `outputs`: their shapes."""
    if len(inputs) != 1 or len(outputs) != 1:
        raise TargetError(f"{path}: has {len(inputs)} inputs and {len(outputs)} outputs; convbn measures image "
                          "classifiers with one input (N, H, W, C) and one output (N, classes)")
    shape, out = tuple(inputs[0]), tuple(outputs[0])
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise TargetError(f"{path}: takes inputs of shape {shape}; convbn needs images of a known size, "
                          "(N, H, W, C)")
    if len(out) != 2 or not isinstance(out[1], int) or out[1] < 2:
        raise TargetError(f"{path}: gives outputs of shape {out}; convbn needs one score per class, "
                          "(N, classes) with at least 2 classes")
    return shape[1:], out[1]


def _shape(dims) -> tuple:
    """A shape with unknown dimensions as None, whatever the runtime calls them (-1, a name, None)."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in dims)


def from_pixels(predict: Callable, to_pixels: Callable) -> Callable:
    """normalized images -> logits for a model that takes raw pixels (`predict`), given the run's inverse of its
    normalization (`to_pixels`): every command hands a target normalized images."""
    return lambda x: predict(np.asarray(to_pixels(x)))


# --------------------------------------------------------------------------- readers, one per format

def read_keras(path) -> Opened:
    """A .keras archive, bounded before Keras reads it (catalog.check_keras_archive) and loaded with safe_mode:
    no code from the file runs."""
    path = Path(path)
    check_keras_archive(path)
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # noqa: BLE001  a damaged archive fails in many ways (ValueError, KeyError, OSError, ...)
        raise TargetError(f"{path}: cannot load ({type(e).__name__}: {_cut(e)})") from None
    inputs = [tuple(t.shape) for t in (getattr(model, "inputs", None) or [])]
    outputs = [tuple(t.shape) for t in (getattr(model, "outputs", None) or [])]
    shape, classes = check_signature(path, inputs, outputs)
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return Opened("keras", lambda x: fn(tf.constant(x)).numpy(), shape, classes, takes_pixels(model),
                  read_metadata(path), model)


MAX_TFLITE_BYTES = 256 << 20
def open_interpreter(data: bytes):
    """A TFLite interpreter with its tensors allocated, without the deprecation warning and the XNNPACK notice it
    prints (shown with --verbose). It is given the file's bytes (read bounded by read_tflite), never its path:
    TensorFlow verifies a flatbuffer given as bytes (FlatBufferModel::VerifyAndBuildFromBuffer) but not one given
    by path, and a truncated file given by path crashed the process (SIGSEGV)."""
    with quiet_native():
        interpreter = tf.lite.Interpreter(model_content=data)
        interpreter.allocate_tensors()
    return interpreter


def read_tflite(path) -> Opened:
    data = read_bytes(path, MAX_TFLITE_BYTES, "a TFLite model of an MNIST-like conv net", TargetError)
    try:
        interpreter = open_interpreter(data)  # the bytes read once: the interpreter's and the metadata's
    except (ValueError, RuntimeError, OSError) as e:
        raise TargetError(f"{path}: not a readable TFLite model ({_cut(e)})") from None
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    shape, classes = check_signature(path, [_shape(d["shape"]) for d in inputs], [_shape(d["shape"]) for d in outputs])

    def run(x):  # the interpreter's input resized to each batch
        inp = interpreter.get_input_details()[0]
        if tuple(inp["shape"]) != x.shape:
            interpreter.resize_tensor_input(inp["index"], x.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    about = read_metadata(path, tflite_metadata(data))
    return Opened("tflite", run, shape, classes, PIXELS_INPUT in inputs[0]["name"], about)


MAX_ONNX_ARENA_BYTES = 512 << 20  # all the memory an ONNX model may take while it runs (weights and tensors)
_arena = []  # onnxruntime's allocator with that bound, registered once per process


def _onnx_runtime(path):
    """(onnx, onnxruntime), the allocator bounded: a graph can allocate without bound (ConstantOfShape [2^29]
    took 2.8 GB; onnxruntime has no default limit), and the bounded arena turns that into an error instead."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise TargetError(f"{path}: running an ONNX model needs onnx and onnxruntime: pip install 'convbn[onnx]'") \
            from None
    if not _arena:
        ort.set_default_logger_severity(4)  # fatal only: its errors are reported here, once, as one line
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"max_mem": MAX_ONNX_ARENA_BYTES}))
        _arena.append(memory)
    return onnx, ort


def check_onnx_external_data(path, model) -> None:
    """Every tensor whose data lies in another file (ONNX's external data) must name a regular file beside the
    model or below its folder, within its bounds: never one elsewhere (`/etc/...`, `../...`, a link out)."""
    folder, total = Path(path).resolve().parent, 0
    for tensor in _all_tensors(model):
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = (folder / info.get("location", "")).resolve()
        if not where.is_relative_to(folder) or not where.is_file():
            raise TargetError(f"{path}: its tensor {tensor.name!r} reads {info.get('location')!r}, which is not a "
                              "file beside the model; convbn reads external data only from the model's own folder")
        offset = int(info.get("offset", 0) or 0)
        length = int(info.get("length", 0) or where.stat().st_size - offset)
        total += length
        if offset < 0 or length < 0 or offset + length > where.stat().st_size or total > MAX_ONNX_BYTES:
            raise TargetError(f"{path}: its external data ({info.get('location')!r}) is larger than its file or "
                              f"than {MAX_ONNX_BYTES >> 20} MiB in all")


def _all_tensors(model):
    """Every TensorProto of an ONNX model: initializers (sparse ones too) and tensor attributes, in subgraphs too."""
    graphs, out = [model.graph], []
    while graphs:
        g = graphs.pop()
        sparse = list(g.sparse_initializer)
        for node in g.node:
            for a in node.attribute:
                out += ([a.t] if a.HasField("t") else []) + list(a.tensors)
                sparse += ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
                graphs += ([a.g] if a.HasField("g") else []) + list(a.graphs)
        out += list(g.initializer) + [t for s in sparse for t in (s.values, s.indices)]
    return out


def onnx_layout(graph, dims, given=None):
    """"NCHW" or "NHWC": the input layout of an ONNX graph whose input is `dims` (N, a, b, c): `given` (--layout),
    else what the graph does with its input first (straight into a Conv: NCHW, as PyTorch exports; a Transpose
    that puts the last axis second: NHWC, as tf2onnx writes), else its shape (1 or 3 channels first or last
    alone); None where nothing says (analysis/onnx_graph.py's diagnose and the readers here decide alike)."""
    if given:
        return given.upper()
    inits = {t.name for t in graph.initializer}
    name = next((i.name for i in graph.input if i.name not in inits), None)
    first = [n for n in graph.node if name in n.input]
    if first and all(n.op_type == "Conv" for n in first):
        return "NCHW"
    perms = [[int(v) for a in n.attribute if a.name == "perm" for v in a.ints] for n in first
             if n.op_type == "Transpose"]
    if perms and all(p == [0, 3, 1, 2] for p in perms):
        return "NHWC"
    c_first, c_last = dims[1] in (1, 3), dims[-1] in (1, 3)
    if c_first != c_last:
        return "NCHW" if c_first else "NHWC"
    return None


def read_onnx(path, layout=None) -> Opened:
    """An ONNX model through onnxruntime (the `onnx` extra), opened by its path so that its external data is read
    from beside it (check_onnx_external_data), with memory bounded (_onnx_runtime); every failure one line. A model
    that takes NCHW images (onnx_layout: a PyTorch export) is fed them: `predict` takes (N, H, W, C) as every
    reader's does, and its shape is (H, W, C)."""
    onnx, ort = _onnx_runtime(path)
    data = read_bytes(path, MAX_ONNX_BYTES, "an ONNX model of an MNIST-like conv net", TargetError)
    try:
        proto = onnx.load_from_string(data)
        check_onnx_external_data(path, proto)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.use_env_allocators", "1")  # the bounded arena
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except TargetError:
        raise
    except Exception as e:  # noqa: BLE001  onnx and onnxruntime fail on a damaged model in their own types
        raise TargetError(f"{path}: not a readable ONNX model ({_cut(e, 200)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape, classes = check_signature(path, [_shape(i.shape) for i in inputs], [_shape(o.shape) for o in outputs])
    name = inputs[0].name
    about = read_metadata(path, session.get_modelmeta().custom_metadata_map)
    nchw = onnx_layout(proto.graph, (None, *shape), layout) == "NCHW"
    shape = (shape[1], shape[2], shape[0]) if nchw else shape

    def run(x):
        try:
            return session.run(None, {name: np.ascontiguousarray(np.moveaxis(x, -1, 1)) if nchw else x})[0]
        except Exception as e:  # noqa: BLE001  onnxruntime's own error types (Fail, RuntimeException, ...)
            raise _run_error(path, e) from None

    return Opened("onnx", run, shape, classes, PIXELS_INPUT in name, about)


def _run_error(path, e: Exception) -> TargetError:
    """onnxruntime's failure to run the model at `path`, in one line: the bounded arena's refusal said as such."""
    short = (f"more memory than the {MAX_ONNX_ARENA_BYTES >> 20} MiB an ONNX model may take"
             if "smaller than requested" in str(e) else _cut(e, 200))
    return TargetError(f"{path}: onnxruntime could not run it ({short})")


def load_onnx(path):
    """(ModelProto with its external data inside, what the file says about itself) of the ONNX model at `path`,
    for a command that measures or rewrites it in memory (diagnose, recalibrate, export --fold-bn): read_onnx's
    checks first (size, external data beside it, a session that opens, one image input and one score output), so
    what is loaded is what `eval` would run."""
    about = read_onnx(path).about
    onnx, _ = _onnx_runtime(path)
    try:
        return onnx.load(str(path)), about  # external data: checked by read_onnx, loaded from beside the model
    except Exception as e:  # noqa: BLE001  onnx fails on a damaged model in its own types
        raise TargetError(f"{path}: not a readable ONNX model ({_cut(e, 200)})") from None


def onnx_session(path, proto):
    """An onnxruntime session of `proto`, an in-memory variant of the model at `path` (load_onnx), under the same
    bounded arena as read_onnx's; `run(outputs, feeds)` gives its outputs, every failure one line naming `path`."""
    _, ort = _onnx_runtime(path)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")  # the bounded arena
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  onnxruntime's own error types
        raise TargetError(f"{path}: onnxruntime could not load it ({_cut(e, 200)})") from None

    def run(outputs, feeds):
        try:
            return session.run(outputs, feeds)
        except Exception as e:  # noqa: BLE001  onnxruntime's own error types (Fail, RuntimeException, ...)
            raise _run_error(path, e) from None

    return run


# What a SavedModel may compute before convbn loads it (tf.saved_model.load runs some of its functions, e.g. a
# resource's initializer, and eval and predict call its serving function): tensor arithmetic only. No op that
# reads or writes files (ReadFile, WriteFile, MatchingFiles, the Save/Restore ops outside the saver), starts a
# process or talks to a network, calls Python (PyFunc, EagerPyFunc), or creates lookup tables, queues, readers,
# iterators or other resources. TensorFlow has no such check of its own; the lists are convbn's.
PURE_OPS = frozenset("""
    Abs Add AddN AddV2 ArgMax ArgMin AvgPool BatchMatMulV2 BatchMatMulV3 BiasAdd BroadcastArgs BroadcastTo Cast Ceil
    ClipByValue ConcatV2 Const Conv2D Conv2DBackpropInput Cumsum DepthwiseConv2dNative Div DivNoNan Einsum Elu Equal
    Erf Exp ExpandDims Fill Floor FloorDiv FloorMod FusedBatchNorm FusedBatchNormV3 GatherV2 Greater GreaterEqual
    Identity IdentityN LeakyRelu Less LessEqual Log LogSoftmax LogicalAnd LogicalNot LogicalOr MatMul Max MaxPool
    Maximum Mean Min Minimum MirrorPad Mod Mul Neg NoOp NotEqual OnesLike Pack Pad PadV2 PartitionedCall Placeholder
    Pow PreventGradient Prod Range Rank ReadVariableOp RealDiv Reciprocal Relu Relu6 Reshape ResizeBilinear
    ResizeNearestNeighbor Round Rsqrt Select SelectV2 Selu Shape ShapeN Sigmoid Sign Size Slice Softmax Softplus
    Softsign Split SplitV Sqrt Square SquaredDifference Squeeze StatefulPartitionedCall StopGradient StridedSlice Sub
    Sum Tanh Tile Transpose Unpack ZerosLike
""".split())
# The graph's own nodes (TensorFlow 1's view, which the TF2 loader does not run) declare the variables.
GRAPH_OPS = PURE_OPS | {"VarHandleOp", "AssignVariableOp", "VarIsInitializedOp"}
# The saver functions every SavedModel carries (what tf.saved_model.save traces for writing and reading its own
# variables); allowed only in functions that nothing but the saver nodes call.
SAVER_OPS = PURE_OPS | {"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "StringJoin",
                        "StaticRegexFullMatch", "DisableCopyOnRead", "AssignVariableOp"}
MAX_SAVED_MODEL_PB_BYTES = 256 << 20
MAX_SAVED_MODEL_BYTES = 1 << 30  # the graph, variables and assets together


def _called(node) -> set:
    """The functions a node (or a function's node) calls through its attributes (f, then_branch, body, ...)."""
    names = set()
    for value in node.attr.values():
        if value.HasField("func"):
            names.add(value.func.name)
        names.update(f.name for f in value.list.func)
    return names


CALL_OPS = frozenset({"StatefulPartitionedCall", "PartitionedCall"})


def _named_in(message, names: set) -> set:
    """The strings among `names` that a protobuf message holds anywhere (in any field, at any depth)."""
    found, todo = set(), [message]
    while todo:
        m = todo.pop()
        for _, value in m.ListFields():
            if hasattr(value, "keys"):  # a map field
                values = [*value.keys(), *value.values()]
            elif isinstance(value, (str, bytes)) or hasattr(value, "ListFields") or not hasattr(value, "__iter__"):
                values = [value]
            else:  # a repeated field
                values = list(value)
            for v in values:
                if isinstance(v, str):
                    found |= {v} & names
                elif hasattr(v, "ListFields"):
                    todo.append(v)
    return found


def _reach(roots, calls) -> set:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += calls.get(name, ())
    return seen


def _foreign_op(meta_graph):
    """(op, where) of the first operation of `meta_graph` outside what its place allows, or None."""
    graph, library = meta_graph.graph_def, meta_graph.graph_def.library.function
    saver = {meta_graph.saver_def.save_tensor_name.split(":")[0], meta_graph.saver_def.restore_op_name} - {""}
    calls = {f.signature.name: set().union(*(_called(n) for n in f.node_def)) for f in library}
    saver_roots = set().union(*(_called(n) for n in graph.node if n.name in saver))
    # what the TF2 loader restores as callable (the serving function, a resource's initializer) is never saver's:
    # every function the object graph names anywhere, whether or not its concrete_functions map lists it
    others = _named_in(meta_graph.object_graph_def, set(calls)).union(
        *(_called(n) for n in graph.node if n.name not in saver))
    pure = _reach(others | (set(calls) - _reach(saver_roots, calls)), calls)
    for n in graph.node:  # the saver's nodes only call its functions (their op is the call, never SaveV2 itself)
        if n.op not in (CALL_OPS if n.name in saver else GRAPH_OPS):
            return n.op, f"node {n.name}"
    for f in library:
        allowed = PURE_OPS if f.signature.name in pure else SAVER_OPS
        bad = next((n for n in f.node_def if n.op not in allowed), None)
        if bad is not None:
            return bad.op, f"function {f.signature.name}"
    return None


def check_savedmodel(path) -> None:
    """Refuse (one line) a SavedModel that could run anything but tensor arithmetic, before TensorFlow loads it."""
    from tensorflow.core.protobuf import saved_model_pb2  # the format's own schema

    walked = [(Path(here), dirs, names) for here, dirs, names in os.walk(path)]
    link = next((h / n for h, dirs, names in walked for n in [*dirs, *names] if (h / n).is_symlink()), None)
    if link is not None:  # TensorFlow would follow it out of the model (to a FIFO, a huge file, someone's data)
        raise TargetError(f"{link}: a symbolic link inside a SavedModel; convbn reads a SavedModel's own files only")
    check_files([h / n for h, _, names in walked for n in names], MAX_SAVED_MODEL_BYTES, f"{path}, a SavedModel,",
                TargetError)
    data = read_bytes(Path(path) / "saved_model.pb", MAX_SAVED_MODEL_PB_BYTES, "a SavedModel's graph", TargetError)
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001  protobuf's DecodeError and friends
        raise TargetError(f"{path}: not a readable SavedModel ({_cut(e, 200)})") from None
    if len(proto.meta_graphs) != 1 or not proto.meta_graphs[0].HasField("object_graph_def"):
        # TensorFlow loads any other SavedModel the TF1 way, running its saver's restore op as it loads
        raise TargetError(f"{path}: a TensorFlow 1 SavedModel ({len(proto.meta_graphs)} meta graphs, no object "
                          "graph); convbn runs only TensorFlow 2 SavedModels (tf.saved_model.save, Keras' export)")
    for meta_graph in proto.meta_graphs:
        found = _foreign_op(meta_graph)
        if found is not None:
            op, where = found
            raise TargetError(f"{path}: a SavedModel whose {where} runs {op}, which is not tensor arithmetic; convbn "
                              "runs only SavedModels of tensor operations (no files, processes, network, Python or "
                              "resources): save the model as .keras or ONNX, or export it with convbn")


def read_savedmodel(path) -> Opened:
    """A SavedModel directory's serving function, once its graph is shown to be tensor arithmetic only."""
    check_savedmodel(path)
    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
    except Exception as e:  # noqa: BLE001  a damaged SavedModel fails in many ways
        raise TargetError(f"{path}: not a readable SavedModel ({_cut(e, 200)})") from None
    inputs = serve.structured_input_signature[1]
    outs = serve.structured_outputs if isinstance(serve.structured_outputs, dict) else {}
    shape, classes = check_signature(path, [_shape(s.shape) for s in inputs.values()],
                                     [_shape(o.shape) for o in outs.values()])
    (name, spec), = inputs.items()

    def run(x):  # the serving signature, which every SavedModel has (a `serve` method only Keras' export writes)
        return next(iter(serve(**{name: tf.constant(x)}).values())).numpy()  # a dict of its one output

    run.loaded = loaded  # the variables live as long as the object that loaded them
    return Opened("savedmodel", run, shape, classes, PIXELS_INPUT in (spec.name or ""), read_metadata(path))


READERS = {"keras": read_keras, "tflite": read_tflite, "onnx": read_onnx, "savedmodel": read_savedmodel}


def read(fmt: str, path, layout=None) -> Opened:
    """The model file at `path`, opened by its format's reader; what it says about its input (metadata) wins over
    its input's name. `layout`: an ONNX model's input layout (--layout) where its graph does not say."""
    opened = READERS[fmt](path, layout) if layout else READERS[fmt](path)
    if opened.about.get("input"):
        opened.takes_pixels = opened.about["input"] == "pixels"
    opened.predict = _one_row_each(path, opened.predict, opened.classes)
    return opened


def _one_row_each(path, predict, classes):
    """`predict`, held to what it declared: one row of `classes` finite-or-not scores per image it is given (a
    model whose output ignores the batch size, or is no array, is one line, not a traceback further on)."""

    def run(x):
        out = np.asarray(predict(x))
        if out.shape != (len(x), classes):
            raise TargetError(f"{path}: gave outputs of shape {out.shape} for {len(x)} images; convbn needs one row "
                              f"of {classes} scores per image")
        return out

    return run


# --------------------------------------------------------------------------- writers, one per format

def _onnx_converter():
    try:
        import tf2onnx
    except ImportError:
        raise ConvbnError("--format onnx needs tf2onnx and onnxruntime: pip install 'convbn[onnx]'") from None
    return tf2onnx


def write(model, fmt: str, path: Path, about: dict) -> None:
    """`model` as `fmt` at `path`, with `about` (class names, what the input is) inside it where the format has
    room: a member of the .keras archive, the SavedModel's manifest, the ONNX model's metadata."""
    if fmt == "keras":
        model.save(path)
        if about:
            write_keras_metadata(path, about)
    elif fmt == "savedmodel":
        model.export(str(path), format="tf_saved_model", verbose=False)
        write_manifest(path, about)  # also what --force may replace later: exactly these files
    elif fmt == "onnx":
        tf2onnx = _onnx_converter()
        spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=model.inputs[0].name),)
        fn = tf.function(lambda x: model(x, training=False))
        with quiet_native():
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET)
        if about:
            proto.metadata_props.add(key=METADATA_KEY, value=metadata_text(about))
        path.write_bytes(proto.SerializeToString())
    else:  # TFLite converts from a SavedModel, written beside the output (inside the staging directory)
        saved = path.parent / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        with quiet_native():  # the converter's MLIR passes print to fd 2
            data = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
        path.write_bytes(with_tflite_metadata(data, metadata_text(about)) if about else data)


def with_tflite_metadata(data: bytes, text: str) -> bytes:
    """The TFLite flatbuffer `data` with `text` as a metadata entry named METADATA_KEY: the Model table's list of
    named buffers, which the interpreter passes over but for names of its own. Written with the schema classes
    TensorFlow ships (tensorflow.lite.python.schema_py_generated) and flatbuffers, one of its dependencies: the
    TFLite converter has no way to add metadata itself, and tflite-support is not installed."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(data, 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(text.encode(), np.uint8)
    model.buffers = list(model.buffers or []) + [buffer]
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_KEY, len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    builder = flatbuffers.Builder(len(data) + len(text) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_metadata(data: bytes) -> dict:
    """{METADATA_KEY: text} of a TFLite flatbuffer that has convbn's entry, else {} (a file from elsewhere, or one
    whose tables do not parse: the interpreter has already verified the buffer it runs)."""
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == METADATA_KEY.encode():
                return {METADATA_KEY: model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode()}
    except Exception:  # noqa: BLE001  a damaged table fails in struct, IndexError, UnicodeDecodeError, ...
        return {}
    return {}
