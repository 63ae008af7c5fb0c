"""Whether a JSON schema admits any finite document, checked before a request is admitted.

llguidance compiles a schema whose required properties refer back to it
({"properties": {"n": {"$ref": "#"}}, "required": ["n"]}) without complaint; generation then
nests forever and fails mid-stream. Every subschema is finite when some document satisfies it
using only finite subschemas: a least fixed point over the schema's nodes, computed children
first so that a tree settles in one pass and each $ref cycle in a few more.
"""

from __future__ import annotations

# A schema this large is left to llguidance's own limits (each pass visits every node).
MAX_NODES = 5000
_CHILD_KEYS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_CHILD_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_CHILD_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def _children(node: dict) -> list:
    out = []
    for key in _CHILD_KEYS:
        if isinstance(node.get(key), dict):
            out.extend(node[key].values())
    for key in _CHILD_LISTS:
        if isinstance(node.get(key), list):
            out.extend(node[key])
    for key in _CHILD_ONE:
        if key in node:
            out.append(node[key])
    return [c for c in out if isinstance(c, (dict, bool))]


def _resolve(root, ref: str):
    """A local reference ("#", "#/$defs/x"); None for anything else (not checked)."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in (p for p in ref[1:].split("/") if p):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, (dict, bool)) else None


def _post_order(root) -> list | None:
    """Every subschema, children before parents; None past MAX_NODES."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen or not isinstance(node, dict):
            continue
        seen.add(id(node))
        if len(seen) > MAX_NODES:
            return None
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node))
    return order


def _finite(node, root, done: set[int]) -> bool:
    def ok(child) -> bool:
        if isinstance(child, bool):
            return child
        return not isinstance(child, dict) or id(child) in done

    if isinstance(node.get("$ref"), str):
        target = _resolve(root, node["$ref"])
        if target is not None and not ok(target):
            return False
    if isinstance(node.get("allOf"), list) and not all(ok(c) for c in node["allOf"]):
        return False
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list) and node[key] and not any(ok(c) for c in node[key]):
            return False
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = node.get("required") if isinstance(node.get("required"), list) else []
    if any(isinstance(name, str) and name in props and not ok(props[name]) for name in required):
        return False
    min_items = node.get("minItems")
    if isinstance(min_items, int) and min_items >= 1 and "items" in node and not ok(node["items"]):
        return False
    return True


def admits_finite_document(schema) -> bool:
    """False only when every document the schema allows would be infinitely nested."""
    if not isinstance(schema, dict):
        return schema is not False
    order = _post_order(schema)
    if order is None:
        return True
    done: set[int] = set()
    changed = True
    while changed and id(schema) not in done:
        changed = False
        for node in order:
            if id(node) not in done and _finite(node, schema, done):
                done.add(id(node))
                changed = True
    return id(schema) in done
