"""The reading layout: axial, coronal and sagittal views linked by a crosshair, as in a PACS.

Built on napari's own canvases (``ViewerModel`` + ``QtViewer``), not on
``napari-orthogonal-views``, which pins ``napari<0.10`` and labels axes as napari does.
The main canvas is the axial view; the dock holds the coronal and sagittal views (and a
3D view on request). Each extra view has its own viewer model whose layers share the
main layers' arrays, so there is one copy of every volume:

* napari world axes are patient axes here (S, P, L in millimetres, see
  :mod:`napari_medseg.core.geometry`), so each plane is a choice of displayed world
  axes plus a camera orientation, whatever the file's axis order. Orientation letters
  sit at the four edges of every view. Radiological convention by default (the
  patient's right on the screen's left in axial and coronal views); neurological on
  request. Oblique scans are shown along their nearest voxel axes, and the view says so.
* One dims point is shared by every view and drawn as the crosshair; a click in one
  view moves the others there. The readout gives the position in RAS (or LPS) mm, the
  file's voxel index, the intensity (HU for CT) and the label under the cursor.
* Right-drag changes window (horizontal) and level (vertical) in any view.
* Paint, erase and fill work in every view on the same labels array. A stroke made in
  an extra view is moved into the main layer's undo history and announced with the main
  layer's ``paint`` event, so napari's undo (in any view) and the autosave see it.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
from napari.components import ViewerModel
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy import API_NAME as QT_API
from qtpy.QtCore import QCoreApplication, QEvent, Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDockWidget, QHBoxLayout, QLabel, QMainWindow, QSplitter,
                            QVBoxLayout, QWidget)

from .._layers import geometry_of, medseg_meta
from .._window import fit_to_screen, tabify_with_plugin_docks
from ...core.windowing import CT_PRESETS, MR_AUTO, PRESET_NAMES, preset_limits

# world axes are (S, P, L): a plane is (dims order, camera (vertical, horizontal), edge letters
# (left, right, top, bottom)) in the radiological convention.
PLANES = {
    "axial": ((0, 1, 2), ("down", "right"), ("R", "L", "A", "P")),
    "coronal": ((1, 0, 2), ("up", "right"), ("R", "L", "S", "I")),
    "sagittal": ((2, 0, 1), ("up", "right"), ("A", "P", "S", "I")),
}
EDGES = ("middle_left", "middle_right", "top_center", "bottom_center")
LETTER_MARGIN = 14  # pixels from a view's edge to the centre of its orientation letter
CONVENTIONS = ("radiological", "neurological")
SYNCED = {
    Image: ("contrast_limits", "colormap", "gamma", "opacity", "visible", "blending"),
    Labels: ("opacity", "visible", "contour", "selected_label", "brush_size", "mode", "n_edit_dimensions",
             "preserve_labels", "show_selected_label", "blending"),
}
KEYS = {
    "PageUp": "previous slice (in the view under the mouse)",
    "PageDown": "next slice (in the view under the mouse)",
    "J": "jump: centre every view on the crosshair",
    "W": "next window preset (the Scan widget's presets)",
    "Shift-W": "previous window preset",
}
_layouts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plane_setup(plane: str, convention: str = "radiological") -> tuple:
    """``(dims order, camera orientation2d, edge letters)`` of a plane in a convention."""
    order, (vertical, horizontal), letters = PLANES[plane]
    if convention == "neurological" and plane in ("axial", "coronal"):
        horizontal = "left" if horizontal == "right" else "right"
        letters = (letters[1], letters[0], letters[2], letters[3])
    return order, (vertical, horizontal), letters


def layout_settings_path():
    from ...core.models import user_home

    return user_home() / "reading_layout.json"


def layout_settings() -> dict:
    try:
        return {"open_by_default": False, "convention": "radiological", "coordinates": "RAS",
                **json.loads(layout_settings_path().read_text(encoding="utf-8"))}
    except (OSError, ValueError):
        return {"open_by_default": False, "convention": "radiological", "coordinates": "RAS"}


def save_layout_settings(**values) -> None:
    path = layout_settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**layout_settings(), **values}))
    except OSError:
        pass  # a setting that cannot be kept is not worth an error


def scan_image(viewer):
    """The scan the layout reads: the selected image layer, else the first one."""
    active = viewer.layers.selection.active
    if isinstance(active, Image):
        return active
    images = [layer for layer in viewer.layers if isinstance(layer, Image)]
    return images[0] if images else None


def cursor_report(viewer, world, coordinates: str = "RAS") -> str:
    """What is under a world point: patient position, voxel index, intensity and label."""
    world = np.asarray(world, dtype=float)[-3:]
    s, p, left = world
    if coordinates == "LPS":
        parts = [f"LPS ({left:.1f}, {p:.1f}, {s:.1f}) mm"]
    else:
        parts = [f"RAS ({-left:.1f}, {-p:.1f}, {s:.1f}) mm"]
    image = scan_image(viewer)
    if image is not None:
        index = np.round(np.asarray(image.world_to_data(world))).astype(int)
        if np.all(index >= 0) and np.all(index < image.data.shape):
            geometry = geometry_of(image)
            file_index = geometry.layer_to_file_index(index) if geometry is not None else tuple(index)
            value = float(image.data[tuple(index)])
            unit = " HU" if str(medseg_meta(image).get("modality", "")).upper().startswith("CT") else ""
            parts.append(f"voxel [{', '.join(map(str, file_index))}]")
            parts.append(f"{value:.6g}{unit}")
        else:
            parts.append("outside the scan")
    for layer in reversed(list(viewer.layers)):
        if isinstance(layer, Labels) and layer.visible:
            index = np.round(np.asarray(layer.world_to_data(world))).astype(int)
            if np.all(index >= 0) and np.all(index < layer.data.shape):
                value = int(layer.data[tuple(index)])
                if value:
                    parts.append(f"{layer.name}: {label_name(layer, value)}")
                    break
    return " | ".join(parts)


def label_name(layer, value: int) -> str:
    names = medseg_meta(layer).get("label_names") or {}
    if str(value) in names:
        return names[str(value)]
    features = getattr(layer, "features", None)
    if features is not None and "name" in features and "index" in features:
        match = features.loc[features["index"] == value, "name"]
        if len(match):
            return str(match.iloc[0])
    return f"label {value}"


def orientation_letters(viewbox):
    """One text visual for the four letters of a view, drawn in its pixel space.

    One visual rather than four napari text overlays, and its filter kernel kept as one
    texture: vispy's text uploads that kernel on every draw, and under software OpenGL
    each upload makes the driver rasterise what it has queued: four overlays per view
    cost about 12 ms a slice step over the three views (bench_reading).
    """
    from vispy.gloo import Texture2D
    from vispy.scene.visuals import Text

    visual = Text(text=["", "", "", ""], pos=np.zeros((4, 2)), color="yellow", font_size=14, bold=True,
                  anchor_x="center", anchor_y="center", parent=viewbox)
    visual._font._kernel = Texture2D(visual._font._kernel)  # its own font: each visual has a font manager
    visual.order = 1e6 + 1
    viewbox.events.resize.connect(lambda _event=None: place_letters(visual, viewbox))
    return visual


def place_letters(visual, viewbox) -> None:
    width, height = viewbox.size
    m = LETTER_MARGIN
    visual.pos = np.array([[m, height / 2], [width - m, height / 2], [width / 2, m], [width / 2, height - m]],
                          dtype=np.float32)


class _View:
    """One plane: a viewer model (the main viewer for axial) and its canvas."""

    def __init__(self, plane: str, model, qt_viewer):
        self.plane = plane
        self.model = model
        self.qt_viewer = qt_viewer
        self.crosshair = None
        self.letters_visual = None    # the orientation letters, in EDGES order
        self.copies: dict = {}   # id(main layer) -> copy layer in this model


DOCK_SHARE = 0.3   # of the window's width, for the coronal and sagittal views

class ReadingLayout(QWidget):
    """Axial (the main canvas), coronal and sagittal views, linked, with orientation letters."""

    def __init__(self, napari_viewer, show_3d: bool = False):
        super().__init__()
        from .._autosave import install

        self.viewer = napari_viewer
        manager = install(napari_viewer)
        if manager is not None:
            manager.on_close.append(self.close_views)
        settings = layout_settings()
        self.convention = settings["convention"]
        self.coordinates = settings["coordinates"]
        self._syncing = False
        self._watched: set = set()
        self._presets_index = -1
        self.views: dict[str, _View] = {}
        self.view_3d = None
        self._build_controls(settings)
        self.views["axial"] = _View("axial", napari_viewer, getattr(napari_viewer.window, "_qt_viewer", None))
        splitter = QSplitter()
        splitter.setOrientation(Qt.Orientation.Vertical)
        for plane in ("coronal", "sagittal"):
            self.views[plane] = self._make_view(plane, splitter)
        self._splitter = splitter
        splitter.setMinimumSize(360, 520)
        self.layout().addWidget(splitter, 1)
        for view in self.views.values():
            self._setup_view(view)
        self._mirror_layers()
        for view in self._extra_views():
            view.model.reset_view()
        napari_viewer.layers.events.inserted.connect(self._mirror_layers)
        napari_viewer.layers.events.removed.connect(self._mirror_layers)
        napari_viewer.layers.events.moved.connect(self._mirror_layers)
        napari_viewer.dims.events.current_step.connect(self._main_dims_changed)
        self._bind_keys()
        self._centre_crosshair()
        self._update_crosshairs()
        image = scan_image(napari_viewer)
        if image is not None:
            self._show_window(image.contrast_limits)
        if show_3d:
            self.set_3d(True)
        _layouts[napari_viewer] = self

    # -- building -----------------------------------------------------------------------------
    def _build_controls(self, settings) -> None:
        layout = QVBoxLayout()
        self.setLayout(layout)
        row = QHBoxLayout()
        self._convention = QComboBox()
        self._convention.addItems(CONVENTIONS)
        self._convention.setCurrentText(self.convention)
        self._convention.currentTextChanged.connect(self.set_convention)
        self._coordinates = QComboBox()
        self._coordinates.addItems(("RAS", "LPS"))
        self._coordinates.setCurrentText(self.coordinates)
        self._coordinates.currentTextChanged.connect(self._set_coordinates)
        self._convention.setToolTip("Display convention: radiological (patient's left on the screen's right) "
                                    "or neurological")
        self._coordinates.setToolTip("Coordinates of the readout: RAS or LPS millimetres")
        self._show_3d = QCheckBox("3D view")
        self._show_3d.toggled.connect(self.set_3d)
        self._show_3d.setToolTip("Add a 3D view of the scan and its masks")
        self._by_default = QCheckBox("Open for every scan")
        self._by_default.setChecked(bool(settings["open_by_default"]))
        self._by_default.toggled.connect(lambda on: save_layout_settings(open_by_default=bool(on)))
        self._by_default.setToolTip("Open this layout with every scan opened")
        for widget in (self._convention, self._coordinates, self._show_3d, self._by_default):
            row.addWidget(widget)
        layout.addLayout(row)
        self.readout = QLabel("")
        self.readout.setWordWrap(True)
        self.window_label = QLabel("")
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.setToolTip("Keys: " + "; ".join(f"{key}: {what}" for key, what in KEYS.items())
                        + "; right-drag: window (left-right) and level (up-down); click: move the crosshair")
        for widget in (self.readout, self.window_label, self.note):
            layout.addWidget(widget)

    def _make_view(self, plane: str, parent) -> _View:
        from napari._qt.qt_viewer import QtViewer

        model = ViewerModel(title=plane)
        qt_viewer = QtViewer(model, show_welcome_screen=False)
        parent.addWidget(qt_viewer)
        return _View(plane, model, qt_viewer)

    def _setup_view(self, view: _View) -> None:
        model = view.model
        self._apply_plane(view)
        model.mouse_drag_callbacks.append(self._click_or_window)
        model.mouse_move_callbacks.append(self._hover)
        if view.qt_viewer is not None:
            from vispy.scene.visuals import Line

            view.crosshair = Line(pos=np.zeros((4, 2)), color=(1.0, 0.85, 0.1, 0.9), connect="segments",
                                  width=1, parent=view.qt_viewer.canvas.view.scene)
            view.crosshair.order = 1e6
            view.crosshair.set_gl_state(depth_test=False, blend=True)
        if view.model is not self.viewer:
            model.dims.events.current_step.connect(lambda event, v=view: self._extra_dims_changed(v))

    def _apply_plane(self, view: _View) -> None:
        if view.plane not in PLANES:
            return  # the 3D view
        order, orientation, letters = plane_setup(view.plane, self.convention)
        model = view.model
        if model.dims.ndim >= 3:
            model.dims.order = tuple(range(model.dims.ndim - 3)) + tuple(a + model.dims.ndim - 3 for a in order)
        model.camera.orientation2d = orientation
        if view.qt_viewer is not None:
            if view.letters_visual is None:
                view.letters_visual = orientation_letters(view.qt_viewer.canvas.view)
            view.letters_visual.text = list(letters)
            place_letters(view.letters_visual, view.qt_viewer.canvas.view)
        self._update_note()

    def reset_views(self) -> None:
        """Fit the scan in every view."""
        for view in self.views.values():
            view.model.reset_view()
        if self.view_3d is not None:
            self.view_3d.model.reset_view()

    def edge_letters(self, plane: str) -> dict:
        """The letters shown at the edges of a view: ``{edge: letter}`` (read from the drawn text)."""
        visual = self.views[plane].letters_visual
        return {} if visual is None else dict(zip(EDGES, visual.text))

    def _update_note(self) -> None:
        image = scan_image(self.viewer)
        geometry = geometry_of(image) if image is not None else None
        if geometry is not None and geometry.is_oblique:
            self.note.setText("Oblique scan: the planes follow its nearest voxel axes; the letters name the "
                              "nearest patient directions.")
        else:
            self.note.setText("")

    # -- layers ---------------------------------------------------------------------------------
    def _mirror_layers(self, _event=None) -> None:
        """Give every extra view a copy of each main image and labels layer (sharing the array)."""
        if not self.views:
            return  # closed
        main_layers = [layer for layer in self.viewer.layers if isinstance(layer, (Image, Labels))]
        for view in self._extra_views():
            keep = {id(layer) for layer in main_layers}
            for key in [k for k in view.copies if k not in keep]:
                copy = view.copies.pop(key)
                if copy in view.model.layers:
                    view.model.layers.remove(copy)
            first = not view.copies
            for layer in main_layers:
                if id(layer) not in view.copies:
                    view.copies[id(layer)] = self._copy_layer(view, layer)
            if first and view.copies:
                QTimer.singleShot(100, view.model.reset_view)  # once the canvas has its size
            wanted = [view.copies[id(layer)] for layer in main_layers]
            for index, copy in enumerate(wanted):
                current = list(view.model.layers).index(copy)
                if current != index:
                    view.model.layers.move(current, index)
            self._apply_plane(view)
        self._apply_plane(self.views["axial"])
        self._update_crosshairs()

    def _extra_views(self):
        return [view for view in self.views.values() if view.model is not self.viewer] + \
            ([self.view_3d] if self.view_3d is not None else [])

    def _copy_layer(self, view: _View, layer):
        kind = type(layer)
        common = {"name": layer.name, "affine": layer.affine.affine_matrix, "scale": layer.scale,
                  "translate": layer.translate, "rotate": layer.rotate, "shear": layer.shear,
                  "opacity": layer.opacity, "blending": layer.blending, "visible": layer.visible,
                  "metadata": layer.metadata}
        if kind is Labels:
            copy = Labels(layer.data, colormap=layer.colormap, features=layer.features, **common)
            copy.events.paint.connect(lambda event, main=layer, c=copy: self._painted_in_view(main, c, event))
            copy.undo = layer.undo    # napari's undo in this view is the main layer's undo
            copy.redo = layer.redo
            if id(layer) not in self._watched:
                self._watched.add(id(layer))
                layer.events.paint.connect(lambda _e=None, main=layer: self._refresh_copies(main))
                layer.events.set_data.connect(lambda _e=None, main=layer: self._main_labels_refreshed(main))
        else:
            copy = Image(layer.data, colormap=layer.colormap, contrast_limits=layer.contrast_limits,
                         gamma=layer.gamma, **common)
        copy._medseg_history = _history_lengths(layer)
        for name in SYNCED[kind]:
            try:
                setattr(copy, name, getattr(layer, name))
            except (ValueError, TypeError):
                pass
        view.model.layers.append(copy)
        for name in SYNCED[kind]:
            getattr(layer.events, name).connect(lambda _e=None, n=name, src=layer: self._sync(src, n))
            getattr(copy.events, name).connect(lambda _e=None, n=name, src=copy, main=layer:
                                               self._sync(main, n, source=src))
        layer.events.data.connect(lambda _e=None, main=layer: self._replace_data(main))
        return copy

    def _copies_of(self, main):
        return [view.copies[id(main)] for view in self._extra_views() if id(main) in view.copies]

    def _sync(self, main, name: str, source=None) -> None:
        """Copy one property from ``source`` (a copy, or the main layer itself) to the others."""
        if self._syncing:
            return
        self._syncing = True
        try:
            origin = source if source is not None else main
            value = getattr(origin, name)
            for layer in [main, *self._copies_of(main)]:
                if layer is not origin:
                    try:
                        if name == "contrast_limits":
                            low, high = value
                            range_low, range_high = layer.contrast_limits_range
                            if low < range_low or high > range_high:
                                layer.contrast_limits_range = (min(low, range_low), max(high, range_high))
                        setattr(layer, name, value)
                    except (ValueError, TypeError):
                        pass
            if name == "contrast_limits":
                self._show_window(value)
        finally:
            self._syncing = False

    def _replace_data(self, main) -> None:
        for copy in self._copies_of(main):
            copy.data = main.data

    def _painted_in_view(self, main, copy, event) -> None:
        """A stroke in an extra view: make it the main layer's (undo, autosave), then redraw."""
        item = event.value
        if copy._undo_history and copy._undo_history[-1] is item:
            copy._undo_history.pop()
        main._undo_history.append(item)
        main._redo_history.clear()
        main.events.paint(value=item)
        # napari emits ``paint`` before a single paint call writes: redraw afterwards.
        QTimer.singleShot(0, lambda: self._refresh_all(main))

    def _refresh_copies(self, main) -> None:
        QTimer.singleShot(0, lambda: [copy.refresh() for copy in self._copies_of(main)])

    def _refresh_all(self, main) -> None:
        main.refresh()
        for copy in self._copies_of(main):
            copy.refresh()

    def _main_labels_refreshed(self, main) -> None:
        # Undo and redo refresh the main layer without a paint event; slice changes do too,
        # and those must not redraw the other views (paging speed).
        lengths = _history_lengths(main)
        copies = self._copies_of(main)
        if copies and lengths != getattr(copies[0], "_medseg_history", None):
            for copy in copies:
                copy._medseg_history = lengths
                copy.refresh()

    # -- the shared point and the crosshair -------------------------------------------------------
    def _main_dims_changed(self, _event=None) -> None:
        if self._syncing or not self.views:
            return
        self._syncing = True
        try:
            step = self.viewer.dims.current_step
            for view in self._extra_views():
                dims = view.model.dims
                if dims.ndim != len(step):
                    continue
                # Only the axes a view slices through: a step along an axis it shows moves
                # its crosshair and nothing else, and re-slicing it would upload new textures.
                wanted = list(dims.current_step)
                for axis in dims.not_displayed:
                    wanted[axis] = step[axis]
                if tuple(wanted) != tuple(dims.current_step):
                    dims.current_step = tuple(wanted)
        finally:
            self._syncing = False
        self._update_crosshairs()

    def _extra_dims_changed(self, view: _View) -> None:
        if self._syncing:
            return
        dims = view.model.dims
        step = list(self.viewer.dims.current_step)
        if len(step) != dims.ndim:
            return
        for axis in dims.not_displayed:  # the axes this view slices through (its own paging)
            step[axis] = dims.current_step[axis]
        if tuple(step) != tuple(self.viewer.dims.current_step):
            self.viewer.dims.current_step = tuple(step)  # the main handler passes it on

    def point(self) -> np.ndarray:
        """The crosshair: the shared dims point, in world (S, P, L) mm."""
        return np.asarray(self.viewer.dims.point[-3:], dtype=float)

    def set_point(self, world) -> None:
        """Move the crosshair (and every view's slices) to a world point."""
        world = np.asarray(world, dtype=float)[-3:]
        ndim = self.viewer.dims.ndim
        self.viewer.dims.set_point(range(ndim - 3, ndim), tuple(world))
        self.readout.setText("crosshair: " + cursor_report(self.viewer, world, self.coordinates))

    def _centre_crosshair(self) -> None:
        extent = self.viewer.layers.extent.world
        if np.all(np.isfinite(extent)) and self.viewer.dims.ndim >= 3:
            self.set_point(extent.mean(axis=0)[-3:])

    def _update_crosshairs(self) -> None:
        extent = np.asarray(self.viewer.layers.extent.world, dtype=float)
        if extent.shape[-1] < 3 or not np.all(np.isfinite(extent)):
            return
        extent = extent[:, -3:]
        point = self.point()
        for view in self.views.values():
            if view.crosshair is None or view.plane not in PLANES:
                continue
            order = plane_setup(view.plane)[0]
            vertical, horizontal = order[1], order[2]
            # vispy scene coordinates: x = the horizontal world axis, y = the vertical one.
            h_lo, h_hi = extent[:, horizontal]
            v_lo, v_hi = extent[:, vertical]
            x, y = point[horizontal], point[vertical]
            view.crosshair.set_data(pos=np.array([[h_lo, y], [h_hi, y], [x, v_lo], [x, v_hi]], dtype=np.float32))

    def jump_to_crosshair(self) -> None:
        """Centre every view on the crosshair."""
        point = self.point()
        for view in self.views.values():
            if view.plane not in PLANES:
                continue
            order = plane_setup(view.plane)[0]
            center = list(view.model.camera.center)
            center[-2:] = [point[order[1]], point[order[2]]]
            view.model.camera.center = tuple(center)

    # -- mouse ---------------------------------------------------------------------------------
    def _click_or_window(self, model, event):
        """Left click: move the crosshair there. Right drag: window and level."""
        if event.button == 2:
            yield from self._window_level_drag(model, event)
            return
        if event.button != 1 or _editing(model):
            return
        if (yield from clicked(event)):
            self.set_point(event.position)

    def _window_level_drag(self, model, event):
        image = scan_image(model)
        if image is None:
            return
        low, high = image.contrast_limits
        width, level = high - low, (high + low) / 2
        data_range = np.subtract(*image.contrast_limits_range[::-1]) or 1.0
        per_pixel = data_range / 600.0
        start = np.asarray(event.pos, dtype=float)
        model.camera.mouse_pan = False  # vispy's camera would zoom on a right drag
        try:
            yield
            while event.type == "mouse_move":
                dx, dy = np.asarray(event.pos, dtype=float) - start
                new_width = max(width + dx * per_pixel, data_range / 1000.0)
                new_level = level - dy * per_pixel
                self.set_window(image, new_width, new_level)
                yield
        finally:
            model.camera.mouse_pan = True

    def set_window(self, image, width: float, level: float) -> None:
        low, high = level - width / 2, level + width / 2
        range_low, range_high = image.contrast_limits_range
        if low < range_low or high > range_high:
            image.contrast_limits_range = (min(low, range_low), max(high, range_high))
        image.contrast_limits = (low, high)
        self._show_window((low, high))

    def _show_window(self, limits) -> None:
        low, high = limits
        self.window_label.setText(f"window {high - low:.0f}, level {(high + low) / 2:.0f}")

    def _hover(self, model, event) -> None:
        text = cursor_report(model, event.position, self.coordinates)
        self.readout.setText(text)
        self.viewer.status = text

    def _set_coordinates(self, value: str) -> None:
        self.coordinates = value
        save_layout_settings(coordinates=value)

    def set_convention(self, convention: str) -> None:
        self.convention = convention
        save_layout_settings(convention=convention)
        for view in self.views.values():
            self._apply_plane(view)
        self._update_crosshairs()

    # -- keys -------------------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        for view in self.views.values():
            model = view.model
            plane = view.plane
            model.bind_key("PageUp", lambda _v, p=plane: self.step(p, -1), overwrite=True)
            model.bind_key("PageDown", lambda _v, p=plane: self.step(p, +1), overwrite=True)
            model.bind_key("J", lambda _v: self.jump_to_crosshair(), overwrite=True)
            model.bind_key("W", lambda _v: self.cycle_preset(+1), overwrite=True)
            model.bind_key("Shift-W", lambda _v: self.cycle_preset(-1), overwrite=True)

    def step(self, plane: str, direction: int) -> None:
        """The next (+1) or previous (-1) slice of a plane."""
        axis = self.viewer.dims.ndim - 3 + plane_setup(plane)[0][0]
        step = list(self.viewer.dims.current_step)
        step[axis] = int(np.clip(step[axis] + direction, 0, self.viewer.dims.nsteps[axis] - 1))
        self.viewer.dims.current_step = tuple(step)

    def cycle_preset(self, direction: int) -> str | None:
        image = scan_image(self.viewer)
        if image is None:
            return None
        meta = medseg_meta(image)
        # A CT model's result sets a CT window on a scan whose modality is unknown (see Segment).
        is_ct = str(meta.get("modality", "")).upper().startswith("CT") or meta.get("window_preset") in CT_PRESETS
        names = list(CT_PRESETS) + [MR_AUTO] if is_ct else [MR_AUTO] + list(CT_PRESETS)
        names = [n for n in names if n in PRESET_NAMES]
        self._presets_index = (self._presets_index + direction) % len(names)
        name = names[self._presets_index]
        low, high = preset_limits(name, image.data)
        self.set_window(image, high - low, (high + low) / 2)
        show_info(f"napari-medseg: window preset {name}")
        return name

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if not getattr(self, "_dock_fitted", False):
            self._dock_fitted = True
            QTimer.singleShot(0, self.fit_dock)

    def fit_dock(self) -> None:
        """Give the dock about a third of the window, so the axial view stays the large one
        (and the two side views, redrawn on every slice step, stay cheap to draw)."""
        dock = self.parent()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parent()
        window = dock.parent() if dock is not None else None
        if isinstance(window, QMainWindow):
            window.resizeDocks([dock], [max(360, int(window.width() * DOCK_SHARE))], Qt.Orientation.Horizontal)

    def close_views(self) -> None:
        """Close the extra views with the viewer (their canvases must not outlive it)."""
        for event, callback in ((self.viewer.layers.events.inserted, self._mirror_layers),
                                (self.viewer.layers.events.removed, self._mirror_layers),
                                (self.viewer.layers.events.moved, self._mirror_layers),
                                (self.viewer.dims.events.current_step, self._main_dims_changed)):
            event.disconnect(callback)
        for view in self._extra_views():
            _dispose(view)
        self.views.clear()
        self.view_3d = None
        _layouts.pop(self.viewer, None)

    # -- 3D ----------------------------------------------------------------------------------------
    def set_3d(self, on: bool) -> None:
        if on and self.view_3d is None:
            view = self._make_view("axial", self._splitter)
            view.plane = "3D"
            view.model.dims.ndisplay = 3
            self.view_3d = view
            self._mirror_layers()
            view.model.dims.ndisplay = 3
            view.model.reset_view()
        elif not on and self.view_3d is not None:
            view, self.view_3d = self.view_3d, None
            _dispose(view)
        if self._show_3d.isChecked() != bool(on):
            self._show_3d.setChecked(bool(on))


