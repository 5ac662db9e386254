"""``python -m fastchar COMMAND [ARGS]``: the ``fastchar`` command (fastchar/command.py)."""

import sys

from fastchar.command import main

sys.exit(main())
