"""Which ops of a Dynamo FX graph are row-local: row i of the output needs only row i of some inputs.

A "row" is one index along one dim of a tensor (the token dim, for the YOCO pass). For an op whose output rows
are selected, `arg_rows(node, dim)` says which inputs must then be selected too, and along which of their dims;
the other inputs are used whole (weights, the keys and values of an attention, broadcast operands). It answers
None where rows interact (a reduction or a concatenation over the row dim, a sort, a view that merges the row dim
with another, an op it does not know): the caller must then keep all rows of that op's output.

Ops are classified by what they compute (broadcasting, reduced dims, contraction dims, index dims), from the
FakeTensors that Dynamo stores in `node.meta["example_value"]`, so sizes may be symbolic.
"""

from __future__ import annotations

import torch

from ..fx_utils import MATMULS, op_name, same, value

# Keys name an argument of a node: ("attn_mask",) a keyword, (1,) a positional one, (0, 2) the third tensor of a
# list passed first (torch.cat).
ArgKey = tuple

_ELEMENTWISE = {
    "abs", "add", "add_", "and_", "bfloat16", "clamp", "clamp_", "clone", "contiguous", "cos", "detach", "div",
    "div_", "dropout", "eq", "erf", "exp", "float", "floordiv", "ge", "gelu", "gt", "half", "iadd", "imul", "invert",
    "isub", "itruediv", "le", "log", "logical_and", "logical_not", "logical_or", "lt", "masked_fill", "masked_fill_",
    "maximum", "minimum", "mul", "mul_", "ne", "neg", "or_", "pow", "reciprocal", "relu", "rsqrt", "sigmoid", "silu",
    "sin", "softplus", "sqrt", "square", "sub", "sub_", "tanh", "truediv", "where",
}
# Dtype-only operands: `x.type_as(other)`, `x.to(other)` read only other's dtype and device.
_DTYPE_SOURCE = {"type_as", "to"}
_REDUCTIONS = {"amax", "amin", "any", "all", "argmax", "argmin", "logsumexp", "mean", "std", "sum", "var"}
_ALONG_DIM = {"argsort", "cumprod", "cumsum", "log_softmax", "softmax", "sort", "topk"}  # keep the rank
_SPLITS = {"chunk", "split"}
_RESHAPES = {"reshape", "view"}

_RULES: dict[str, object] = {}


def rows_rule(*names: str):
    """Register the function that says, for an op named one of `names` (`fx_utils.op_name`), which arguments follow
    its selected output rows: `rule(node, dim) -> {argument key: dim} | None`. Adding an op is one rule."""

    def register(rule):
        for name in names:
            if name in _RULES:
                raise ValueError(f"rows_rule: {name!r} already has a rule ({_RULES[name].__name__})")
            _RULES[name] = rule
        return rule

    return register


def argument(node: torch.fx.Node, key: ArgKey):
    container = node.kwargs if isinstance(key[0], str) else node.args
    if not isinstance(key[0], str) and key[0] >= len(container):
        return None
    if isinstance(key[0], str) and key[0] not in container:
        return None
    arg = container[key[0]]
    for index in key[1:]:
        arg = arg[index]
    return arg


def replace_arguments(node: torch.fx.Node, replacements: dict[ArgKey, object]) -> tuple[tuple, dict]:
    """`node`'s (args, kwargs) with the arguments at `replacements`' keys swapped."""
    args, kwargs = [list(a) if isinstance(a, (list, tuple)) else a for a in node.args], dict(node.kwargs)
    for key, new in replacements.items():
        if isinstance(key[0], str):
            if len(key) == 1:
                kwargs[key[0]] = new
            else:
                kwargs[key[0]] = list(kwargs[key[0]])
                kwargs[key[0]][key[1]] = new
        elif len(key) == 1:
            args[key[0]] = new
        else:
            args[key[0]][key[1]] = new
    args = [type(old)(new) if isinstance(old, (list, tuple)) else new for old, new in zip(node.args, args)]
    kwargs = {k: type(node.kwargs[k])(v) if isinstance(node.kwargs[k], (list, tuple)) else v for k, v in kwargs.items()}
    return tuple(args), kwargs


def node_arguments(node: torch.fx.Node):
    """(key, node) of every argument that is a node, one level into lists."""
    for position, arg in [*enumerate(node.args), *node.kwargs.items()]:
        items = enumerate(arg) if isinstance(arg, (list, tuple)) else [(None, arg)]
        for index, item in items:
            if isinstance(item, torch.fx.Node):
                yield ((position,) if index is None else (position, index)), item


def _tensor_args(node: torch.fx.Node):
    return [(key, arg) for key, arg in node_arguments(node) if isinstance(value(arg), torch.Tensor)]


def is_causal(node: torch.fx.Node):
    """scaled_dot_product_attention's `is_causal` (a bool, or a node if Dynamo left it symbolic)."""
    return node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)


