"""``python -m ngff_convert``: the same as the ``ngff-convert`` command."""

import sys

from .cli import main

sys.exit(main())
