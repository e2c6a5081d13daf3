"""The layout: old import paths of the previous release still import (and are the moved
modules), the public API loads lazily from `import sift`, the log level follows -v/-q, and the
docs list every module and link only to files that exist."""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# old module -> (the module it moved to, a name both must give)
MOVED = {
    "sift.serve": ("sift.merge.driver", "merge_workspace"),
    "sift.serving.folder": ("sift.merge.served", "write_served"),
    "sift.serving.route": ("sift.routing.routers", "KeysIndex"),
    "sift.evaluate": ("sift.evaluation.recall", "normalize"),
    "sift.http": ("sift.serving.http", "create_app"),
    "sift.http.app": ("sift.serving.http.app", "create_app"),
    "sift.http.generations": ("sift.serving.http.generations", "Generations"),
    "sift.forget": ("sift.exact.forget", "resume_pending_forget"),
    "sift.verify": ("sift.exact.verify", "served_files"),
    "sift.audit": ("sift.exact.audit", "audit"),
    "sift.snapshot": ("sift.workspace.view", "WorkspaceView"),
    "sift.create": ("sift.workspace.create", "create_workspace"),
    "sift.merge.stream": ("sift.tensorio", "TensorFile"),
    "sift.generate": ("sift.serving.generate", "greedy_answers"),
}
# names that moved out of a module that stays
RE_EXPORTED = {
    "sift.data": {
        "read_manifest": "sift.workspace.rows",
        "write_workspace_rows": "sift.workspace.rows",
        "read_workspace_rows": "sift.workspace.rows",
        "write_manifest": "sift.workspace.rows",
    },
    "sift.siftmasks.store": {"DELTA_FILE": "sift.adapters", "load_dense_adapter": "sift.adapters"},
    "sift.siftmasks.signs": {"pack_bits": "sift.tensorio", "unpack_bits": "sift.tensorio"},
    "sift.siftmasks.tune": {"target_weights": "sift.models"},
    "sift.serving.route": {"normalize_text": "sift.data"},
    "sift.train": {
        "completion_loss": "sift.train.lora",
        "tokenize_rows": "sift.train.lora",
        "canonical_adapter_config": "sift.train.lora",
        "SLICES_DIR": "sift.train.sisa",
        "slice_of": "sift.train.sisa",
        "slice_epochs": "sift.train.sisa",
        "stage_hash": "sift.train.sisa",
        "read_stages": "sift.train.sisa",
        "parse_shard_spec": "sift.train.ranks",
        "launch_rank": "sift.train.ranks",
        "rank_shards": "sift.train.ranks",
        "stderr_progress": "sift.train.progress",
    },
    "sift.unlearn.run": {"UnlearnSettings": "sift.unlearn.settings", "Counter": "sift.unlearn.methods"},
    "sift.unlearn.masks": {"MASKS": "sift.unlearn.settings", "WAGLE_GAMMA": "sift.unlearn.settings"},
    "sift.unlearn.sparsity": {"L1_DEFAULT": "sift.unlearn.methods"},
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_still_work(old):
    new, name = MOVED[old]
    module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", sorted(RE_EXPORTED))
def test_names_that_moved_are_re_exported(old):
    module = importlib.import_module(old)
    for name, new in RE_EXPORTED[old].items():
        assert getattr(module, name) is getattr(importlib.import_module(new), name), name


def test_monkeypatching_an_old_path_reaches_the_moved_module(monkeypatch):
    import sift.exact.forget
    import sift.forget

    sentinel = object()
    monkeypatch.setattr(sift.forget, "merge_workspace", sentinel)
    assert sift.exact.forget.merge_workspace is sentinel


def test_public_api_is_lazy_and_complete():
    code = (
        "import sys, sift\n"
        "assert 'torch' not in sys.modules, 'import sift loaded torch'\n"
        "from sift.exact.forget import forget\n"
        "from sift.exact.verify import verify\n"
        "assert sift.forget is forget and sift.verify is verify\n"
        "import sift.forget\n"  # the old module path: sift.forget stays callable
        "assert callable(sift.forget) and sift.forget.forget is forget\n"
        "for name in sift.__all__: getattr(sift, name)\n"
        "print(len(sift.__all__))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    import sift

    for name in ("Workspace", "create_workspace", "train_shards", "merge_workspace", "forget", "verify", "evaluate"):
        assert name in sift.__all__ and callable(getattr(sift, name))
    with pytest.raises(AttributeError):
        sift.no_such_call  # noqa: B018


def test_log_level_follows_the_cli_flags(capsys):
    from sift.logs import configure, get_logger

    log = get_logger("sift.test")
    try:
        configure(0)
        log.info("shown at the default level")
        log.debug("hidden at the default level")
        configure(-1)
        log.info("hidden with -q")
        log.warning("a warning with -q")
        configure(1)
        log.debug("shown with -v")
    finally:
        root = logging.getLogger("sift")
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(logging.NOTSET)
        root.propagate = True
    err = capsys.readouterr().err.splitlines()
    assert err == ["shown at the default level", "a warning with -q", "shown with -v"]


@pytest.mark.slow  # over 10 s on 2 cores; keeps the default run under 10 minutes
def test_quiet_cli_flag_silences_progress(tmp_path, facts):
    from conftest import write_rows

    data = write_rows(tmp_path / "rows.jsonl", facts[:8])
    args = [
        "train-shards",
        "--data",
        str(data),
        "--model",
        "builtin-tiny",
        "--num-shards",
        "2",
        "--epochs",
        "1",
        "--lora-r",
        "2",
    ]
    loud = subprocess.run(
        [sys.executable, "-m", "sift.cli", *args, "-w", str(tmp_path / "a")], capture_output=True, text=True
    )
    quiet = subprocess.run(
        [sys.executable, "-m", "sift.cli", "-q", *args, "-w", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "sift: workspace" in loud.stderr and "trained" in loud.stderr
    assert quiet.stderr.strip() == "" and quiet.stdout.startswith("trained 2 shard(s) (2 steps")


def _modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT / "sift")) for p in (ROOT / "sift").rglob("*.py"))


def test_architecture_page_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for m in _modules() if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not describe: {missing}"


def test_docs_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
