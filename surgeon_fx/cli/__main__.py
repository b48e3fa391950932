"""``python -m surgeon_fx.cli``, the same as the ``surgeon-fx`` command."""

import sys

from .main import main

sys.exit(main())
