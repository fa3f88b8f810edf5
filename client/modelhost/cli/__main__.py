"""`python -m modelhost.cli`."""

import sys

from modelhost.cli import main

sys.exit(main())
