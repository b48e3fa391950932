"""Small helpers over torch.fx shared by capture, analysis and the passes."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx, nn


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """Return the attribute at dotted path ``target`` below ``gm``."""
    value: Any = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value


def has_attr(gm: nn.Module, target: str) -> bool:
    try:
        fetch_attr(gm, target)
    except AttributeError:
        return False
    return True


def replace_submodule(gm: nn.Module, path: str, module: nn.Module | None) -> nn.Module | None:
    """Put ``module`` at ``path`` (removing it when ``None``) and return what was there.

    Missing parent containers are created as empty ``nn.Module`` objects, which is
    how ``ExportedProgram.module()`` lays out parameters.
    """
    parent_path, _, name = path.rpartition(".")
    parent: nn.Module = gm
    for part in parent_path.split(".") if parent_path else []:
        child = getattr(parent, part, None)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    previous = parent._modules.get(name)
    if module is None:
        parent._modules.pop(name, None)
    else:
        parent._modules[name] = module
    return previous


def node_module_path(node: fx.Node) -> str | None:
    """Return the path of the innermost module that produced ``node``, if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return _clean_path(path)


# The local or global that holds the compiled module in a Dynamo path:
# "L['self']", "L['args'][0]" (torch.compile of a module, torch 2.13), "G['model']".
_DYNAMO_ROOT = re.compile(r"^[LG]\['[^']*'\](?:\[\d+\])*\.?")


def _clean_path(path: str) -> str:
    # Dynamo records paths as "L['args'][0].model.layers[0].mlp"; export as
    # "model.layers.0.mlp". Both become the dotted form.
    path = _DYNAMO_ROOT.sub("", path, count=1)
    if path.startswith("self."):
        path = path[len("self."):]
    return path.replace("[", ".").replace("]", "").replace("'", "")


def node_shape(node: Any) -> tuple | None:
    """Return the shape recorded on ``node`` by export, Dynamo or shape propagation."""
    if not isinstance(node, fx.Node):
        return None
    # Export records "val"; Dynamo graphs, as a torch.compile backend sees them, "example_value".
    value = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    tensor_meta = node.meta.get("tensor_meta")
    if tensor_meta is not None and hasattr(tensor_meta, "shape"):
        return tuple(tensor_meta.shape)
    return None


def op_name(node: fx.Node) -> str:
    """Return a dialect-free name of the operation a node performs.

    ``aten.view.default``, ``torch.Tensor.view`` and ``x.view()`` all give ``"view"``,
    so that pattern matching works on export, Dynamo and symbolic-trace graphs alike.
    """
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_module":
        return "module"
    if node.op != "call_function":
        return node.op
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1].rstrip("_")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1].rstrip("_")
    name = getattr(target, "__name__", str(target))
    return name.rstrip("_")
