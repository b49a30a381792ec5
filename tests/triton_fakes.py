"""Stand-ins for Triton's triton_python_backend_utils, for model.py files run in the tests (the
`pb_utils` fixture in conftest.py installs them): a request is a dict name -> array."""

from __future__ import annotations

import numpy as np


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.tensors = {t.name: t.array for t in output_tensors or []}
        self.error = error


class FakeError:
    def __init__(self, message):
        self.message = message
