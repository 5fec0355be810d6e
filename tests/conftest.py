"""Import order for the whole test session: torch and torchvision before TensorFlow.

pytest imports every test module into one process, and the TensorFlow test modules sort before
the torch ones. Triton (loaded with torch) crashes when TensorFlow's bundled LLVM was loaded
first (DESIGN.md section 2), so torch goes first, whichever tests are selected.
"""

import os

import torch  # noqa: F401
import torchvision  # noqa: F401

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot needs Keras 2 (as the Makefile sets)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
