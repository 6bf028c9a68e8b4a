"""Questions the widgets ask: one modal message box helper, so every question looks alike."""

from __future__ import annotations

from qtpy.QtWidgets import QMessageBox


def ask(parent, title: str, text: str, buttons: tuple[str, ...], default: str | None = None,
        escape: str | None = None) -> str:
    """Show a modal question with named buttons; returns the text of the button pressed.

    ``escape`` is the answer when the dialog is closed without a button (Esc).
    """
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle(title)
    box.setText(text)
    pressed = {}
    for label in buttons:
        button = box.addButton(label, QMessageBox.ButtonRole.ActionRole)
        pressed[button] = label
        if label == default:
            box.setDefaultButton(button)
        if label == escape:
            box.setEscapeButton(button)
    box.exec_()
    return pressed.get(box.clickedButton(), escape or buttons[-1])
