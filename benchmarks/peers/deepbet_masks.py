"""Brain masks from deepbet (Fisch et al. 2024, MIT), the peer for the brain-t1 model.

Runs in its own virtual environment (``benchmarks/peers/setup_deepbet.sh`` makes it),
because deepbet needs its own dependencies. deepbet loads its TorchScript models with
``torch.jit.load``. That is deepbet's choice, and it stays in this separate process:
napari-medseg never imports deepbet or loads its files.

    python deepbet_masks.py IN.nii.gz OUT_MASK.nii.gz [IN OUT ...]

Prints one JSON line per image: {"image": ..., "mask": ..., "seconds": ...}.
"""

import json
import sys
import time

import nibabel as nib


def main(paths: list) -> None:
    from deepbet import BrainExtraction

    extractor = BrainExtraction(no_gpu=True)
    for source, target in zip(paths[::2], paths[1::2]):
        started = time.perf_counter()
        _, mask, _ = extractor.run(source)
        nib.save(mask, target)
        print(json.dumps({"image": source, "mask": target, "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
