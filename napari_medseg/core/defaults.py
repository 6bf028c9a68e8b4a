"""Defaults the command line, the widgets and the engine share (importing this loads no torch)."""

# Compute devices a user can choose; "auto" takes CUDA, then Apple MPS, then the CPU.
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "auto = CUDA, then Apple MPS, then the CPU"
# The minimum overlap of neighbouring sliding windows, as a fraction of the model's patch.
DEFAULT_OVERLAP = 0.125
