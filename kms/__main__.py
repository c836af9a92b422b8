"""``python -m kms`` is the ``kms`` command."""

import sys

from .cli import main

sys.exit(main())
