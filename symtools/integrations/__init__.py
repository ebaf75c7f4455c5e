"""The training monitor inside the trainers people use: PyTorch Lightning and the Hugging Face Trainer.

- :mod:`symtools.integrations.lightning` — ``SymmetryMonitor``, a ``lightning.pytorch``/``pytorch_lightning``
  ``Callback``: ``pl.Trainer(callbacks=[SymmetryMonitor()])``.
- :mod:`symtools.integrations.hf` — ``SymmetryMonitorCallback``, a ``transformers.TrainerCallback``:
  ``symtools.integrations.hf.attach(trainer, symmetries)``.

Both drive the same :class:`~symtools.numeric.monitor.Monitor` through :class:`~symtools.integrations.driver.
MonitorDriver`, which hooks the *torch* optimizer itself (``register_step_pre_hook`` /
``register_step_post_hook``): those fire inside ``optimizer.step()``, after the trainer has unscaled (AMP),
accumulated and clipped the gradients, with the learning rates the schedulers set for this step, and not at
all when a GradScaler skips the step on an inf. Docs: ``docs/integrations/lightning.md``, ``docs/integrations/hf.md``.
Neither framework is imported here: install the extras (``pip install 'symtools[lightning]'``,
``'symtools[hf]'``).
"""
