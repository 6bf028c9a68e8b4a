"""Defaults the command line, the widgets and the engine share (importing this loads no torch)."""

# Compute devices a user can choose; "auto" takes CUDA, then Apple MPS, then the CPU.
DEVICES = ("auto", "cpu", "cuda", "mps")
# How a prediction tiles the grid: as the model's card declares, or always our engine's plan.
WINDOW_CHOICES = ("card", "ours")
DEVICE_HELP = "auto = CUDA, then Apple MPS, then the CPU"
# The minimum overlap of neighbouring sliding windows, as a fraction of the model's patch.
DEFAULT_OVERLAP = 0.125
# Fine-tuning from the correction queue: the CLI's and the Correct widget's defaults.
FINETUNE_STEPS = 50
FINETUNE_TOLERANCE = 0.01         # the largest drop of validation Dice that still promotes
FINETUNE_REPLAY = 4               # earlier accepted corrections replayed against forgetting
FINETUNE_LEARNING_RATE = 1e-5
