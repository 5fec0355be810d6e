"""The lines a native framework writes straight to stderr while it starts, kept from the user.

TensorFlow's C++ side logs through Abseil. Records logged before ``absl::InitializeLog()`` (at
import: the oneDNN notice, "Could not find cuda drivers") reach file descriptor 2 whatever
``TF_CPP_MIN_LOG_LEVEL`` says, each import of its two shared libraries repeating them under a
"WARNING: All log messages before absl::InitializeLog()" banner; and on a machine without a GPU
the first device query logs ``failed call to cuInit: ... UNKNOWN ERROR (303)`` as an error.
TFLite prints info lines of its own when it converts a model and when an interpreter starts.
None of that is the job's, so ``filtered_stderr`` catches descriptor 2 in a temporary file for
those moments, then writes back every line that ``startup_lines_kept`` keeps: all but the
Abseil records below the process's ``TF_CPP_MIN_LOG_LEVEL``, their banner, cuInit's report that
there is no GPU, and TFLite's info lines. Errors (cuInit failing on a machine with a GPU
included) and whatever Python wrote still show, in order; at level 0 every line does.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

# Abseil's record prefix: severity letter, MMDD, time, thread id, file:line] (e.g.
# "I0000 00:00:1796669010.608646   24195 port.cc:153] oneDNN custom operations are on").
_RECORD = re.compile(r"^([IWEF])\d{4} [0-9:.]+\s+\d+ [^\]\s]+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}  # as TF_CPP_MIN_LOG_LEVEL counts them
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = "Could not find cuda drivers on your machine"
_CUINIT = "failed call to cuInit"
# TFLite's info lines (its own logger, not Abseil's): the runtime's "INFO: Created TensorFlow
# Lite XNNPACK delegate for CPU." when an interpreter first allocates, and the int8 converter's
# print of its settings ("fully_quantize: 0, inference_type: 6, ...").
_TFLITE_INFO = ("INFO: ", "fully_quantize: ")
# cuInit's reasons on a machine with no GPU to use: no driver at all (the stub's line above comes
# first, the error code unnamed) or a driver without a device. Any other reason is a broken GPU.
_NO_GPU = ("CUDA_ERROR_NO_DEVICE", "no CUDA-capable device")


def startup_lines_kept(text: str, min_level: int) -> str:
    """``text`` (what reached stderr while a framework loaded) without the lines a process
    running at ``TF_CPP_MIN_LOG_LEVEL`` ``min_level`` should not show; all of it at level 0."""
    if min_level <= 0:
        return text
    no_driver = _NO_DRIVER in text
    kept = []
    for line in text.splitlines(keepends=True):
        record = _RECORD.match(line)
        if line.rstrip("\r\n") == _BANNER:
            continue
        if record and _SEVERITY[record.group(1)] < min_level:
            continue
        if record and _CUINIT in line and (no_driver or any(r in line for r in _NO_GPU)):
            continue
        if line.startswith(_TFLITE_INFO):
            continue
        kept.append(line)
    return "".join(kept)


def min_log_level() -> int:
    """The process's ``TF_CPP_MIN_LOG_LEVEL`` (0, every record, when unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Catch file descriptor 2 for the block, then write back what ``startup_lines_kept``
    keeps at the process's ``TF_CPP_MIN_LOG_LEVEL`` (also when the block raises)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = startup_lines_kept(caught.read().decode(errors="replace"), min_log_level())
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
