"""MONAI bundles as data: the model zoo's spleen config builds from literals and MONAI's own
classes, and a config that would run code is refused before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from napari_medseg.core.bundle import BundleError, build_sections, read_config

SPLEEN = Path(__file__).parent / "data" / "bundles" / "spleen_ct_segmentation"


@pytest.fixture
def ct_file(tmp_path):
    from dicom_factory import pyradiomics_scan
    import SimpleITK as sitk

    image = sitk.ReadImage(str(pyradiomics_scan("lung1")))
    small = sitk.RegionOfInterest(image, [64, 64, min(24, image.GetSize()[2])], [200, 200, 0])
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small, str(path))
    return path


def test_the_model_zoo_spleen_config_builds_from_monai_classes_without_running_its_expressions():
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import UNet
    from monai.transforms import Compose, Invertd

    config = read_config(SPLEEN)
    assert any(str(v).startswith("$") for v in config.values())  # the config does hold code ...
    built = build_sections(config)                                 # ... in sections a prediction never needs
    assert isinstance(built["network_def"], UNet) and built["network_def"].out_channels == 2
    assert isinstance(built["preprocessing"], Compose) and len(built["preprocessing"].transforms) == 6
    assert isinstance(built["inferer"], SlidingWindowInferer) and tuple(built["inferer"].roi_size) == (96, 96, 96)
    names = [type(t).__name__ for t in built["postprocessing"].transforms]
    assert names == ["Activationsd", "Invertd", "AsDiscreted"]  # SaveImaged left out: our writer stores results
    invert = built["postprocessing"].transforms[1]
    assert isinstance(invert, Invertd) and invert.transform is built["preprocessing"]


def test_the_built_sections_predict_what_monais_own_config_parser_builds(ct_file):
    from monai.bundle import ConfigParser

    config = read_config(SPLEEN)
    ours = build_sections(config)
    parser = ConfigParser(json.loads((SPLEEN / "configs" / "inference.json").read_text()))  # trusted: our test file
    theirs = {key: parser.get_parsed_content(key) for key in ("network_def", "preprocessing", "inferer")}
    torch.manual_seed(0)
    state = ours["network_def"].state_dict()
    theirs["network_def"].load_state_dict(state)
    results = []
    for sections in (ours, theirs):
        data = sections["preprocessing"]({"image": str(ct_file)})
        network = sections["network_def"].eval()
        with torch.no_grad():
            logits = sections["inferer"](data["image"][None].float(), network)
        results.append((data["image"], logits))
    (our_image, our_logits), (their_image, their_logits) = results
    assert our_image.shape == their_image.shape and torch.equal(our_image.as_tensor(), their_image.as_tensor())
    assert float(our_image.std()) > 0.01  # a real CT, windowed by the config's ScaleIntensityRanged
    torch.testing.assert_close(our_logits, their_logits)


def _bundle_with(tmp_path, change) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(SPLEEN, folder)
    config = read_config(folder)
    change(config)
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("change, key", [
    (lambda c, m: c["network_def"].__setitem__("channels", f"$open({m!r}, 'w') and [16, 32, 64, 128, 256]"),
     "network_def::channels"),
    (lambda c, m: c["network_def"].__setitem__("_target_", "os.system"), "network_def::_target_"),
    (lambda c, m: c["preprocessing"]["transforms"][0].__setitem__("_target_", "monai.utils.optional_import"),
     "preprocessing::transforms::0::_target_"),
    (lambda c, m: c.__setitem__("image_key", f"$open({m!r}, 'w').name"), "image_key"),
    (lambda c, m: c["inferer"].__setitem__("_mode_", "callable"), "inferer::_mode_"),
])
def test_a_config_that_would_run_code_is_refused_in_one_line_and_its_code_never_runs(tmp_path, change, key):
    marker = tmp_path / "code-ran"
    folder = _bundle_with(tmp_path, lambda config: change(config, str(marker)))
    with pytest.raises(BundleError) as caught:
        build_sections(read_config(folder))
    message = str(caught.value)
    assert f"'{key}'" in message and "\n" not in message, message
    assert not marker.exists()


def test_a_folder_that_is_not_a_bundle_says_so(tmp_path):
    with pytest.raises(BundleError, match="not a MONAI bundle"):
        read_config(tmp_path)
