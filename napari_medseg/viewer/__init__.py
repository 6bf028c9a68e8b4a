"""napari's face of napari-medseg: readers, writer, sample, widgets and their helpers.

Everything here sits above :mod:`napari_medseg.core`, which imports no Qt and no napari.
Inside, the widgets sit above ``_autosave``, which sits above ``_layers``, ``_worker`` and
``_dialogs`` (the import-linter contracts in ``pyproject.toml``).
"""
