"""Serial link to microcontrollers (protocol in Python and C99). Filled in by the serial-bridge issue.

Must never import TensorFlow.
"""
