"""``python -m node.cli``: the ``mercato`` command."""

import sys

from node.cli.main import main

sys.exit(main())
