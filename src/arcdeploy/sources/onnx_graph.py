"""Reading and rewriting a foreign ONNX graph: the pieces :mod:`.onnx_model` builds on.

- constants (initializers and ``Constant`` nodes), who produces and who consumes a
  tensor, which tensors depend on the image input;
- the affine normalisation a graph applies to its input before the first real layer
  (a chain of ``Sub``/``Add``/``Mul``/``Div`` by scalar or per-channel constants);
- whether the output is L2-normalised by the graph itself;
- making a batch axis really dynamic: shape constants that carry the traced batch
  (``Reshape``; ``Expand``/``Tile``/``ConstantOfShape`` of constant data) take the
  batch from the input's shape instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..manifest import format_norm, norm_value

# nodes the input normalisation may pass through without changing pixel values' meaning
PASS_THROUGH = ("Identity", "Cast", "Transpose")
# how a constant's value may reach the norm in an L2 normalisation (eps clamps, broadcasts)
NORM_WRAPPERS = ("Clip", "Max", "Add", "Expand", "Unsqueeze", "Identity", "Cast", "Reshape")
# shape-preserving nodes that may follow a normalisation before the output
OUTPUT_WRAPPERS = ("Identity", "Flatten", "Reshape", "Squeeze", "Cast")
BATCH_SHAPE_OPS = ("Reshape", "Expand", "Tile", "ConstantOfShape")


# ------------------------------------------------------------------ graph facts


def constant_values(graph) -> dict[str, np.ndarray]:
    """Every tensor whose value is known without running the graph: initializers and ``Constant`` outputs."""
    from onnx import helper, numpy_helper

    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or not node.attribute:
            continue
        attr = node.attribute[0]
        if attr.name == "value":
            out[node.output[0]] = numpy_helper.to_array(attr.t)
        elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            out[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
    return out


def producers(graph) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph) -> dict[str, list]:
    cons: dict[str, list] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                cons.setdefault(name, []).append(node)
    return cons


def _subgraph_inputs(node) -> set[str]:
    """Names a node's subgraphs (If / Loop / Scan bodies) read from the enclosing graph."""
    from onnx import AttributeProto

    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names.update(_subgraph_inputs(n))
    return names


def used_names(graph) -> set[str]:
    """Tensor names some node (or subgraph) reads, plus the graph outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(i for i in node.input if i)
        names.update(_subgraph_inputs(node))
    return names


def dependent_tensors(graph, start: str) -> set[str]:
    """Tensors computed from ``start`` (nodes are in topological order, as ONNX requires)."""
    dep = {start}
    for node in graph.node:
        if any(i in dep for i in node.input) or (_subgraph_inputs(node) & dep):
            dep.update(o for o in node.output if o)
    return dep


def tensor_dims(value_info) -> list:
    """[int | str | None] of a graph input/output: a fixed size, a named dimension, or unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


# ------------------------------------------------------------------ input normalisation


@dataclass
class AffineChain:
    """What the graph does to its input before the first real layer: ``scale * x + offset`` per channel."""

    scale: np.ndarray = field(default_factory=lambda: np.ones(3))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))
    steps: list[str] = field(default_factory=list)  # "Sub 'name' 127.5", ...
    passed: list[str] = field(default_factory=list)  # pass-through nodes on the way
    stopped_at: str = ""  # the first node that is not part of it
    irregular: str = ""  # arithmetic on the input that is not per-channel

    @property
    def found(self) -> bool:
        return bool(self.steps) and not (np.allclose(self.scale, 1.0) and np.allclose(self.offset, 0.0))

    @property
    def mean(self) -> np.ndarray:
        return -self.offset / self.scale

    @property
    def std(self) -> np.ndarray:
        return 1.0 / self.scale

    def maps_pixels_to_normalised_range(self) -> bool:
        """True when 0..255 pixels come out in a range a network is trained on (|y| <= 10, a span >= 0.1):
        the graph takes raw pixels. A chain for [0, 1] inputs (``(x - 0.5) / 0.5``) does not."""
        lo = np.minimum(self.offset, 255.0 * self.scale + self.offset)
        hi = np.maximum(self.offset, 255.0 * self.scale + self.offset)
        return bool(np.all(np.abs(lo) <= 10) and np.all(np.abs(hi) <= 10) and np.all(hi - lo >= 0.1))


def per_channel(value: np.ndarray, channels: int = 3) -> np.ndarray | None:
    """A scalar or a per-channel constant ([3], [1,3,1,1], [1,1,1,3], ...) as ``channels`` values; else None."""
    arr = np.asarray(value, np.float64)
    if arr.size == 1:
        return np.full(channels, float(arr.reshape(-1)[0]))
    if arr.size == channels and sum(1 for d in arr.shape if d != 1) == 1:
        return arr.reshape(channels)
    return None


