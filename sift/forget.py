"""Moved to sift.exact.forget; this import path keeps working for one more release.

`sift.forget` is also the public function (``import sift; sift.forget(...)``), and importing this old
module path binds that attribute to the module: so the module is made callable (it calls the
function), and it is the moved module itself, so patching either path patches both."""

import sys
import types

import sift.exact.forget as _moved


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.forget(*args, **kwargs)


_moved.__class__ = _CallableModule
sys.modules[__name__] = _moved
