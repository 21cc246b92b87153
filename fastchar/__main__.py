"""`python -m fastchar`: the same as the `fastchar` command."""

import sys

from fastchar.cli import main

sys.exit(main())
