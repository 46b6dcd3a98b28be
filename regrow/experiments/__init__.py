"""The ``regrow`` command and what it runs: the training loop (``train``), its configuration
(``config``), checkpoints, FLOPs accounting, multi-method comparisons (``compare``), tables
(``report``) and figures (``plots``), data-parallel runs (``ddp``) and run exports
(``export_run``). Nothing in the library core imports this package."""
