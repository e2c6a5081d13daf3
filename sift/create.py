"""Moved to sift.workspace.create; this import path keeps working for one more release."""

import sys

import sift.workspace.create as _moved

sys.modules[__name__] = _moved
