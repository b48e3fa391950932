"""Read stateless submodules such as ``nn.GELU`` as the functions they apply.

``torch.fx.symbolic_trace`` keeps every submodule call as a ``call_module`` node, so
an activation written as ``nn.GELU()`` or a softmax written as ``nn.Softmax()``
would otherwise hide from the MLP and attention patterns. Export and Dynamo graphs
already call the functions themselves.
"""

from __future__ import annotations

from torch import fx, nn

from .._fx_utils import op_name

_FUNCTION_OF_MODULE: dict[type[nn.Module], str] = {
    nn.GELU: "gelu", nn.SiLU: "silu", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
    nn.Mish: "mish", nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.LeakyReLU: "leaky_relu",
    nn.Softplus: "softplus", nn.GLU: "glu", nn.Softmax: "softmax", nn.Dropout: "dropout",
    nn.Identity: "alias", nn.Flatten: "flatten", nn.Unflatten: "unflatten",
}


def op_kind(node: fx.Node) -> str:
    """Return :func:`op_name` of ``node``, reading a stateless submodule call as its function."""
    name = op_name(node)
    if name != "module" or node.graph.owning_module is None:
        return name
    try:
        module = node.graph.owning_module.get_submodule(node.target)
    except AttributeError:
        return name
    for cls in type(module).__mro__:
        if cls in _FUNCTION_OF_MODULE:
            return _FUNCTION_OF_MODULE[cls]
    return name
