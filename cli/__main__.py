"""``python -m cli`` is the ``rooflab`` command."""

import sys

from cli.main import main

sys.exit(main())
