"""A process that edits a mask in napari and is then killed with SIGKILL (run by test_autosave_viewer).

    python tests/autosave_child.py SCAN OPS_FILE SEED MODE

It opens SCAN through the plugin's reader into a real napari viewer model, adds a
labels layer, and paints brush strokes with ``Labels.paint`` for a random time. Each
stroke is written to OPS_FILE (flushed) before it is painted, so the test can replay
them and know every state the mask went through. MODE ``wait``: wait 3 s after the
last stroke, then kill itself; ``random``: kill itself at a random moment while
painting, autosaves in flight included.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np


def open_scan(viewer, scan: str):
    """The scan as the plugin's reader opens it, and an empty labels layer on it."""
    from napari_medseg.viewer._layers import make_metadata, medseg_meta
    from napari_medseg.viewer._reader import read_scan

    data, kwargs, _kind = read_scan(scan)[0]
    image = viewer.add_image(data, **kwargs)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="correction", affine=image.affine,
                               metadata=make_metadata(geometry=medseg_meta(image)["geometry"],
                                                      segmentation_of=image.name))
    return image, labels


def paint(labels, op: list) -> None:
    size, dimensions, value, *coord = op
    labels.brush_size = size
    labels.n_edit_dimensions = dimensions
    labels.paint(coord, value)


def replay(scan: str, ops_file: str) -> list:
    """Every state the child's mask went through: before any stroke, then after each logged stroke."""
    from napari.components import ViewerModel

    _image, labels = open_scan(ViewerModel(), scan)
    states = [np.array(labels.data, copy=True)]
    for line in Path(ops_file).read_text().splitlines():
        try:
            op = json.loads(line)
        except ValueError:
            break  # killed while writing the line: that stroke was never painted
        paint(labels, op)
        states.append(np.array(labels.data, copy=True))
    return states


def main(scan: str, ops_file: str, seed: int, mode: str) -> None:
    from napari.components import ViewerModel

    from napari_medseg.viewer._autosave import install

    rng = np.random.default_rng(seed)
    viewer = ViewerModel()
    install(viewer)
    _image, labels = open_scan(viewer, scan)
    painting_s = rng.uniform(0.5, 2.5)
    if mode == "random":  # die at any moment: in a stroke, between strokes, inside an autosave
        threading.Timer(rng.uniform(0.2, painting_s + 0.8), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    start = time.monotonic()
    with open(ops_file, "w") as log:
        while time.monotonic() - start < painting_s:
            op = [int(rng.integers(3, 15)), int(rng.choice([2, 3])), int(rng.integers(0, 4)),
                  *[int(rng.integers(0, n)) for n in labels.data.shape]]
            log.write(json.dumps(op) + "\n")
            log.flush()
            paint(labels, op)
            time.sleep(float(rng.uniform(0.0, 0.05)))
    time.sleep(3.0)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