def _broadcast_rows(node, operands, dim: int):
    """Rows of broadcasting `operands` (key, node) feeding output dim `dim`: an operand with that dim of the output's
    size is selected, one where it is missing or 1 is used whole; any other size cannot be split."""
    out = value(node)
    rank, rows = out.dim(), {}
    for key, arg in operands:
        val = value(arg)
        arg_dim = dim + val.dim() - rank
        if arg_dim < 0 or same(val.shape[arg_dim], 1):
            continue
        if not same(val.shape[arg_dim], out.shape[dim]):
            return None
        rows[key] = arg_dim
    return rows


def _dims(arg, rank: int) -> list[int] | None:
    if isinstance(arg, int):
        return [arg % rank]
    if isinstance(arg, (list, tuple)) and all(isinstance(d, int) for d in arg):
        return [d % rank for d in arg]
    return None


def _dim_argument(node: torch.fx.Node, position: int, default=None):
    arg = node.kwargs.get("dim", node.args[position] if len(node.args) > position else default)
    return _dims(arg, value(node.args[0]).dim()) if arg is not None else None


def _keepdim(node: torch.fx.Node) -> bool:
    return bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))


@rows_rule(*_REDUCTIONS, *_ALONG_DIM)
def _reduction_rows(node, dim: int):
    name, rank = op_name(node), value(node.args[0]).dim()
    if name in _ALONG_DIM:
        dims = _dim_argument(node, 2 if name == "topk" else 1, -1 if name in ("topk", "sort", "argsort") else None)
        return {(0,): dim} if dims is not None and dim not in dims else None
    dims = _dim_argument(node, 1)
    if dims is None:
        return None
    if not _keepdim(node):
        dim = [d for d in range(rank) if d not in dims][dim]
    return {(0,): dim} if dim not in dims else None


def _shape_argument(node: torch.fx.Node) -> tuple[ArgKey, list] | None:
    """(key of the first size, the sizes) of `view`/`reshape`/`expand`, whichever way they were passed."""
    if "size" in node.kwargs or "shape" in node.kwargs:
        name = "size" if "size" in node.kwargs else "shape"
        return (name,), list(node.kwargs[name])
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.Size)):
        return (1,), list(node.args[1])
    return None, list(node.args[1:])


def size_argument(node: torch.fx.Node, dim: int) -> ArgKey | None:
    """Key of the argument that spells out output dim `dim`'s size (view, reshape, expand), None if none does
    (or it is -1, which the op infers)."""
    if op_name(node) not in _RESHAPES | {"expand"}:
        return None
    key, sizes = _shape_argument(node)
    if isinstance(sizes[dim], int) and sizes[dim] == -1:
        return None
    return (key[0], dim) if key is not None else (1 + dim,)


@rows_rule(*_RESHAPES)
def _reshape_rows(node, dim: int):
    """A reshape keeps the row dim when that dim exists, whole, in the input at the same element offset."""
    source, out = value(node.args[0]).shape, value(node).shape
    before = 1
    for size in out[:dim]:
        before = before * size
    prefix = 1
    for source_dim, size in enumerate(source):
        if same(prefix, before) and same(size, out[dim]):
            return {(0,): source_dim}
        prefix = prefix * size
    return None


