"""`python -m mmserve` is the `mmserve` command."""

import sys

from mmserve.cli import main

sys.exit(main())
