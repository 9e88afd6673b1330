"""Callbacks for the frameworks people train with (docs/integrations.md).

* :mod:`sgdlab.integrations.lightning`: ``SGDLabCallback``, a ``lightning.pytorch.Callback``.
* :mod:`sgdlab.integrations.transformers`: ``SGDLabCallback``, a ``transformers.TrainerCallback``.

Both attach :func:`sgdlab.stats.track` and a :class:`sgdlab.stats.NoiseMeter`, call
``opt.set_batch_size`` with the examples each optimizer step averages over (gradient
accumulation, DDP ranks and a partial last batch included) and log the meter's readings and the
hyperparameters the step applies. Importing this package imports neither framework; each
submodule needs its framework (``pip install 'sgdlab[integrations]'``).
"""

__all__ = ["lightning", "transformers"]
