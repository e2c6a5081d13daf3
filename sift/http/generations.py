"""Moved to sift.serving.http.generations; this import path keeps working for one more release."""

import sys

import sift.serving.http.generations as _moved

sys.modules[__name__] = _moved
