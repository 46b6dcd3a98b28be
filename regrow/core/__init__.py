"""The engine's machinery (not public API; the names may change): which layers are
sparsifiable (``layers``), per-layer budgets (``density``), update schedules (``schedules``),
top-k selection (``selection``), candidate sampling (``sampling``), optimizer-state masking
(``optim_state``), activation capture (``capture``), flat-index helpers (``flat``,
``sorted_keys``), statistics (``metrics``), data-parallel agreement (``distributed``) and the
interface every backend implements (``target``). It imports nothing else from regrow."""
