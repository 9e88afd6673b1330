"""One module per claim of the lecture; see :mod:`sgdlab.lab.registry` for the interface."""
