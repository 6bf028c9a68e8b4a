"""MONAI bundles as data: the model zoo's spleen config builds from literals and MONAI's own
classes, and a config that would run code is refused before anything runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
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


# -- importing a bundle and predicting with it ---------------------------------------------

def cli(*args, **kwargs):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", errors="replace", **kwargs)


@pytest.fixture(scope="module")
def spleen(tmp_path_factory):
    """The zoo's spleen configs with a seeded, calibrated model.pt, a real CT crop, and the mask
    that MONAI's own bundle runner (``python -m monai.bundle run``) made of it."""
    from bundle_factory import build, ct_scan, run_monai_bundle

    root = tmp_path_factory.mktemp("spleen")
    scan = ct_scan(root / "scans" / "imagesTs" / "ct.nii.gz")
    bundle = build(root, scan)
    (theirs,) = run_monai_bundle(bundle, root / "scans", root / "monai")
    return {"bundle": bundle, "scan": scan, "theirs": theirs}


def _dice(a, b) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_an_imported_bundle_predicts_what_monais_bundle_runner_predicts(spleen, tmp_path):
    import SimpleITK as sitk

    imported = cli("models", "import-bundle", spleen["bundle"], "--name", "spleen")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "imported spleen v0.5.9: 1 classes (spleen), CT, into spleen/"
    done = cli("predict", spleen["scan"], "-o", tmp_path / "ours.nii.gz", "--model", "spleen", "--force")
    assert done.returncode == 0, done.stderr
    ours, theirs = (sitk.ReadImage(str(p)) for p in (tmp_path / "ours.nii.gz", spleen["theirs"]))
    assert ours.GetSize() == theirs.GetSize() == sitk.ReadImage(str(spleen["scan"])).GetSize()
    np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
    ours, theirs = (sitk.GetArrayFromImage(image).astype(int) for image in (ours, theirs))
    assert min((theirs == c).mean() for c in (0, 1)) > 0.2, "both classes cover a good part of the scan"
    scores = [_dice(ours == c, theirs == c) for c in (0, 1)]
    assert min(scores) >= 0.99, scores
    shown = cli("models", "show", "spleen", "--json")
    card = json.loads(shown.stdout)
    assert card["pipeline"]["kind"] == "monai_bundle" and card["network"]["architecture"] == "MonaiBundleNetwork"
    assert [label["name"] for label in card["labels"]] == ["background", "spleen"]
    assert not any(str(v).startswith("$") for v in json.dumps(card["pipeline"]["bundle"]).split('"'))


def test_a_bundle_reports_progress_per_window_and_cancels_between_windows(spleen):
    from napari_medseg.core.bundle import model_from_bundle
    from napari_medseg.core.errors import Cancelled
    from napari_medseg.core.inference import InferenceSettings, segment
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import Model

    network, card = model_from_bundle(spleen["bundle"])
    volume = read_volume(spleen["scan"])
    seen = []

    def stop_at_the_first_window(fraction, message):
        seen.append(message)
        if message.startswith("window"):
            raise Cancelled()

    with pytest.raises(Cancelled):
        segment(volume.layer_data(), volume.geometry.layer_affine_ras, Model(network, card),
                InferenceSettings(device="cpu"), progress=stop_at_the_first_window)
    assert seen[-1].startswith("window 1 of ")


def test_a_ct_bundle_refuses_an_mr_scan_in_one_line(spleen, tmp_path):
    from dicom_factory import pyradiomics_scan

    assert cli("models", "import-bundle", spleen["bundle"], "--name", "spleen-scope").returncode == 0
    done = cli("predict", pyradiomics_scan("brain1"), "-o", tmp_path / "mask.nii.gz", "--model", "spleen-scope")
    assert done.returncode != 0 and not (tmp_path / "mask.nii.gz").exists()
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("napari-medseg: error:") and "CT" in last and "MR" in last, done.stderr


def test_model_pt_carrying_code_is_refused_and_the_code_never_runs(spleen, tmp_path):
    class RunsCode:
        def __init__(self, path):
            self.path = str(path)

        def __reduce__(self):
            return (open, (self.path, "w"))

    folder = tmp_path / "bundle"
    shutil.copytree(spleen["bundle"], folder)
    marker = tmp_path / "code-ran"
    state = torch.load(folder / "models" / "model.pt", weights_only=True)
    torch.save({**state, "extra": RunsCode(marker)}, folder / "models" / "model.pt")
    done = cli("models", "import-bundle", folder)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("napari-medseg: error: refusing the bundle's model.pt: it holds a pickled object of type io.open, "
                    "which could run code when loaded; only a plain state dict is read"), last
    assert not marker.exists()


