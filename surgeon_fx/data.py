"""Real English text for demos, calibration and fidelity checks.

The sentences come from ``pydoc_data.topics``, the help text that ships with
CPython, so they are available offline on every machine.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def pydoc_sentences(count: int, offset: int = 0, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Return ``count`` sentences of CPython's help topics, starting at ``offset``.

    The order is fixed (topics sorted by name), so two calls with disjoint
    ``[offset, offset + count)`` ranges give disjoint sets, for example one for
    calibration and one for evaluation.
    """
    from pydoc_data.topics import topics

    text = " ".join(topics[name] for name in sorted(topics)).replace("\n", " ")
    sentences = [s.strip() for s in _SENTENCE_END.split(text)]
    sentences = [s for s in sentences if min_chars <= len(s) <= max_chars and s[0].isupper()]
    if offset + count > len(sentences):
        raise ValueError(f"only {len(sentences)} sentences are available, asked for {offset + count}")
    return sentences[offset : offset + count]
