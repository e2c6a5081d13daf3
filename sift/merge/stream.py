"""Moved to sift.tensorio (safetensors read and written one tensor at a time: a foundation that
models and merge share); this import path keeps working for one more release."""

import sys

import sift.tensorio as _moved

sys.modules[__name__] = _moved
