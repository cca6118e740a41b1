"""``python -m numpy_ref.golden``: see `numpy_ref.golden.cli`."""

import sys

from numpy_ref.golden.cli import main

sys.exit(main())
