"""The label filter that the Segment dock's "Show labels" field uses."""

from napari_medseg.core.card import labels_matching

NAMES = {0: "background", 1: "lung_upper_lobe_left", 2: "lung_lower_lobe_left", 3: "trachea", 4: "liver",
         5: "airway", 6: "kidney_left", 7: "kidney_right"}


def test_names_values_and_ranges_select_labels():
    assert labels_matching(NAMES, "") == set(NAMES)
    assert labels_matching(NAMES, "lung, airway") == {1, 2, 5}
    assert labels_matching(NAMES, "KIDNEY") == {6, 7}
    assert labels_matching(NAMES, "4, 6-7") == {4, 6, 7}
    assert labels_matching(NAMES, "spleen") == set()
