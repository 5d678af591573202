"""`python -m bridge`: the same command line as `simotel-bridge`."""

import sys

from bridge.cli import main

sys.exit(main())
