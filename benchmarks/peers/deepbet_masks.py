"""Brain masks from deepbet (Fisch et al. 2024, MIT), the peer for the brain-t1 model.

Runs in its own virtual environment (``benchmarks/peers/setup_deepbet.sh`` makes it),
because deepbet pins its own dependencies. deepbet ships TorchScript models, which
``torch.jit.load`` reads as code-free graphs; nothing of it is imported by napari-medseg.

    python deepbet_masks.py IN.nii.gz OUT_MASK.nii.gz [IN OUT ...]

Prints one JSON line per image: {"image": ..., "mask": ..., "seconds": ...}.
"""

import json
import sys
import time

import nibabel as nib
import torch


def main(paths: list) -> None:
    from deepbet import BrainExtraction

    torch.set_num_threads(max(1, torch.get_num_threads()))
    extractor = BrainExtraction(no_gpu=True)
    for source, target in zip(paths[::2], paths[1::2]):
        started = time.perf_counter()
        _, mask, _ = extractor.run(source)
        nib.save(mask, target)
        print(json.dumps({"image": source, "mask": target, "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
