"""Moved to sift.workspace.view; this import path keeps working for one more release."""

import sys

import sift.workspace.view as _moved

sys.modules[__name__] = _moved
