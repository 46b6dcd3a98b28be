"""Drop-in callbacks for training frameworks (optional extras; ``import regrow`` never imports them).

- ``regrow.integrations.transformers.RegrowCallback`` for the Hugging Face ``Trainer``;
- ``regrow.integrations.lightning.RegrowCallback`` for Lightning's ``Trainer``.

Each builds a :class:`regrow.DynamicSparsity` when training starts, masks the gradients before
every optimizer step and the weights after it, rewires when due, logs density / ITOP / updates
through the framework, and keeps its state in the framework's checkpoints.
"""
