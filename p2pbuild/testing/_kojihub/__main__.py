"""``python -m p2pbuild.testing._kojihub DATA_DIR [--port N] [--https-port N]``."""

import sys

from ._process import main

sys.exit(main())
