"""Dock widgets: thin magicgui containers over the core."""
