"""Griffe extension: Sphinx roles in kvtier's docstrings become cross-references on the site.

kvtier's docstrings use Sphinx roles (``:class:`~kvtier.tiers.index.TierIndex```,
``:meth:`pin```), which read well in ``help()`` and editors; mkdocstrings
renders Markdown and would print them raw. This rewrites each role, when the
site is built, into an *optional* autorefs link: a link when the target is
documented on the site, plain code otherwise (so ``mkdocs build --strict``
never fails on a reference to a private helper). The source is unchanged.

* ``:class:`~pkg.mod.Name``` shows ``Name``; ``:class:`pkg.mod.Name``` shows
  the whole path; ``:meth:`title <pkg.mod.Name.method>``` shows ``title``;
* a name is looked up from the docstring's object outward (its own
  members, a method's siblings, the module's, where an imported name stands
  for its origin), then among the members of the module's classes (a module
  docstring naming a method of its class); a dotted name that no scope
  knows is a full path.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Alias, Extension, Object

_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<text>[^`]+)`")
_TITLED = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>", flags=re.DOTALL)


def _identifier(obj: Object, target: str) -> str:
    """The full path ``target`` most likely names, seen from ``obj``'s docstring."""
    target = target.removesuffix("()")
    scopes: list[Object] = [obj]
    parent = obj.parent
    while parent is not None:
        scopes.append(parent)
        parent = parent.parent
    head, _, rest = target.partition(".")
    for scope in scopes:
        member = scope.members.get(head)
        if member is not None:
            base = member.target_path if isinstance(member, Alias) else member.path
            return f"{base}.{rest}" if rest else base
    if rest:  # a dotted name no scope knows: a full path
        return target
    for member in obj.module.members.values():
        if not member.is_alias and member.is_class and head in member.all_members:
            return f"{member.path}.{target}"
    return f"{obj.module.path}.{target}"


def _link(obj: Object, match: re.Match[str]) -> str:
    text = " ".join(match["text"].split())  # a role may wrap across lines
    titled = _TITLED.fullmatch(text)
    target = titled["target"] if titled else text
    identifier = _identifier(obj, target)
    short = target.rsplit(".", 1)[-1] if match["tilde"] else target
    title = titled["title"] if titled else short
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


class SphinxRoles(Extension):
    """Rewrite Sphinx roles in every docstring once the object tree is built."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring (the tree is complete: parents and members are known)."""
        docstring = obj.docstring
        if docstring is not None and ":" in docstring.value:
            docstring.value = _ROLE.sub(lambda match: _link(obj, match), docstring.value)
