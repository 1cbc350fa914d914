"""``python -m tilefuse`` runs the command-line tool."""

import sys

from tilefuse.cli.main import run

sys.exit(run())
