"""Moved to sift.merge.driver; this import path keeps working for one more release."""

import sys

import sift.merge.driver as _moved

sys.modules[__name__] = _moved
