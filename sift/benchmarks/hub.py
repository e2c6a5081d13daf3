"""One table of a benchmark, from the Hugging Face hub or from a local copy.

On the hub a benchmark's tables are (config, split) pairs read with `datasets.load_dataset(repo,
config, split=split)`. A local copy is a folder with one file per table, named as the hub names it:
`<config>.parquet` (or `.json`/`.jsonl`) where the config has a single split `train` (TOFU), else
`<config>/<split>.parquet` (MUSE). That is how the tests and an offline machine hold them; the
column names and types are the hub's, so both roads give the same rows.

Nothing read here is left in ~/.cache: the hub road uses a throw-away cache (a later forget could
not reach a copy there), as sift.data does for every other source.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sift.errors import SiftError

_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def local_table(folder: Path, config: str, split: str) -> Path | None:
    """The file of (config, split) in a local copy, or None when it holds none."""
    stems = [folder / config / split] + ([folder / config] if split == "train" else [])
    for stem in stems:
        for suffix in _SUFFIXES:
            path = stem.with_name(stem.name + suffix)
            if path.is_file():
                return path
    return None


def dataset_rows(name: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The rows of `datasets.load_dataset(*args, **kwargs)`, read through a throw-away cache; any
    failure is one line naming `name`, and no rows is an error. sift.data reads files with it too."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="sift-datasets-") as cache:
        try:
            ds = datasets.load_dataset(*args, cache_dir=cache, keep_in_memory=True, **kwargs)
        except Exception as exc:  # datasets raises many types; the user needs one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise SiftError(f"could not read {name}: {type(exc).__name__}: {first}") from None
        rows = ds.to_list()
    if not rows:
        raise SiftError(f"{name} holds no rows")
    return rows


def read_table(source: str, config: str, split: str = "train") -> list[dict[str, Any]]:
    """The rows of one (config, split): `source` is a hub repo name or a local folder."""
    name = f"{source} {config}/{split}"
    folder = Path(source)
    if not folder.is_dir():
        return dataset_rows(name, source, config, split=split)
    path = local_table(folder, config, split)
    if path is None:
        raise SiftError(
            f"{source} holds no table {config}/{split} (looked for {config}.parquet|json "
            f"and {config}/{split}.parquet|json)"
        )
    return dataset_rows(name, _SUFFIXES[path.suffix], data_files=str(path), split="train")


def require_columns(rows: list[dict[str, Any]], columns: tuple[str, ...], where: str) -> None:
    """Every row has every column the benchmark's card names (a wrong copy fails here, by name)."""
    missing = sorted({c for r in rows for c in columns if c not in r})
    if missing:
        raise SiftError(f"{where}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")


def text_field(r: dict[str, Any], column: str, where: str, i: int) -> str:
    """A non-empty string cell of row i (a wrong copy fails here, naming the row and column)."""
    v = r.get(column)
    if not isinstance(v, str) or not v.strip():
        raise SiftError(f"{where} row {i + 1}: {column!r} must be a non-empty string")
    return v
