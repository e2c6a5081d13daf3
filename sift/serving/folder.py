"""Moved to sift.merge.served; this import path keeps working for one more release."""

import sys

import sift.merge.served as _moved

sys.modules[__name__] = _moved
