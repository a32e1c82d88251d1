"""A tiny, safe, bounded expression language for mapping files.

Mapping files compute config fields and expected tensor shapes from config values
(``hidden_size // num_attention_heads``, ``not tie_word_embeddings``). Python's ``eval`` would
let a data file run code; this evaluator accepts only names, literals (also lists and dicts),
arithmetic (``**`` included), comparisons, boolean logic, conditional expressions, indexing and
slicing, ``d.get(key[, default])`` on a dict, list/generator comprehensions over values the
expression already has (``all(t == 'full_attention' for t in layer_types)``), and a few pure
functions (``len sum min max all any int float abs range``). No attribute access, no other calls.

Evaluation is bounded: a mapping file (perhaps a user's, perhaps hostile) cannot make it run long
or allocate much. Every evaluation has a step budget; ``**`` refuses exponents and results past
a few thousand bits; repeating or joining strings and lists refuses results past
`MAX_ITEMS` elements, and so do all the values one evaluation builds together; a source longer than `MAX_SOURCE` characters is refused unparsed.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from .errors import MappingError

#: the most elements (characters, items) one evaluation may build, all values together (a few MB)
MAX_ITEMS = 1 << 18
#: the most AST nodes one evaluation may visit (comprehension iterations count)
MAX_STEPS = 1_000_000
#: the most characters of an expression's source
MAX_SOURCE = 10_000
#: the largest integer an expression may build, in bits (a 4096-bit number is far beyond any width)
MAX_INT_BITS = 4096

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
def _range(*bounds: int) -> list[int]:
    """``range`` as a list (per-layer patterns over layer indices), bounded like every built value."""
    r = range(*bounds)
    if len(r) > MAX_ITEMS:
        raise LimitExceeded(f"range{bounds} has more than {MAX_ITEMS} elements")
    return list(r)


_FUNCTIONS = {"len": len, "sum": sum, "min": min, "max": max, "all": all, "any": any, "int": int, "float": float,
              "abs": abs, "range": _range}
_CONSTANTS = {"None": None, "True": True, "False": False}


class UnknownName(MappingError):
    """An expression referred to a name the environment does not define."""

    def __init__(self, name: str, source: str):
        super().__init__(f"expression {source!r} uses {name!r}, which is not defined")
        self.name = name


class LimitExceeded(MappingError):
    """An expression would run too long or build too large a value."""


@lru_cache(maxsize=4096)
def _parse(source: str) -> ast.Expression:
    if len(source) > MAX_SOURCE:
        raise LimitExceeded(f"expression of {len(source)} characters is longer than {MAX_SOURCE}")
    try:
        return ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise MappingError(f"cannot parse expression {source!r}: {exc.msg}") from None


def evaluate(source: str | int | float | bool | None, env: Mapping[str, Any]) -> Any:
    """Evaluate ``source`` against ``env``; non-string literals pass through."""
    if not isinstance(source, str):
        return source
    return _Evaluator(env, source).run(_parse(source).body)


def names_in(source: str | int | float | bool | None) -> set[str]:
    """Free names an expression reads (used to validate mapping files up front): not the called
    functions, not the variables its comprehensions bind."""
    if not isinstance(source, str):
        return set()
    return set(_free_names(source))


@lru_cache(maxsize=4096)
def _free_names(source: str) -> frozenset[str]:
    """`names_in` of one expression text, once per process: included families repeat the same rules,
    and every mapping is validated at start-up."""
    tree = _parse(source)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    bound = {t.id for n in ast.walk(tree) if isinstance(n, ast.comprehension)
             for t in ast.walk(n.target) if isinstance(t, ast.Name)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called}
    return frozenset(names - bound - set(_CONSTANTS))


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _check_value(value: Any, source: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise LimitExceeded(f"expression {source!r} builds an integer of more than {MAX_INT_BITS} bits")
    if _size(value) > MAX_ITEMS:
        raise LimitExceeded(f"expression {source!r} builds a value of more than {MAX_ITEMS} elements")
    return value


def _power(a: Any, b: Any, source: str) -> Any:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        bits = abs(a).bit_length() if isinstance(a, int) else 64
        if abs(b) > MAX_INT_BITS or (isinstance(b, int) and b > 0 and bits * b > MAX_INT_BITS):
            raise LimitExceeded(f"expression {source!r}: {a!r} ** {b!r} is too large")
    return a ** b


def _mult(a: Any, b: Any, source: str) -> Any:
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > MAX_ITEMS:
            raise LimitExceeded(f"expression {source!r} repeats a sequence past {MAX_ITEMS} elements")
    return a * b


def _add(a: Any, b: Any, source: str) -> Any:
    if _size(a) + _size(b) > MAX_ITEMS:
        raise LimitExceeded(f"expression {source!r} joins sequences past {MAX_ITEMS} elements")
    return a + b


_BINARY = {
    ast.Add: _add,
    ast.Sub: lambda a, b, s: a - b,
    ast.Mult: _mult,
    ast.FloorDiv: lambda a, b, s: a // b,
    ast.Div: lambda a, b, s: a / b,
    ast.Mod: lambda a, b, s: a % b,
    ast.Pow: _power,
}


#: nodes whose value is newly built (a literal, a repetition, a join, a comprehension)
_BUILDERS = (ast.BinOp, ast.List, ast.Tuple, ast.Dict, ast.ListComp, ast.GeneratorExp)


class _Evaluator:
    """One evaluation: the environment, the comprehension variables in scope and the step budget."""

    def __init__(self, env: Mapping[str, Any], source: str):
        self.env, self.source, self.steps, self.built = env, source, 0, 0
        self.local: dict[str, Any] = {}

    def run(self, node: ast.AST) -> Any:
        try:
            return self.eval(node)
        except (ZeroDivisionError, OverflowError, TypeError, KeyError, IndexError, ValueError) as exc:
            raise MappingError(f"expression {self.source!r} fails: {type(exc).__name__}: {exc}") from None

    def _tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise LimitExceeded(f"expression {self.source!r} takes more than {MAX_STEPS} steps")

    def eval(self, node: ast.AST) -> Any:
        self._tick()
        value = _check_value(self._eval(node), self.source)
        if isinstance(node, _BUILDERS):  # a new value: count it against the evaluation's allocation budget
            self.built += _size(value)
            if self.built > MAX_ITEMS:
                raise LimitExceeded(f"expression {self.source!r} builds more than {MAX_ITEMS} elements in all")
        return value

    def _eval(self, node: ast.AST) -> Any:
        src = self.source
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            if node.id in self.local:
                return self.local[node.id]
            if node.id not in self.env:
                raise UnknownName(node.id, src)
            return self.env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](self.eval(node.left), self.eval(node.right), src)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            value = self.eval(node.operand)
            return (not value) if isinstance(node.op, ast.Not) else (-value if isinstance(node.op, ast.USub) else +value)
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                return all(self.eval(v) for v in node.values)
            return any(self.eval(v) for v in node.values)
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for op, comparator in zip(node.ops, node.comparators):
                right = self.eval(comparator)
                if type(op) not in _COMPARE or not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body if self.eval(node.test) else node.orelse)
        if isinstance(node, ast.Subscript):
            return self.eval(node.value)[self.eval(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else self.eval(p) for p in (node.lower, node.upper, node.step)))
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(self.eval(e) for e in node.elts)
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, (ast.ListComp, ast.GeneratorExp)):
            return tuple(self._comprehension(node.elt, node.generators))
        if isinstance(node, ast.Call) and not node.keywords:
            return self._call(node)
        raise MappingError(f"expression {src!r}: {type(node).__name__} is not allowed in mapping files")

    def _call(self, node: ast.Call) -> Any:
        args = [self.eval(a) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and node.func.id not in self.local:
            return _FUNCTIONS[node.func.id](*args)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and 1 <= len(args) <= 2:
            target = self.eval(node.func.value)
            if isinstance(target, Mapping):
                return target.get(*args)
            raise MappingError(f"expression {self.source!r}: .get applies to a dict, not {type(target).__name__}")
        raise MappingError(f"expression {self.source!r}: only {', '.join(sorted(_FUNCTIONS))} and dict.get may be called")

    def _comprehension(self, elt: ast.AST, generators: Sequence[ast.comprehension]) -> list[Any]:
        """``[elt for target in iterable if cond ...]``, targets plain names (or tuples of them)."""
        gen, rest = generators[0], generators[1:]
        if gen.is_async:
            raise MappingError(f"expression {self.source!r}: async comprehensions are not allowed")
        iterable = self.eval(gen.iter)
        if isinstance(iterable, Mapping):
            iterable = list(iterable)
        if not isinstance(iterable, (list, tuple, str)):
            raise MappingError(f"expression {self.source!r}: a comprehension iterates over a list, not {type(iterable).__name__}")
        out: list[Any] = []
        saved = dict(self.local)
        try:
            for item in iterable:
                self._tick()
                self._bind(gen.target, item)
                if all(self.eval(cond) for cond in gen.ifs):
                    out.extend(self._comprehension(elt, rest) if rest else [self.eval(elt)])
                    if len(out) > MAX_ITEMS:
                        raise LimitExceeded(f"expression {self.source!r} builds a list of more than {MAX_ITEMS} elements")
        finally:
            self.local = saved
        return out

    def _bind(self, target: ast.AST, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.local[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (list, tuple)) and len(value) == len(target.elts):
            for t, v in zip(target.elts, value):
                self._bind(t, v)
        else:
            raise MappingError(f"expression {self.source!r}: a comprehension binds names (or tuples of names)")
