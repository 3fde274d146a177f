"""Run the tiny-checkpoint command: `python -m mmserve.models.tiny --help`."""

from mmserve.models.tiny.cli import main

raise SystemExit(main())
