"""The exception tree: every exception the bridge defines is in bridge/errors.py, under
BridgeError, and drawn in its docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import bridge
from bridge import errors


def _bridge_modules() -> list[str]:
    mods = pkgutil.walk_packages(bridge.__path__, "bridge.")
    return [m.name for m in mods if not m.name.endswith("__main__")]  # __main__ runs the CLI


def test_every_exception_of_the_bridge_is_a_bridge_error_defined_in_errors() -> None:
    found: dict[str, type[BaseException]] = {}
    for name in _bridge_modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("bridge"):
                found[f"{name}.{obj.__name__}"] = obj
    misplaced = sorted(k for k, cls in found.items() if cls.__module__ != "bridge.errors")
    assert misplaced == []
    outside = sorted(k for k, cls in found.items() if not issubclass(cls, errors.BridgeError))
    assert outside == []
    assert "bridge.amqp.Unroutable" in found  # the walk sees the re-exports too


def test_the_docstring_tree_names_every_exception_and_its_parent() -> None:
    doc = errors.__doc__ or ""
    tree = {
        line.split("── ", 1)[1].split()[0].rstrip("*"): line.index("── ")
        for line in doc.splitlines()
        if "── " in line
    }
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, BaseException)
    }
    assert set(tree) == set(classes) - {"BridgeError"}
    for name, cls in classes.items():
        if name == "BridgeError":
            continue
        parent = next(b for b in cls.__mro__[1:] if b.__module__ == "bridge.errors")
        if parent is errors.BridgeError:
            assert tree[name] == min(tree.values()), name
        else:
            assert tree[name] > tree[parent.__name__], name
        # `*` marks the ones that are also ValueErrors
        starred = any(
            line.split("── ", 1)[1].split()[0] == f"{name}*"
            for line in doc.splitlines()
            if "── " in line
        )
        assert starred == issubclass(cls, ValueError), name
