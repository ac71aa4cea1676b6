"""``python -m workflows``: the command line (workflows/cli.py)."""

import os
import sys

from workflows.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:
    # The reader went away (`python -m workflows show ID | head -1`): stop quietly. Python would
    # otherwise complain again when it flushes stdout at exit, so point stdout at /dev/null.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 1
sys.exit(code)
