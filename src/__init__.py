"""Experiment-tracked transfer learning for image classification."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing on CPU machines, oneDNN notes) hides the
# pipeline's own log; keep warnings and errors. Set TF_CPP_MIN_LOG_LEVEL=0 to see it all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
