"""``python -m snapfusion.cli``."""

import sys

from snapfusion.cli.main import main

sys.exit(main())
