"""``python -m regrow ...`` is the ``regrow`` command."""
import os
import sys

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # before any tensor exists: see cli.ask_for_huge_pages
from .experiments.cli import main  # noqa: E402

sys.exit(main())
