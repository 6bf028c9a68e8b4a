"""Dock widgets: thin magicgui containers over the core."""

from .. import _autosave
from .recover import offer_recovery

if offer_recovery not in _autosave.RECOVERY_OFFERS:
    _autosave.RECOVERY_OFFERS.append(offer_recovery)
