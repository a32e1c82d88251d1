"""A tiny, safe expression language for mapping files.

Mapping files compute config fields and expected tensor shapes from config
values (``hidden_size // num_attention_heads``, ``not tie_word_embeddings``).
Python's ``eval`` would let a data file run code; this evaluator accepts only
names, literals (also lists and dicts), arithmetic, comparisons, boolean logic and a
few pure functions (``len``, ``sum``, ``min``, ``max``, ``all``, ``any``, ``int``, ``float``).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from .errors import MappingError

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


#: the only calls an expression may make (pure, on values the expression already has)
_FUNCTIONS = {"len": len, "sum": sum, "min": min, "max": max, "all": all, "any": any, "int": int, "float": float}


class UnknownName(MappingError):
    """An expression referred to a name the environment does not define."""

    def __init__(self, name: str, source: str):
        super().__init__(f"expression {source!r} uses {name!r}, which is not defined")
        self.name = name


@lru_cache(maxsize=None)
def _parse(source: str) -> ast.Expression:
    try:
        return ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise MappingError(f"cannot parse expression {source!r}: {exc.msg}") from None


def evaluate(source: str | int | float | bool | None, env: Mapping[str, Any]) -> Any:
    """Evaluate ``source`` against ``env``; non-string literals pass through."""
    if not isinstance(source, str):
        return source
    return _eval(_parse(source).body, env, source)


def names_in(source: str | int | float | bool | None) -> set[str]:
    """Names an expression reads (used to validate mapping files up front)."""
    if not isinstance(source, str):
        return set()
    tree = _parse(source)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called} - {"None", "True", "False"}


def _eval(node: ast.AST, env: Mapping[str, Any], source: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ("None", "True", "False"):
            return {"None": None, "True": True, "False": False}[node.id]
        if node.id not in env:
            raise UnknownName(node.id, source)
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, env, source), _eval(node.right, env, source))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        value = _eval(node.operand, env, source)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, env, source) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env, source)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval(comparator, env, source)
            if type(op) not in _COMPARE or not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env, source) else node.orelse, env, source)
    if isinstance(node, ast.Subscript):
        return _eval(node.value, env, source)[_eval(node.slice, env, source)]
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_eval(e, env, source) for e in node.elts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_eval(k, env, source): _eval(v, env, source) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        return _FUNCTIONS[node.func.id](*(_eval(a, env, source) for a in node.args))
    raise MappingError(f"expression {source!r}: {type(node).__name__} is not allowed in mapping files")
