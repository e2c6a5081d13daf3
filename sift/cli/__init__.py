"""The `sift` command line: one module per command group, each command a thin call into the
library (parse, take the lock, call one function, print). Results go to stdout (JSON with
--json); logs and progress to stderr; bad input exits 2 with one `sift: error:` line."""

import importlib

from sift.cli.app import app, main

# each group module registers its commands; `sift --help` lists them in this order
for _group in ("data_train", "merge", "serve", "exact", "evaluation"):
    importlib.import_module(f"sift.cli.{_group}")

__all__ = ["app", "main"]
