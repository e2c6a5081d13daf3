"""Moved to sift.exact.audit; this import path keeps working for one more release."""

import sys

import sift.exact.audit as _moved

sys.modules[__name__] = _moved
