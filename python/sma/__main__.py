"""``python -m sma``: the same as the ``sma`` console script."""

import sys

from .cli import main

sys.exit(main())
