"""Readers never see half a model: while folders are swapped in, every file of the served folder
can be opened at any moment and is whole (the old version or the new one)."""

from __future__ import annotations

import threading

from sift.fsio import _exchange, replace_dir, staging_dir


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not _exchange(a, b):  # pragma: no cover - a system without renameat2
        return
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_reader_never_finds_the_folder_missing_or_mixed(tmp_path):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "config.json").write_text("0")
    (final / "model.safetensors").write_text("0")
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:  # as a loader does: open each file by its path, read it whole
        while not stop.is_set():
            for name in ("config.json", "model.safetensors"):
                try:
                    text = (final / name).read_text()
                    seen.append("ok" if text.isdigit() else f"torn {name}: {text!r}")
                except FileNotFoundError:
                    seen.append(f"missing {name}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(1, 300):
            staged = staging_dir(final)
            (staged / "config.json").write_text(str(version))
            (staged / "model.safetensors").write_text(str(version))
            replace_dir(staged, final)
    finally:
        stop.set()
        reader.join()
    assert (final / "model.safetensors").read_text() == "299"
    assert seen and set(seen) == {"ok"}, sorted(set(seen))
    assert not [p for p in tmp_path.iterdir() if p.name != "merged"]  # nothing left behind