def _dispose(view: _View) -> None:
    """Close an extra view and delete its canvas."""
    view.model.layers.clear()
    view.copies.clear()
    view.qt_viewer.close()
    view.qt_viewer.setParent(None)
    view.qt_viewer.deleteLater()
    if QT_API.startswith("PySide"):
        # PySide keeps a widget waiting for deletion (and, through napari's connections,
        # its whole viewer) alive until the next event loop pass, so delete it now; PyQt
        # leaves it to the garbage collector, and deleting it now would keep it.
        QCoreApplication.sendPostedEvents(view.qt_viewer, QEvent.Type.DeferredDelete)


def clicked(event):
    """For a ``mouse_drag_callbacks`` generator: ``yield from clicked(event)`` waits for the
    release and is True when the mouse did not move more than 3 pixels (a click, not a drag)."""
    start = np.asarray(event.pos, dtype=float)
    moved = False
    yield
    while event.type == "mouse_move":
        moved = moved or np.hypot(*(np.asarray(event.pos) - start)) > 3
        yield
    return not moved


def _history_lengths(layer) -> tuple:
    return len(getattr(layer, "_undo_history", ())), len(getattr(layer, "_redo_history", ()))


def _editing(model) -> bool:
    layer = model.layers.selection.active
    return isinstance(layer, Labels) and str(layer.mode) in ("paint", "erase", "fill", "polygon")


def open_reading_layout(viewer, show_3d: bool = False) -> ReadingLayout:
    """Dock the reading layout on a viewer (once)."""
    layout = _layouts.get(viewer)
    if layout is None:
        layout = ReadingLayout(viewer, show_3d=show_3d)
        dock = viewer.window.add_dock_widget(layout, name="Reading layout", area="right")
        # One column of tabs: stacked under the other docks, the three views got 200 px each.
        tabify_with_plugin_docks(viewer, dock)
        fit_to_screen(viewer)
    return layout


def layout_of(viewer) -> ReadingLayout | None:
    return _layouts.get(viewer)
