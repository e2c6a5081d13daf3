"""Moved to sift.routing.routers; this import path keeps working for one more release."""

import sys

import sift.routing.routers as _moved

sys.modules[__name__] = _moved
