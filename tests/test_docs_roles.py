"""The docs' griffe extension turns Sphinx roles into optional autorefs links (mkdocs only).

Skipped where griffe (a docs dependency) is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe")

EXTENSION = Path(__file__).resolve().parents[1] / "docs" / "griffe_sphinx_roles.py"
MODULES = {
    "__init__.py": '"""Package."""',
    "index.py": '''
"""Module; see :meth:`holds` and :class:`~pkg.slots.Map`."""
from pkg.slots import Map


class Index:
    """Uses :meth:`holds`, :class:`Map` and :func:`pkg.slots.make`."""

    def holds(self) -> bool:
        """Sibling of :meth:`pin`; see :meth:`the map's take
        <pkg.slots.Map.take>`."""
        return True

    def pin(self) -> None:
        """Nothing."""
''',
    "slots.py": '''
"""Slots."""


class Map:
    def take(self) -> None:
        """Take."""


def make() -> Map:
    """Make."""
    return Map()
''',
}


def _link(identifier: str, title: str) -> str:
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def test_roles_become_optional_links_resolved_from_the_docstrings_object() -> None:
    extensions = griffe.load_extensions(f"{EXTENSION}:SphinxRoles")
    with griffe.temporary_visited_package("pkg", MODULES, extensions=extensions) as package:
        module = package["index"]
        index = module["Index"]
        assert module.docstring.value == (
            f"Module; see {_link('pkg.index.Index.holds', 'holds')} and "
            f"{_link('pkg.slots.Map', 'Map')}."
        )
        assert index.docstring.value == (
            f"Uses {_link('pkg.index.Index.holds', 'holds')}, "
            f"{_link('pkg.slots.Map', 'Map')} and {_link('pkg.slots.make', 'pkg.slots.make')}."
        )
        assert index["holds"].docstring.value == (
            f"Sibling of {_link('pkg.index.Index.pin', 'pin')}; see "
            f"{_link('pkg.slots.Map.take', 'the map' + chr(39) + 's take')}."
        )
        assert ":meth:" not in index["pin"].docstring.value
