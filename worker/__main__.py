"""``python -m worker`` is ``update-worker``."""

import sys

from worker.cli import main

sys.exit(main())
