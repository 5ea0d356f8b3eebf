"""``python -m syncbn``: the ``syncbn`` command."""

import sys

from syncbn.cli import main

sys.exit(main())
