"""deepbet's own package on one head, as a user runs it: one process, its own code end to end.

    python deepbet_process.py IN.nii.gz OUT_MASK.nii.gz

Prints one JSON line: {"network_seconds", "seconds"} (the network calls inside
``BrainExtraction.run_model``, and the whole ``run``). The caller measures the process.
"""

import json
import sys
import time


def main(source: str, target: str) -> None:
    started = time.perf_counter()
    from deepbet import BrainExtraction

    extractor = BrainExtraction(no_gpu=True)
    network_seconds = []
    for name in ("model", "bbox_model"):
        scripted = getattr(extractor, name)

        def timed(*args, _scripted=scripted):
            begin = time.perf_counter()
            out = _scripted(*args)
            network_seconds.append(time.perf_counter() - begin)
            return out

        setattr(extractor, name, type("Timed", (), {"__call__": staticmethod(timed),
                                                     "parameters": scripted.parameters})())
    extractor.run(source, mask_path=target)
    print(json.dumps({"network_seconds": sum(network_seconds), "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
