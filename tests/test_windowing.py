"""Reading windows: a CT model's card picks the window its result is read in."""

from napari_medseg.core.windowing import preset_for_model


def test_a_ct_models_labels_pick_its_reading_window():
    assert preset_for_model("CT", {0: "background", 1: "lung_upper_lobe_left", 2: "trachea"}) == "CT lung"
    assert preset_for_model("CT", {0: "background", 1: "vertebrae_L1", 2: "rib_left_1"}) == "CT bone"
    assert preset_for_model("CT", {0: "background", 1: "intracranial hemorrhage"}) == "CT brain"
    assert preset_for_model("CT", {0: "background", 1: "body", 2: "bone"}) == "CT soft tissue"
    # Many organs, lungs among them (TotalSegmentator's total): the soft-tissue window.
    organs = {0: "background", **{v: f"organ_{v}" for v in range(1, 100)}, 100: "lung_lower_lobe_left"}
    assert preset_for_model("CT", organs) == "CT soft tissue"
    assert preset_for_model("MR", {0: "background", 1: "brain"}) is None
    assert preset_for_model("any", {0: "background", 1: "lung"}) is None