def read_input_affine(graph, input_name: str, consts: dict[str, np.ndarray]) -> AffineChain:
    """Follow the input through leading Sub/Add/Mul/Div by constants (and Identity/Cast/Transpose)."""
    cons = consumers(graph)
    chain = AffineChain()
    cur = input_name
    while True:
        users = cons.get(cur, [])
        if len(users) != 1:
            chain.stopped_at = f"{len(users)} nodes read '{cur}'" if users else f"nothing reads '{cur}'"
            return chain
        node = users[0]
        where = f"{node.op_type} '{node.name}'"
        if node.op_type in PASS_THROUGH:
            chain.passed.append(where)
            cur = node.output[0]
            continue
        if node.op_type not in ("Sub", "Add", "Mul", "Div") or len(node.input) != 2 or node.input[0] == node.input[1]:
            chain.stopped_at = where
            return chain
        first = node.input[0] == cur
        other = node.input[1] if first else node.input[0]
        if other not in consts:
            chain.stopped_at = where
            return chain
        v = per_channel(consts[other])
        if v is None:
            chain.irregular = f"{where} by a constant of shape {list(np.shape(consts[other]))}"
            chain.stopped_at = where
            return chain
        a, b = chain.scale, chain.offset
        if node.op_type == "Add":
            b = b + v
        elif node.op_type == "Sub":
            a, b = (a, b - v) if first else (-a, v - b)
        elif node.op_type == "Mul":
            a, b = a * v, b * v
        elif first and np.all(v != 0):  # Div by a constant
            a, b = a / v, b / v
        else:
            chain.stopped_at = where
            return chain
        chain.scale, chain.offset = a, b
        chain.steps.append(f"{where} {format_norm(norm_value(v, 9))}")
        cur = node.output[0]


def insightface_router_rule(graph) -> str:
    """What insightface's ArcFaceONNX concludes from the names of the first 8 nodes (for the record)."""
    names = [n.name for n in graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    if sub and mul:
        return "raw 0..255 pixels (mean 0, std 1): Sub and Mul among the first 8 node names"
    return "(x - 127.5) / 127.5: no Sub and Mul among the first 8 node names"


# ------------------------------------------------------------------ output normalisation


def _is_l2_norm_of(name: str, x: str, prods: dict, consts: dict, depth: int = 0) -> bool:
    node = prods.get(name)
    if node is None or depth > 8:
        return False
    op = node.op_type
    if op == "ReduceL2":
        return node.input[0] == x
    if op == "Sqrt":
        inner = prods.get(node.input[0])
        if inner is None:
            return False
        if inner.op_type == "ReduceSumSquare":
            return inner.input[0] == x
        if inner.op_type == "ReduceSum":
            sq = prods.get(inner.input[0])
            if sq is None:
                return False
            if sq.op_type == "Mul":
                return list(sq.input) == [x, x]
            if sq.op_type == "Pow" and sq.input[0] == x and sq.input[1] in consts:
                return bool(np.allclose(consts[sq.input[1]], 2.0))
        return _is_l2_norm_of(node.input[0], x, prods, consts, depth + 1) if inner.op_type in NORM_WRAPPERS else False
    if op in ("Max", "Add"):  # an eps floor: the operand that is not a constant
        operands = [i for i in node.input[:2] if i and i not in consts]
        return len(operands) == 1 and _is_l2_norm_of(operands[0], x, prods, consts, depth + 1)
    if op in NORM_WRAPPERS:  # Clip, Expand, Unsqueeze, Reshape, ...: the data is the first input
        return _is_l2_norm_of(node.input[0], x, prods, consts, depth + 1)
    return False


def find_l2_normalization(graph, output_name: str, consts: dict[str, np.ndarray]) -> str | None:
    """The node that L2-normalises the output, described; None when the graph ends otherwise."""
    from onnx import helper

    prods = producers(graph)
    node = prods.get(output_name)
    while node is not None and node.op_type in OUTPUT_WRAPPERS:
        node = prods.get(node.input[0])
    if node is None:
        return None
    where = f"{node.op_type} '{node.name}'"
    if node.op_type == "LpNormalization":
        p = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "p"), 2)
        return f"{where} (p=2)" if p == 2 else None
    if node.op_type == "Div" and _is_l2_norm_of(node.input[1], node.input[0], prods, consts):
        return f"{where}: the output divided by its L2 norm"
    if node.op_type == "Mul":
        for x, r in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            rp = prods.get(r)
            if rp is not None and rp.op_type == "Reciprocal" and _is_l2_norm_of(rp.input[0], x, prods, consts):
                return f"{where}: the output times the reciprocal of its L2 norm"
    return None


