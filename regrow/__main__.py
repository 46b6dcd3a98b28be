"""``python -m regrow ...`` is the ``regrow`` command."""
import sys

from .experiments.cli import main

sys.exit(main())
