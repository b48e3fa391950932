"""Name the towers of a model: the vision encoder and the language model of a multimodal model.

A *tower* is one stack of repeated blocks with the modules around it. Its name
comes from the stack's prefix:

1. A prefix with a part ``visual``, ``vision``, ``vision_model`` or
   ``vision_tower`` names the ``"vision"`` tower. A part ``audio`` or
   ``audio_tower`` names ``"audio"``, and ``language_model`` or ``text_model``
   names ``"text"``.
2. When a vision or audio tower exists and exactly one other stack is left
   unnamed, that stack is the language model: ``"text"``.
3. Every other stack, and any stack whose name would repeat, is named by its prefix
   (``model.layers`` for a Llama), so a text-only model keeps the names it had.

For Qwen2.5-VL, ``model.visual.blocks`` is ``"vision"`` and
``model.language_model.layers`` is ``"text"``.

A linear layer outside every stack belongs to the tower whose stack shares its
parent module (``model.visual.merger.mlp.0`` lies under ``model.visual``, the
parent of ``model.visual.blocks``), or to no tower (``lm_head``).
"""

from __future__ import annotations

_KEYWORDS = {
    "visual": "vision", "vision": "vision", "vision_model": "vision", "vision_tower": "vision",
    "audio": "audio", "audio_tower": "audio", "language_model": "text", "text_model": "text",
}
_ENCODERS = ("vision", "audio")


def tower_names(stacks: list[str]) -> dict[str, str]:
    """Return stack prefix -> tower name for the stack prefixes of one model."""
    names: dict[str, str | None] = {}
    for stack in stacks:
        found = [_KEYWORDS[part] for part in stack.split(".") if part in _KEYWORDS]
        names[stack] = found[-1] if found else None
    unnamed = [stack for stack, name in names.items() if name is None]
    if len(unnamed) == 1 and any(name in _ENCODERS for name in names.values()):
        names[unnamed[0]] = "text"
    used_names = [name for name in names.values() if name is not None]
    return {
        stack: name if name is not None and used_names.count(name) == 1 else stack
        for stack, name in names.items()
    }


def tower_of_path(path: str, towers: dict[str, str]) -> str | None:
    """Return the tower of a module outside every stack, from the stacks' parent modules."""
    best, best_length = None, -1
    for stack, name in towers.items():
        parent = stack.rpartition(".")[0]
        if parent and path.startswith(f"{parent}.") and len(parent) > best_length:
            best, best_length = name, len(parent)
    return best
