"""Brain masks from deepbet's own package (Fisch et al. 2024, MIT), the peer of the brain models.

Runs in its own process, with deepbet's own code end to end, so its time and memory are
its own. Besides deepbet's final mask it writes the raw mask (its network output at its
0.5 threshold, before its largest-component and fill-voids steps), so that both can be
judged.

    python deepbet_masks.py IN.nii.gz OUT_MASK.nii.gz [IN OUT ...]

Prints one JSON line per image: {"image", "mask", "raw", "seconds"}.
"""

import json
import sys
import time

import nibabel as nib
import numpy as np


def main(paths: list) -> None:
    from deepbet import BrainExtraction
    from deepbet.utils import reoriented_nifti

    extractor = BrainExtraction(no_gpu=True)
    for source, target in zip(paths[::2], paths[1::2]):
        started = time.perf_counter()
        _, mask, _ = extractor.run(source)
        seconds = time.perf_counter() - started
        nib.save(mask, target)
        image = nib.load(source)
        x = nib.as_closest_canonical(image).get_fdata(dtype=np.float32)
        raw = extractor.run_model(np.ascontiguousarray(x[..., 0] if x.ndim == 4 else x)) > 0.5
        raw_path = target.replace(".nii.gz", ".raw.nii.gz")
        nib.save(reoriented_nifti(raw.astype(np.uint8), image.affine, image.header), raw_path)
        print(json.dumps({"image": source, "mask": target, "raw": raw_path, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
