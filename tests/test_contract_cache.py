"""Cache keys (what changes them, what does not) and the atomic artifact store."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components.common.cache import STAGING_PREFIX, ArtifactCache, Manifest, remove_abandoned_staging
from components.common.contract import StageContext, StageResult, code_hash, component
from components.common.resources import Resources
from components.data.basic_filters import basic_filters
from components.data.config import BasicFiltersConfig, IngestConfig, SourceConfig
from components.data.ingest import ingest


def test_key_changes_with_config_slice_and_inputs_not_resources() -> None:
    cfg = BasicFiltersConfig()
    base = basic_filters.cache_key(cfg, {"samples": "k1"})
    assert base == basic_filters.cache_key(BasicFiltersConfig(), {"samples": "k1"})
    assert base != basic_filters.cache_key(dataclasses.replace(cfg, min_short_side=150), {"samples": "k1"})
    assert base != basic_filters.cache_key(cfg, {"samples": "k2"})
    wider = dataclasses.replace(cfg, resources=Resources(num_cpus=4, concurrency=8, batch_size=4096))
    assert base == basic_filters.cache_key(wider, {"samples": "k1"})


def test_key_ignores_source_paths_but_not_contents(tmp_path: Path) -> None:
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "x.txt").write_text("a caption")
    key_a = ingest.cache_key(IngestConfig(sources=[SourceConfig("folder", str(tmp_path / "a"), name="s")]), {})
    key_b = ingest.cache_key(IngestConfig(sources=[SourceConfig("folder", str(tmp_path / "b"), name="s")]), {})
    assert key_a == key_b  # same files in another place
    (tmp_path / "b" / "x.txt").write_text("another caption")
    key_b2 = ingest.cache_key(IngestConfig(sources=[SourceConfig("folder", str(tmp_path / "b"), name="s")]), {})
    assert key_b2 != key_a


def _write_component_module(folder: Path, body: str) -> None:
    package = folder / "components" / "scratch"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text(textwrap.dedent(body))


def _code_hash_in_subprocess(folder: Path) -> str:
    """Hash a scratch module in a fresh interpreter with `folder` first on the path."""
    repo = Path(__file__).resolve().parent.parent
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "import components; components.__path__.insert(0, sys.argv[1] + '/components');"
        "from components.common.contract import code_hash; print(code_hash('components.scratch.stage'))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(folder), str(repo)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_code_hash_follows_code_not_comments_or_docstrings(tmp_path: Path) -> None:
    body = """
        from components.data.config import ShardsConfig
        def run(x):
            return x + 1
    """
    _write_component_module(tmp_path, body)
    first = _code_hash_in_subprocess(tmp_path)
    _write_component_module(tmp_path, body.replace("return x + 1", "return x + 1  # a comment\n"))
    assert _code_hash_in_subprocess(tmp_path) == first
    documented = body.replace("        from", '        """A module."""\n        from')
    _write_component_module(tmp_path, documented.replace("def run(x):", 'def run(x):\n            """Add one."""'))
    assert _code_hash_in_subprocess(tmp_path) == first
    _write_component_module(tmp_path, body.replace("return x + 1", 'y = "not a docstring"\n            return x + 1'))
    assert _code_hash_in_subprocess(tmp_path) != first
    _write_component_module(tmp_path, body.replace("x + 1", "x + 2"))
    assert _code_hash_in_subprocess(tmp_path) != first


def test_code_hash_covers_imported_project_modules() -> None:
    # basic_filters imports components.data.lib.table; its hash must differ from a module without it
    assert code_hash("components.data.basic_filters") != code_hash("components.data.config")
    from components.common.contract import _module_closure

    closure = _module_closure("components.data.basic_filters")
    assert {"components.data.lib.table", "components.common.cache"} <= closure
    # schema modules are left out: their values are in the key, and a new field for another stage
    # must not invalidate this one
    assert "components.data.config" not in closure and "components.schema" not in closure


@component(name="toy", version="1", config="toy", outputs=("out",))
def _toy(ctx: StageContext[dict]) -> StageResult:
    return StageResult()


def _manifest(key: str) -> Manifest:
    return Manifest(component="toy", version="1", cache_key=key, key_material={}, outputs={"out": "out"},
                    files={}, metrics={}, created_at=0.0, duration_s=0.0)


def test_publish_is_atomic_and_missing_files_are_misses(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    assert cache.lookup("toy", "k") is None
    with cache.staging("toy", "k") as staged:
        (staged / "out").mkdir()
        (staged / "out" / "a.bin").write_bytes(b"12345")
        assert cache.lookup("toy", "k") is None  # nothing visible before publish
        cache.publish(staged, _manifest("k"))
    manifest = cache.lookup("toy", "k")
    assert manifest is not None and manifest.files == {"out/a.bin": 5}
    (cache.entry("toy", "k") / "out" / "a.bin").write_bytes(b"123")  # size changed
    assert cache.lookup("toy", "k") is None
    (cache.entry("toy", "k") / "out" / "a.bin").unlink()
    assert cache.lookup("toy", "k") is None


def test_failed_attempt_leaves_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.staging("toy", "k") as staged:
            (staged / "half.bin").write_bytes(b"x")
            raise RuntimeError("stage crashed")
    assert list((tmp_path / "toy").iterdir()) == []


def test_abandoned_staging_of_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    abandoned = tmp_path / f"{STAGING_PREFIX}k-{dead_pid}-abcd1234"
    live = tmp_path / f"{STAGING_PREFIX}k-{os.getpid()}-abcd1234"
    abandoned.mkdir()
    live.mkdir()
    removed = remove_abandoned_staging(tmp_path)
    assert removed == [abandoned] and live.exists()


def test_manifest_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(_manifest("k").to_json())
    assert Manifest.from_file(path) == _manifest("k")
    assert json.loads(path.read_text())["cache_key"] == "k"


def test_run_seed_enters_the_key() -> None:
    cfg = BasicFiltersConfig()
    assert basic_filters.cache_key(cfg, {"samples": "k1"}, seed=0) != basic_filters.cache_key(cfg, {"samples": "k1"},
                                                                                              seed=1)


def test_training_steps_keys_do_not_depend_on_the_evaluation_code() -> None:
    """An edit to the scoring, the verifiers or the evaluation step must not retrain every VLM stage: those
    modules stay out of the training steps' code closures (and so out of their cache keys)."""
    from components.common.contract import _module_closure

    evaluation = {"components.vlm.evaluate", "components.vlm.eval_tasks", "components.vlm.verifiers",
                  "components.vlm.eval_gallery"}
    for module in ("components.vlm.stages", "components.vit.vit_pretrain"):
        assert not evaluation & _module_closure(module), module
