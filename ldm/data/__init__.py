"""Datasets and the CompVis ``DataModuleFromConfig``; import submodules directly, e.g.
``ldm.data.digits.DigitsDataset`` (kept light so importing ``ldm.data`` needs no extras)."""