# ------------------------------------------------------------------ dynamic batch


def traced_batch_guess(graph, input_name: str, consts: dict[str, np.ndarray]) -> int:
    """The batch a graph with a renamed batch axis was traced at: the leading value its Reshape
    constants on the image path agree on (1 when they do not agree or there are none)."""
    dep = dependent_tensors(graph, input_name)
    leads = set()
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[0] in dep and node.input[1] in consts:
            s = np.asarray(consts[node.input[1]]).reshape(-1)
            if s.size and s[0] > 0:
                leads.add(int(s[0]))
    return leads.pop() if len(leads) == 1 else 1


def fold_value(model, name: str, dep: set[str]) -> np.ndarray | None:
    """The value of ``name`` when constants alone compute it (a shape built by Where / ConstantOfShape /
    Concat from constants, as tracers emit for ``expand(n, -1)``), by onnx's reference evaluator; else None."""
    from onnx import AttributeProto, helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    prods = producers(graph)
    inits = {i.name: i for i in graph.initializer}
    nodes: dict[str, object] = {}
    used_inits: set[str] = set()
    stack = [name]
    while stack:
        n = stack.pop()
        if n in inits:
            used_inits.add(n)
            continue
        node = prods.get(n)
        if node is None or n in dep:
            return None
        if node.name + "|" + node.output[0] in nodes:
            continue
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            return None
        nodes[node.name + "|" + node.output[0]] = node
        stack.extend(i for i in node.input if i)
    order = [n for n in graph.node if n.name + "|" + n.output[0] in nodes]
    sub = helper.make_graph(
        order, "fold", [], [helper.make_empty_tensor_value_info(name)], [inits[key] for key in sorted(used_inits)]
    )
    try:
        outputs: list[Any] = list(
            ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})
        )
        value = outputs[0]
    except Exception:
        return None
    return np.asarray(value)


def prune_dead_nodes(graph) -> None:
    """Remove nodes (and initializers) whose outputs nothing reads any more."""
    while True:
        used = used_names(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = used_names(graph)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def make_batch_dynamic(model, input_name: str, traced: int, kinds: tuple[str, ...]) -> list[str]:
    """Rewrite the shape constants of ``kinds`` nodes whose first entry is the traced batch so that
    they follow the input's batch. Returns one line per rewrite (empty: nothing to rewrite)."""
    rewriter = _BatchRewriter(model, input_name, traced)
    for node in model.graph.node:
        if node.op_type in kinds:
            rewriter.rewrite(node)
    rewriter.finish()
    return rewriter.rewrites


class _BatchRewriter:
    """The rewrites of one graph: new shape constants, and the Shape -> Gather of the input's batch
    (made once, placed first) that shapes which cannot take -1 are concatenated from."""

    def __init__(self, model, input_name: str, traced: int):
        graph = model.graph
        self.model, self.graph, self.input_name, self.traced = model, graph, input_name, traced
        self.consts = constant_values(graph)
        self.dep = dependent_tensors(graph, input_name)
        self.taken = (
            {i.name for i in graph.initializer}
            | {o for n in graph.node for o in n.output}
            | {i.name for i in graph.input}
        )
        self.rewrites: list[str] = []
        self.front: list = []
        self.before: dict[tuple, list] = {}  # a node's outputs -> nodes to insert before it
        self.batch_name: str | None = None
        self.replaced: set[str] = set()

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def batch_tensor(self) -> str:
        from onnx import helper, numpy_helper

        if self.batch_name is None:
            shape, index = self.fresh("arcdeploy/input_shape"), self.fresh("arcdeploy/zero")
            out = self.fresh("arcdeploy/batch")
            self.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), index))
            self.front.append(helper.make_node("Shape", [self.input_name], [shape], name=shape))
            self.front.append(helper.make_node("Gather", [shape, index], [out], name=out, axis=0))
            self.batch_name = out
        return self.batch_name

    def _shape_input(self, node) -> tuple[int, np.ndarray, str] | None:
        """(the input slot, its value, "constant" or how it was computed) of a node to rewrite; None
        when the node does not take a shape that starts with the traced batch."""
        op = node.op_type
        if op == "Reshape":
            slot, wanted = 1, len(node.input) > 1 and node.input[0] in self.dep
        elif op in ("Expand", "Tile"):
            slot, wanted = 1, len(node.input) > 1 and node.input[0] not in self.dep  # a constant grown to the batch
        else:  # ConstantOfShape
            slot, wanted = 0, True
        if not wanted:
            return None
        kind = "constant"
        if node.input[slot] not in self.consts:
            value = fold_value(self.model, node.input[slot], self.dep)
            if value is None:
                return None
            self.consts[node.input[slot]] = value
            kind = "(computed from constants)"
        s = np.asarray(self.consts[node.input[slot]]).astype(np.int64).reshape(-1)
        if s.size == 0 or int(s[0]) != self.traced:
            return None
        return slot, s, kind

    def rewrite(self, node) -> None:
        from onnx import helper, numpy_helper

        found = self._shape_input(node)
        if found is None:
            return
        slot, s, kind = found
        op, label = node.op_type, f"{node.op_type} '{node.name}'"
        if op == "Reshape" and -1 not in s[1:].tolist():
            new = s.copy()
            new[0] = -1
            name = self.fresh(f"{node.input[slot]}/dynamic_batch")
            self.graph.initializer.append(numpy_helper.from_array(new, name))
            self.rewrites.append(f"{label}: shape {kind} {s.tolist()} -> {new.tolist()}")
        else:
            rest = self.fresh(f"{node.input[slot]}/after_batch")
            name = self.fresh(f"{node.input[slot]}/dynamic_batch")
            self.graph.initializer.append(numpy_helper.from_array(s[1:], rest))
            self.before.setdefault(tuple(node.output), []).append(
                helper.make_node("Concat", [self.batch_tensor(), rest], [name], name=name, axis=0)
            )
            self.rewrites.append(
                f"{label}: {'repeats' if op == 'Tile' else 'shape'} {kind} {s.tolist()} -> "
                f"[batch, {', '.join(str(v) for v in s[1:].tolist())}] (batch from the input's shape)"
            )
        self.replaced.add(node.input[slot])
        node.input[slot] = name

    def finish(self) -> None:
        """Insert the new nodes where they belong and drop what the rewrites replaced."""
        graph = self.graph
        if self.front or self.before:
            nodes = list(graph.node)
            del graph.node[:]
            graph.node.extend(self.front)
            for node in nodes:
                graph.node.extend(self.before.get(tuple(node.output), []))
                graph.node.append(node)
        if self.replaced:
            prune_dead_nodes(graph)  # the constants (and constant subgraphs) the rewrites replaced


