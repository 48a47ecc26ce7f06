"""`eztinker.__all__` is the package's public surface, exactly."""

from __future__ import annotations

import types

import eztinker


def test_all_lists_exactly_the_public_names():
    for name in eztinker.__all__:  # the client's names load on first use; a missing one raises here
        getattr(eztinker, name)
    public = {
        name
        for name, value in vars(eztinker).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    exported = set(eztinker.__all__) - {"__version__"}
    assert sorted(public - exported) == [], "public but not in __all__"
    assert sorted(exported - public) == [], "in __all__ but not defined"
    assert len(eztinker.__all__) == len(set(eztinker.__all__)), "duplicates in __all__"


def test_everything_in_all_exists_and_star_import_works():
    for name in eztinker.__all__:
        assert hasattr(eztinker, name), name
    namespace: dict = {}
    exec("from eztinker import *", namespace)
    assert set(eztinker.__all__) <= set(namespace)
    assert isinstance(eztinker.__version__, str) and eztinker.__version__
