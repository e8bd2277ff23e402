"""``python -m himap_trt.cli``: the same as the ``himap-trt`` console script."""

import sys

from himap_trt.cli import main

sys.exit(main())