@rows_rule("getitem")
def _getitem_rows(node, dim: int):
    source, index = node.args
    if isinstance(value(source), (tuple, list)):  # one result of a multi-output op (topk, chunk)
        return {(0,): dim}
    if isinstance(index, torch.fx.Node) and isinstance(value(index), torch.Tensor):  # x[indices]: a lookup
        index_rank = value(index).dim()
        return {(1,): dim} if dim < index_rank else {(0,): dim - index_rank + 1}
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(item, torch.fx.Node) and isinstance(value(item), torch.Tensor) for item in items):
        return None  # mixed advanced indexing
    if Ellipsis in items:
        at = items.index(Ellipsis)
        consumed = sum(item is not None for item in items if item is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (value(source).dim() - consumed)
    source_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if isinstance(item, slice):
            if out_dim == dim:
                return {(0,): source_dim} if item == slice(None) else None
            out_dim += 1
        source_dim += 1
    return {(0,): source_dim + dim - out_dim} if dim >= out_dim else None


@rows_rule("scaled_dot_product_attention")
def _attention_rows(node, dim: int):
    """scaled_dot_product_attention: query rows are independent given whole keys and values; the mask's query
    dim follows the query. (`is_causal` ties query i to key i: the caller turns it into a mask of the kept rows.)"""
    rank = value(node).dim()
    dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    if dim != rank - 2 or dropout != 0.0 or not isinstance(is_causal(node), bool):
        return None
    rows = {(0,): value(node.args[0]).dim() - 2}
    mask_key = ("attn_mask",) if "attn_mask" in node.kwargs else (3,)
    mask = argument(node, mask_key)
    if isinstance(mask, torch.fx.Node):
        mask_rows = _broadcast_rows(node, [(mask_key, mask)], dim)
        if mask_rows is None:
            return None
        rows.update(mask_rows)
    return rows


@rows_rule(*MATMULS)
def _matmul_rows(node, dim: int):
    a, b = node.args[:2]
    rank = value(node).dim()
    if value(a).dim() < 2 or value(b).dim() < 2:
        return None
    if dim == rank - 2:
        return {(0,): value(a).dim() - 2}
    if dim < rank - 2:  # a batch dim: both operands broadcast over it
        return _broadcast_rows(node, [((0,), a), ((1,), b)], dim)
    return None


def arg_rows(node: torch.fx.Node, dim: int) -> dict[ArgKey, int] | None:
    """For output rows selected along `dim`: {argument key: dim of that argument to select along}; arguments not
    named are used whole. None if rows of this op interact (or no rule knows the op)."""
    if node.op not in ("call_function", "call_method") or not isinstance(value(node), (torch.Tensor, tuple, list)):
        return None
    if isinstance(value(node), torch.Tensor) and value(node).dim() <= dim:
        return None
    rule = _RULES.get(op_name(node))
    return rule(node, dim) if rule is not None else None


@rows_rule(*_DTYPE_SOURCE)
def _dtype_source_rows(node, dim: int):
    rows = _broadcast_rows(node, [((0,), node.args[0])], dim)
    for key, arg in _tensor_args(node):
        if key != (0,) and rows is not None and _broadcast_rows(node, [(key, arg)], dim) == {key: dim}:
            rows[key] = dim  # same shape: select it too, so the whole-size tensor is not kept alive for a dtype
    return rows


@rows_rule(*_ELEMENTWISE)
def _elementwise_rows(node, dim: int):
    return _broadcast_rows(node, _tensor_args(node), dim)


@rows_rule("layer_norm", "rms_norm")
def _norm_rows(node, dim: int):
    """Normalise over the trailing `normalized_shape` dims (an op of that name taking no shape is an engine's own,
    unknown here)."""
    shape = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(shape, (list, tuple, torch.Size)):
        return None
    return {(0,): dim} if dim < value(node).dim() - len(shape) else None


@rows_rule("linear")
def _linear_rows(node, dim: int):
    return {(0,): dim} if dim < value(node).dim() - 1 else None


@rows_rule("moe_experts_loop")
def _experts_loop_rows(node, dim: int):
    """transformers' eager experts loop as one op (`patterns/moe_experts.py`): a token's output needs its own row of
    x, of the expert ids and of the routing weights (the loop's sort is inside the op, unlike the grouped form's)."""
    return {(0,): 0, (1,): 0, (2,): 0} if dim == 0 else None


@rows_rule("embedding")
def _embedding_rows(node, dim: int):
    return {(0,): dim} if dim < value(node.args[0]).dim() else None


@rows_rule("expand")
def _expand_rows(node, dim: int):
    source = value(node.args[0])
    source_dim = dim + source.dim() - value(node).dim()
    return {(0,): source_dim} if source_dim >= 0 and same(source.shape[source_dim], value(node).shape[dim]) else None


@rows_rule("unsqueeze")
def _unsqueeze_rows(node, dim: int):
    at = node.args[1] % value(node).dim()
    return None if at == dim else {(0,): dim - (at < dim)}


@rows_rule("squeeze")
def _squeeze_rows(node, dim: int):
    if len(node.args) < 2 or not isinstance(node.args[1], int):
        return None
    at = node.args[1] % value(node.args[0]).dim()
    if not same(value(node.args[0]).shape[at], 1):
        return {(0,): dim}
    return {(0,): dim + (at <= dim)}


@rows_rule("transpose", "swapaxes")
def _transpose_rows(node, dim: int):
    rank = value(node).dim()
    a, b = node.args[1] % rank, node.args[2] % rank
    return {(0,): {a: b, b: a}.get(dim, dim)}


@rows_rule("permute")
def _permute_rows(node, dim: int):
    order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return {(0,): order[dim] % value(node).dim()}


@rows_rule("cat")
def _cat_rows(node, dim: int):
    cat_dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % value(node).dim()
    if cat_dim == dim:
        return None
    return {key: dim for key, _ in _tensor_args(node) if key[0] == 0}


@rows_rule(*_SPLITS)
def _split_rows(node, dim: int):
    split_dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % value(node.args[0]).dim()
    return {(0,): dim} if split_dim != dim else None


@rows_rule("unflatten")
def _unflatten_rows(node, dim: int):
    """Splitting one dim into several keeps every other dim (`x.unflatten(-1, (heads, head_dim))`)."""
    at = _dim_argument(node, 1)
    sizes = node.kwargs.get("sizes", node.args[2] if len(node.args) > 2 else None)
    if at is None or sizes is None:
        return None
    at, added = at[0], len(sizes) - 1
    if dim < at:
        return {(0,): dim}
    return {(0,): dim - added} if dim > at + added else None


@rows_rule("flatten")
def _flatten_rows(node, dim: int):
    """Merging dims start..end keeps every other dim (`x.flatten(-2, -1)`)."""
    rank = value(node.args[0]).dim()
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0) % rank
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1) % rank
    if dim < start:
        return {(0,): dim}
    return {(0,): dim + end - start} if dim > start else None
