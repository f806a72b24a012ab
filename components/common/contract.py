"""The component contract: a stage declares its name, version, config slice and named inputs and
outputs, and its cache key is a hash of exactly those things plus its code.

Cache key = sha256 of (name, version, run seed, code hash, config slice without `resources`, the cache
keys of its inputs, fingerprints of external files). Output paths and resources never enter it. The code
hash covers the component's module and every `components.*` module it imports, transitively, read
as a syntax tree so comments and formatting do not count. Config-schema modules (`*.config`,
`components.schema`) are left out of the code hash: what they produce, the config values, is in the
key already, and adding a field for one stage must not invalidate every other stage's cache.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from components.common.config import select, to_dict

ConfigT = TypeVar("ConfigT")
PACKAGE = "components"
KEY_EXCLUDED_FIELDS = frozenset({"resources"})


@dataclasses.dataclass
class StageResult:
    """What a stage reports besides the files it wrote: metrics (numbers) and artifacts to log."""

    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: list[str] = dataclasses.field(default_factory=list)  # paths relative to the entry folder


@dataclasses.dataclass
class StageContext(Generic[ConfigT]):
    """Everything a running stage may use: its config slice, input folders, output folders."""

    config: ConfigT
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    workdir: Path  # the staging folder; outputs live under it
    seed: int = 0
    log_metrics: Callable[[dict[str, float], int | None], None] = lambda metrics, step: None
    tracking_uri: str = ""  # the MLflow store the pipeline records to ('' when tracking is off)
    run_id: str = ""  # this step's MLflow run ('' when tracking is off)


@dataclasses.dataclass(frozen=True)
class Component(Generic[ConfigT]):
    name: str
    version: str
    config_path: str  # dotted path of its slice in the pipeline config, e.g. "data.basic_filters"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    run: Callable[[StageContext[ConfigT]], StageResult]
    optional_inputs: tuple[str, ...] = ()
    # Extra key material from the config (e.g. fingerprints of external files the stage reads).
    external_fingerprint: Callable[[ConfigT], dict[str, Any]] | None = None
    # Config fields left out of the key besides `resources` (e.g. `path`, when fingerprinted instead).
    key_exclude: tuple[str, ...] = ()
    # What the stage uses of its slice, as a typed object (e.g. one VLM stage's settings out of `train.vlm`):
    # the stage receives it, its cache key holds it, MLflow logs it as the step's params. None: the slice.
    view: Callable[[Any], Any] | None = None
    # Checks of the stage's config against the machine (local weight files, environment variables) that
    # the runner makes before any step runs: '' when fine, else what is wrong, with the key and the fix.
    preflight: Callable[[Any], str] | None = None

    def config_of(self, root: Any) -> Any:
        """This stage's config out of the whole pipeline config: its slice, through `view` if it has one."""
        sliced = select(root, self.config_path)
        return self.view(sliced) if self.view is not None else sliced

    @property
    def module(self) -> str:
        """The importable module name, also when the component's file runs as `python -m ...`."""
        name = self.run.__module__
        if name == "__main__":
            spec = getattr(sys.modules["__main__"], "__spec__", None)
            name = spec.name if spec is not None else name
        return name

    def code_hash(self) -> str:
        return code_hash(self.module)

    def key_material(self, config: ConfigT, input_keys: dict[str, str], seed: int = 0) -> dict[str, Any]:
        material: dict[str, Any] = {
            "component": self.name,
            "version": self.version,
            "seed": seed,  # run.seed: every stage may draw from it
            "code": self.code_hash(),
            "config": strip_excluded(to_dict(config), KEY_EXCLUDED_FIELDS | set(self.key_exclude)),
            "inputs": dict(sorted(input_keys.items())),
        }
        if self.external_fingerprint is not None:
            material["external"] = self.external_fingerprint(config)
        return material

    def cache_key(self, config: ConfigT, input_keys: dict[str, str], seed: int = 0) -> str:
        return hash_material(self.key_material(config, input_keys, seed))


def component(
    *,
    name: str,
    version: str,
    config: str,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...],
    optional_inputs: tuple[str, ...] = (),
    external_fingerprint: Callable[[Any], dict[str, Any]] | None = None,
    key_exclude: tuple[str, ...] = (),
    view: Callable[[Any], Any] | None = None,
    preflight: Callable[[Any], str] | None = None,
) -> Callable[[Callable[[StageContext[Any]], StageResult]], Component[Any]]:
    """Declare a stage: `@component(name=..., version=..., config="data.x", inputs=(...), outputs=(...))`."""

    def wrap(run: Callable[[StageContext[Any]], StageResult]) -> Component[Any]:
        return Component(
            name=name,
            version=version,
            config_path=config,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            run=run,
            optional_inputs=tuple(optional_inputs),
            external_fingerprint=external_fingerprint,
            key_exclude=tuple(key_exclude),
            view=view,
            preflight=preflight,
        )

    return wrap


def file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    """External files as key material by path, size and mtime (for files written once, atomically)."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def strip_excluded(tree: Any, excluded: frozenset[str] | set[str] = KEY_EXCLUDED_FIELDS) -> Any:
    """Drop fields such as `resources` (where and how wide a stage runs) from a config tree, at any depth."""
    if isinstance(tree, dict):
        return {k: strip_excluded(v, excluded) for k, v in tree.items() if k not in excluded}
    if isinstance(tree, list):
        return [strip_excluded(v, excluded) for v in tree]
    return tree


def hash_material(material: dict[str, Any]) -> str:
    blob = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=None)
def code_hash(module: str) -> str:
    """Hash of a module's syntax tree and those of the `components.*` modules it imports."""
    digest = hashlib.sha256()
    for name in sorted(_module_closure(module)):
        digest.update(name.encode())
        digest.update(_normalised_source(_module_file(name)).encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _normalised_source(path: Path) -> str:
    """The module's syntax tree without its docstrings: like comments and layout, they do not change what a
    step computes, so editing one keeps the step's cache entries (and every step downstream of it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def _module_file(module: str) -> Path:
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__file__", None):
        return Path(loaded.__file__)
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of module {module!r}")
    return Path(spec.origin)


def _module_closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in _imported_project_modules(current) if not is_schema_module(m))
    return seen


def is_schema_module(module: str) -> bool:
    """Modules that only declare config dataclasses (their values enter the key instead)."""
    return module == "components.schema" or module.rsplit(".", 1)[-1] == "config"


@functools.lru_cache(maxsize=None)
def _imported_project_modules(module: str) -> tuple[str, ...]:
    tree = ast.parse(_module_file(module).read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names if _is_project(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _is_project(node.module):
            found.append(node.module)
            for alias in node.names:  # `from components.data import ingest` imports a module
                candidate = f"{node.module}.{alias.name}"
                if importlib.util.find_spec(node.module) and _is_module(candidate):
                    found.append(candidate)
    return tuple(found)


def _is_project(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
