"""The docs' build helpers: Sphinx roles become autorefs links; examples are included whole.

The griffe test is skipped where griffe (a docs dependency) is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "docs" / "griffe_sphinx_roles.py"
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


def test_the_data_plane_page_includes_the_runnable_example() -> None:
    # A formatter once rewrote the include line as Python ("--8 < --..."), and
    # the page then showed that line instead of the example.
    lines = (ROOT / "docs" / "data-plane.md").read_text().splitlines()
    assert '--8<-- "examples/tiers_pipeline.py"' in lines
    assert (ROOT / "examples" / "tiers_pipeline.py").is_file()


def test_roles_become_optional_links_resolved_from_the_docstrings_object() -> None:
    griffe = pytest.importorskip("griffe")
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