def test_import_bundle_refuses_a_config_that_runs_code_in_one_line(spleen, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(spleen["bundle"], folder)
    marker = tmp_path / "code-ran"
    config = read_config(folder)
    config["preprocessing"]["transforms"][3]["pixdim"] = f"$open({str(marker)!r}, 'w') and [1.5, 1.5, 2.0]"
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    done = cli("models", "import-bundle", folder)
    assert done.returncode != 0 and not marker.exists()
    assert "'preprocessing::transforms::3::pixdim' is a Python expression" in done.stderr.strip().splitlines()[-1]


def test_an_imported_bundle_says_what_it_does_not_offer(spleen):
    from napari_medseg.core.card import ModelError
    from napari_medseg.core.errors import MedsegError
    from napari_medseg.core.explain import explain
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import ModelRegistry

    from napari_medseg.core.bundle import import_bundle

    registry = ModelRegistry()
    import_bundle(spleen["bundle"], registry, name="spleen-offers")
    with pytest.raises(ModelError, match="prediction only; fine-tuning it is not offered"):
        registry.load("spleen-offers", for_training=True)
    volume = read_volume(spleen["scan"])
    with pytest.raises(MedsegError, match=r"does not offer gradcam maps \(it offers: none\)"):
        explain(volume.layer_data(), volume.geometry.layer_affine_ras, registry.load("spleen-offers"), "gradcam")


def test_a_torchscript_only_bundle_predicts_with_its_tensors_in_the_allow_listed_network(spleen, tmp_path):
    """models/model.ts (the zoo's TorchScript export) without model.pt: its weights are read
    into the network that network_def names, and the prediction is MONAI's runner's."""
    import warnings

    import SimpleITK as sitk

    from napari_medseg.core.bundle import build_sections

    folder = tmp_path / "bundle"
    shutil.copytree(spleen["bundle"], folder)
    network = build_sections(read_config(folder))["network_def"].eval()
    network.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(network), str(folder / "models" / "model.ts"))
    (folder / "models" / "model.pt").unlink()
    imported = cli("models", "import-bundle", folder, "--name", "spleen-ts")
    assert imported.returncode == 0, imported.stderr
    done = cli("predict", spleen["scan"], "-o", tmp_path / "ours.nii.gz", "--model", "spleen-ts")
    assert done.returncode == 0, done.stderr
    ours, theirs = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(int)
                    for p in (tmp_path / "ours.nii.gz", spleen["theirs"]))
    assert min(_dice(ours == c, theirs == c) for c in (0, 1)) >= 0.99
    card = json.loads(cli("models", "show", "spleen-ts", "--json").stdout)
    assert card["provenance"]["weights_file"] == "models/model.ts" and card["explain"] == []

    config = read_config(folder)
    del config["network_def"]
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    refused = cli("models", "import-bundle", folder, "--name", "spleen-ts2")
    assert refused.returncode != 0
    assert "has no network_def" in refused.stderr.strip().splitlines()[-1]


# -- several sequences: the zoo's BraTS bundle --------------------------------------------------

def test_the_brats_bundle_takes_four_sequences_and_gives_monais_runners_labels(tmp_path):
    """The zoo's brats_mri_segmentation configs (four MR sequences, three sigmoid regions, and
    its Lambdad that writes labels 1, 2 and 4) on four sequences from a real brain MR: our
    prediction is MONAI's own runner's, label for label, in the source geometry. Its
    Lambdad text runs as our own function; a Lambdad we do not know is refused."""
    import SimpleITK as sitk

    from bundle_factory import brats_scans, build_brats

    scans = brats_scans(tmp_path / "scans")
    bundle = build_brats(tmp_path, scans)
    env = {**__import__("os").environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "home")}
    imported = cli("models", "import-bundle", bundle, "--name", "brats", env=env)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported brats v0.5.2: 3 classes (tumor core (not enhancing), "
                                      "whole tumor (not tumor core), enhancing tumor), MR"), imported.stdout
    card = json.loads(cli("models", "show", "brats", "--json", env=env).stdout)
    assert card["channels"] == ["T1c", "T1", "T2", "FLAIR"]
    done = cli("predict", *scans, "-o", tmp_path / "ours.nii.gz", "--model", "brats", env=env)
    assert done.returncode == 0, done.stderr
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
               "--bundle_root", str(bundle), "--dataset_dir", str(tmp_path / "scans"),
               "--output_dir", str(tmp_path / "monai")]
    ran = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    (theirs_path,) = (tmp_path / "monai").rglob("*.nii.gz")
    ours_image, theirs_image = sitk.ReadImage(str(tmp_path / "ours.nii.gz")), sitk.ReadImage(str(theirs_path))
    assert ours_image.GetSize() == theirs_image.GetSize() == sitk.ReadImage(str(scans[0])).GetSize()
    np.testing.assert_allclose(ours_image.GetDirection(), theirs_image.GetDirection(), atol=1e-6)
    ours, theirs = (sitk.GetArrayFromImage(i).astype(int) for i in (ours_image, theirs_image))
    assert set(np.unique(theirs)) == {0, 1, 2, 4}
    scores = {v: _dice(ours == v, theirs == v) for v in (1, 2, 4)}
    print("brats:", {v: round(float((theirs == v).mean()), 3) for v in (0, 1, 2, 4)}, scores)
    assert min(scores.values()) >= 0.99, scores

    config = read_config(bundle)
    config["postprocessing"]["transforms"][3]["func"] = "$lambda x: x * 2"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    refused = cli("models", "import-bundle", bundle, "--name", "brats2", env=env)
    assert refused.returncode != 0
    assert "'postprocessing::transforms::3::func' is a function written in the bundle" in refused.stderr, \
        refused.stderr
