"""MONAI bundles, read as data: a bundle's config is code, and is never evaluated as it stands.

MONAI's ``ConfigParser`` runs a ``$``-expression as Python, and a ``_target_`` may name
any importable callable. Here only the sections a prediction needs are built
(``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``), and only from:

* ``_target_`` classes on an allow-list: ``monai.networks.nets.*`` for the network,
  ``monai.transforms.*`` for the transforms, ``monai.inferers.*`` for the inferer;
* literal arguments, and ``@key`` references to other entries, resolved the same way.

Anything else (a ``$``-expression, a ``%`` macro, ``_mode_``, a class outside the
allow-list) is refused with one line that names the offending key, before anything is
built. The built objects are MONAI's own, so the transforms are MONAI's, not a copy.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

from .errors import MedsegError

SECTIONS = {"network_def": "monai.networks.nets", "preprocessing": "monai.transforms",
            "inferer": "monai.inferers", "postprocessing": "monai.transforms"}
# Transforms that write files or talk to the outside: our own writer stores the result.
LEFT_OUT = {"SaveImage", "SaveImaged"}
SPECIAL_KEYS = {"_target_", "_disabled_", "_requires_", "_desc_"}


class BundleError(MedsegError):
    """A bundle's config asks for something that is not data."""


def read_config(bundle: str | Path, name: str = "inference.json") -> dict:
    path = Path(bundle) / "configs" / name
    if not path.is_file():
        raise BundleError(f"'{Path(bundle).name}' is not a MONAI bundle (no configs/{name})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read configs/{name}: {exc}") from None
    if not isinstance(config, dict):
        raise BundleError(f"configs/{name} is not an object of named entries")
    return config


class _Builder:
    def __init__(self, config: dict, source: str):
        self.config, self.source = config, source
        self.built: dict = {}
        self.resolving: list = []

    def section(self, key: str):
        if key not in self.config:
            raise BundleError(f"{self.source} has no '{key}'")
        return self.reference(key, SECTIONS[key])

    def reference(self, key: str, package: str):
        if key in self.built:
            return self.built[key]  # the same object: Invertd must see the preprocessing that ran
        if key in self.resolving:
            raise BundleError(f"{self.source}: '{key}' refers to itself through {' -> '.join(self.resolving)}")
        path = key.split("::")
        value = self.config
        for part in path:
            try:
                value = value[int(part)] if isinstance(value, list) else value[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise BundleError(f"{self.source}: the reference '@{key}' names nothing") from None
        self.resolving.append(key)
        try:
            self.built[key] = result = self.value(value, key, package)
        finally:
            self.resolving.pop()
        return result

    def value(self, value, where: str, package: str):
        if isinstance(value, str):
            if value.startswith("$"):
                raise BundleError(f"{self.source}: '{where}' is a Python expression ({value[:60]!r}); "
                                  "a bundle's code is never run")
            if value.startswith("%"):
                raise BundleError(f"{self.source}: '{where}' is a macro that reads another file ({value[:60]!r})")
            if value.startswith("@"):
                return self.reference(value[1:], package)
            return value
        if isinstance(value, list):
            return [self.value(item, f"{where}::{index}", package) for index, item in enumerate(value)]
        if isinstance(value, dict):
            if "_target_" in value:
                return self.component(value, where, package)
            return {key: self.value(item, f"{where}::{key}", package) for key, item in value.items()}
        return value

    def component(self, spec: dict, where: str, package: str):
        if "_mode_" in spec:
            raise BundleError(f"{self.source}: '{where}::_mode_' asks for a callable, not a component")
        if spec.get("_disabled_") is True:
            return None
        cls = allowed_class(spec["_target_"], package, f"{where}::_target_", self.source)
        if cls.__name__ in LEFT_OUT:
            return None  # its arguments (an output folder, often an expression) are never read
        kwargs = {key: self.value(item, f"{where}::{key}", package)
                  for key, item in spec.items() if key not in SPECIAL_KEYS}
        if cls.__name__ == "Compose" and isinstance(kwargs.get("transforms"), list):
            kwargs["transforms"] = [t for t in kwargs["transforms"] if t is not None]  # left out or disabled
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{self.source}: '{where}' ({cls.__name__}) cannot be built: "
                              f"{str(exc).splitlines()[0]}") from None


def allowed_class(target, package: str, where: str, source: str = "the bundle"):
    """A class named by ``_target_``, only from ``package`` (short names are looked up there)."""
    if not isinstance(target, str) or not target.replace(".", "").replace("_", "").isalnum():
        raise BundleError(f"{source}: '{where}' is {target!r}, not the name of a {package} class")
    name = target[len(package) + 1:] if target.startswith(package + ".") else target
    if "." in name or name.startswith("_"):
        raise BundleError(f"{source}: '{where}' names {target!r}, which is not in {package}; refused")
    cls = getattr(importlib.import_module(package), name, None)
    if not inspect.isclass(cls):
        raise BundleError(f"{source}: '{where}' names {target!r}, which is not a {package} class; refused")
    return cls


def build_sections(config: dict, source: str = "inference.json") -> dict:
    """``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing``, built from literals
    and allow-listed MONAI classes; missing optional sections are None."""
    builder = _Builder(config, source)
    out = {"network_def": builder.section("network_def")}
    for key in ("preprocessing", "inferer", "postprocessing"):
        out[key] = builder.section(key) if key in config else None
    return out
