"""The compute core: I/O, models, inference and the CLI's logic.

Nothing under ``napari_medseg.core`` imports Qt or napari, so it runs headless on
servers; an import-linter contract in ``pyproject.toml`` enforces that.
"""
