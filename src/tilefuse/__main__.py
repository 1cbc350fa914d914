"""``python -m tilefuse`` runs the command-line tool."""

import sys

from tilefuse.cli.main import main

sys.exit(main())
