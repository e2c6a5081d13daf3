"""Moved to sift.serving.http.app; this import path keeps working for one more release."""

import sys

import sift.serving.http.app as _moved

sys.modules[__name__] = _moved
