"""YAML for untrusted recipe text: ``yaml.SafeLoader`` plus limits on size, depth, aliases and keys.

``yaml.safe_load`` builds no objects, but it still accepts what hurts later: an alias "billion
laughs" is a few hundred bytes that expand to billions of nodes the moment anything walks them
(an error message's ``repr()`` once took 2.75 GB and 51 s), 20,000 nested brackets overflow the
composer's recursion, and a repeated key silently keeps the last value. :func:`load_yaml` refuses
all of these with :class:`~nmrestore.errors.RecipeError`.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nmrestore.errors import RecipeError, short_repr

#: Largest recipe text in bytes (the shipped recipes are under 2 KB).
MAX_BYTES = 1 << 20
#: Deepest nesting of sections, lists and mappings (recipes use 4).
MAX_DEPTH = 32
#: Most nodes once every alias is expanded (the shipped recipes have under 200).
MAX_NODES = 100_000


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts depth while composing and refuses duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # Composing recurses once per level: stop before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise RecipeError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise RecipeError(
                        f"duplicate key {short_repr(key, 40)} (line {key_node.start_mark.line + 1})"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _expanded_size(root: Node) -> int:
    """Nodes in the document with every alias expanded, computed once per distinct node.

    A recursive alias (a node inside itself) has no finite expansion and is refused.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: no recursion, whatever the shape
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = min(MAX_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if key in sizes:
            continue
        if key in active:
            raise RecipeError("a recursive alias (an anchor used inside itself)")
        active.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the text: the CLI answers in one line."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())[:200]


def load_yaml(text: str | bytes, source: str = "recipe") -> Any:
    """Parse one YAML document under the limits above; :class:`RecipeError` naming ``source``."""
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{source}: more than {MAX_BYTES:,} bytes, the most a recipe may have")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    loader = None
    try:
        loader = _LimitedLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise RecipeError(f"more than {MAX_NODES:,} values once its aliases are expanded")
        return loader.construct_document(node)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML ({_one_line(exc)})") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
