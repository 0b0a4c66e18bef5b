"""edgefleet converters: one trained model → the best .tflite artifact per device profile.

Importing this package (or any module in it) does not import TensorFlow; see docs/converters.md.
"""
