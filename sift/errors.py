"""One exception type for every user-facing failure, so the CLI can print one clear line."""


class SiftError(Exception):
    """A problem the user can fix (bad input, wrong workspace state); printed as one line, exit 2."""


class WorkspaceBusy(SiftError):
    """Another sift command holds the workspace lock."""
