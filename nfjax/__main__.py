"""``python -m nfjax`` runs the ``nfjax`` command."""
import sys

from nfjax.cli import main

sys.exit(main())
