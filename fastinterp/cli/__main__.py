"""`python -m fastinterp.cli ...`, the same as the `fastinterp` command."""
import sys

from . import main

sys.exit(main())
