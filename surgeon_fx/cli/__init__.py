"""The ``surgeon-fx`` command line: analyze, compress, plot, graph and demo.

Entry point: :func:`main`. Each command lives in its own module (``analyze_cmd``,
``compress_cmd``, ``plot_cmd``, ``graph_cmd``); ``models`` loads the MODEL argument.
The library logs and warns; this package owns the console (tables, progress bars,
log handlers and one-line errors).
"""

from .main import main

__all__ = ["main"]
