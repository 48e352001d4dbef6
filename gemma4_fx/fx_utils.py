"""FX graph helpers that the passes, the patterns and the runtime share: what a node is, what it stands for, what it
writes."""

from __future__ import annotations

import copy
import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

MATMULS = frozenset({"bmm", "matmul", "mm"})  # by `op_name`: torch.matmul, `a @ b`, x.bmm(y), aten.mm...
SDPA = frozenset({torch.nn.functional.scaled_dot_product_attention,  # Dynamo's graphs call it so; aten's, make_fx's
                  torch.ops.aten.scaled_dot_product_attention.default})
# Ops whose output may share storage with their first input (an in-place op on it would write through).
ALIASING = frozenset({"contiguous", "detach", "expand", "float", "getitem", "half", "bfloat16", "permute",
                      "reshape", "squeeze", "to", "transpose", "type_as", "unsqueeze", "view"})
_OPERATOR_IN_PLACE = {operator.iadd, operator.iand, operator.ifloordiv, operator.imul, operator.ior, operator.isub,
                      operator.itruediv, operator.setitem}


def op_name(node: torch.fx.Node) -> str:
    """`add` for `operator.add`, `torch.add`, `Tensor.add` and `aten.add.Tensor` alike."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._opname
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def node_calls(node, names) -> bool:
    """`node` is a node that calls one of the ops, methods or functions `names` (by `op_name`)."""
    return isinstance(node, torch.fx.Node) and node.op in ("call_method", "call_function") and op_name(node) in names


def method_name(node: torch.fx.Node) -> str | None:
    """The Tensor method a node calls (`x.item()`, or `torch.Tensor.item` called as a function), else None."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function" and getattr(node.target, "__objclass__", None) is torch.Tensor:
        return node.target.__name__
    return None


def is_op(node: torch.fx.Node, targets) -> bool:
    """The node calls one of `targets` (functions or Tensor methods, e.g. `torch.softmax`, `torch.Tensor.softmax`)."""
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and getattr(torch.Tensor, node.target, None) in targets


def qualified_name(target) -> str:
    """"ns::name" of an operator overload or packet ("aten::mm"), "" for anything else."""
    if isinstance(target, torch._ops.OpOverload):
        return target.name()
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return ""


def writes_in_place(node: torch.fx.Node) -> bool:
    """The op writes into its first argument (`x.add_`, `x *= y`, `cache.index_copy_`, `x[i] = y`, an op whose
    schema mutates)."""
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        return node.target in _OPERATOR_IN_PLACE
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    name = op_name(node)
    return node.op in ("call_function", "call_method") and name.endswith("_") and not name.endswith("__")


def viewed(node):
    """`node` and the tensors it is a view of (through `ALIASING` ops), nearest first."""
    while isinstance(node, torch.fx.Node):
        yield node
        node = node.args[0] if op_name(node) in ALIASING and node.args else None


def written_in_place(nodes) -> set[torch.fx.Node]:
    """The nodes whose tensors an in-place op among `nodes` writes, directly or through views."""
    return {base for node in nodes if writes_in_place(node) and node.args for base in viewed(node.args[0])}


def value(arg):
    """The FakeTensor (or SymInt, tuple...) a node stands for (Dynamo's `example_value`, else the `val` that
    make_fx and AOT graphs carry); a plain Python value stands for itself."""
    return arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, torch.fx.Node) else arg


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of `gm`'s graph (the same attributes; nodes' meta copied shallowly), for a pass to
    rewrite while `gm` stays as traced."""
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    copied.meta = dict(gm.meta)
    return copied


def needs_grad(*args) -> bool:
    """Autograd tracks one of the tensors these nodes stand for: a rewrite into an op without a backward would fail
    the backward (Dynamo's example values carry `requires_grad` as the traced grad mode left it)."""
    return any(isinstance(v := value(arg), torch.Tensor) and v.requires_grad for arg in args)


def on_host(val) -> bool:
    """Not a tensor, or a CPU tensor: the host computes it."""
    return not isinstance(val, torch.Tensor) or val.device.type == "cpu"


def same(a, b) -> bool:
    """a == b provably, for ints and SymInts (no guard is added)."""
    return statically_known_true(a == b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def op_names(argument: str, names) -> tuple[str, ...]:
    """`names` as a tuple of "ns::name" op names (an option naming an engine's ops), or a clear error naming
    `argument`."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.count("::") == 1
                                                        and all(n.split("::")) for n in names):
        raise ValueError(f'{argument}: expected a sequence of op names like "ns::name", got {names!r}')
    return tuple(names)


def find_op(name: str) -> torch._ops.OpOverloadPacket | None:
    """The op registered as "ns::name", or None where nothing registered it (the engine is not loaded)."""
    namespace, op = name.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return None


def calls(graph: torch.fx.Graph, name: str) -> bool:
    """`graph` calls the op registered as "ns::name" (any overload)."""
    op = find_op(name)
    return op is not None and any(graph.find_nodes(op="call_function", target=getattr(op, overload))
                                  for overload in op.overloads())