def set_batch_dim(value_info, name: str = "batch") -> None:
    """Make dimension 0 of a graph input/output the named (dynamic) dimension ``name``."""
    dims = value_info.type.tensor_type.shape.dim
    if len(dims):
        dims[0].Clear()
        dims[0].dim_param = name


def constant_inputs(node, consts: dict[str, np.ndarray]) -> list[str]:
    """A node's small integer constant inputs, described (for error messages)."""
    out = []
    for i in node.input[1:]:
        if i in consts and np.asarray(consts[i]).size <= 8 and np.issubdtype(np.asarray(consts[i]).dtype, np.integer):
            out.append(str(np.asarray(consts[i]).reshape(-1).tolist()))
    return out


def dequantized(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """What ``DequantizeLinear`` computes: ``(x - zero_point) * scale`` in float32, per tensor, per
    ``axis`` (a 1-D scale), or per block of ``block`` elements along ``axis`` (a scale of x's rank)."""
    xf = x.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.float32) if zero_point is None else zero_point.astype(np.float32)
    scale = scale.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return ((xf - zp.reshape(())) * scale.reshape(())).astype(np.float32)
    axis = axis % x.ndim
    if block:
        # each scale covers ``block`` consecutive elements along the axis (the last block may be short)
        scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        zp = np.repeat(zp, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        return ((xf - zp) * scale).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = -1
    return ((xf - zp.reshape(shape)) * scale.reshape(shape)).astype(np.float32)


def fold_weight_dequantization(model) -> list[str]:
    """Weight-only quantized graphs (int8 / int4 weights, ``DequantizeLinear`` on constants, the
    per-block form of OpenCV Zoo's ``*_int8bq`` files included) rewritten with the float weights
    those nodes compute, as initializers: the same numbers, in a graph every engine converts.
    Returns the names of the nodes folded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = constant_values(graph)
    folded: list[str] = []
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or not all(name in consts for name in node.input if name):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, scale = consts[node.input[0]], consts[node.input[1]]
        zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        value = dequantized(x, scale, zero, int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        graph.node.remove(node)
        folded.append(node.name or node.output[0])
    if folded:
        prune_dead_nodes(graph)
    return folded
