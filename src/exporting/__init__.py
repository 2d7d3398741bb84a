"""Exporting the trained classifier for devices: the model a device runs (uint8 pixels in, class
probabilities out), its conversion to ONNX and LiteRT, and running the exported files."""
