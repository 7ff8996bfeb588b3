"""Import TensorFlow quietly and once, with a clear error when the convert extra is missing.

The only module that imports tensorflow directly; everything else in converters asks it.
"""

from __future__ import annotations

import os

from edge_slm.errors import ConversionError


def tf():  # noqa: ANN201 - returns the tensorflow module
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow
    except ImportError as exc:
        raise ConversionError(
            "TensorFlow is not installed; conversion runs on the host: pip install 'edge-slm[convert]'"
        ) from exc
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    tensorflow.get_logger().setLevel("ERROR")
    return tensorflow


_console = None


def console():  # noqa: ANN201 - a text stream on the real stderr, even while TensorFlow is silenced
    global _console
    if _console is None:
        _console = os.fdopen(os.dup(2), "w", buffering=1)
    return _console


class silenced:
    """Send fd 1 and 2 (TensorFlow's C++ logs, Keras export prints) to a temp file for the duration.

    The last lines are kept in .tail for error messages; progress bars write to console().
    """

    def __enter__(self) -> silenced:
        import contextlib
        import io
        import sys
        import tempfile

        console()
        # Python-level prints (Keras export) go to sys.stdout, which is not always fd 1 (pytest, IDEs).
        self._py = contextlib.redirect_stdout(io.StringIO())
        self._py.__enter__()
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        self.tail = ""
        return self

    def __exit__(self, *exc: object) -> None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        os.close(self._saved[0])
        os.close(self._saved[1])
        self._file.seek(0)
        self.tail = self._file.read()[-4000:].decode("utf-8", "replace")
        self._file.close()
        self._py.__exit__(None, None, None)
