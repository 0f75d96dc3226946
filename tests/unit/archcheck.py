"""Architecture checks for a package, from its source alone (``ast``; nothing is imported).

``check(root, layout)`` parses every module under the package directory ``root`` and
returns a ``Violation`` for each of:

  cycle    imports that loop. Every import that runs counts, lazy ones (inside a function)
           included; ``if TYPE_CHECKING:`` imports never run and do not count. A lazy import
           that points up a floor is left out: the layer rule already judges it, and an
           allowlisted lazy upward import is the one sanctioned way to break a loop. A cycle
           of module-level imports is ``hard``: no allowlist may excuse it.
  up       an import (lazy, typing-only or not) into a higher floor, or into a sibling unit on the same
           floor unless ``Layout.sideways`` lists that direction.
  impure   a module of a ``pure`` unit that imports a lower module not in ``pure_may_use``,
           or reaches one through module-level imports (an import inside
           ``try/except ImportError`` is optional and does not count).
  private  one module using another's underscore names: ``from m import _x``, ``m._x`` on an
           imported module, a private module (``_common``) imported from outside its package,
           and ``expr._x`` (or ``getattr(expr, "_x")``) where ``_x`` is defined by no class of
           the current module (``self``/``cls`` included: that catches mixins and bases
           living elsewhere). Dunders and the namedtuple API (``_replace``...) are public.
  size     a module or function over its budget of code lines: lines holding a token,
           not counting blank lines, comment-only lines and docstrings.

What counts as an import of module M: ``import M``, ``from M import name``, and
``from P import M`` where M is a submodule of P; a name in a lazy facade's ``_EXPORTS`` or
``_SUBMODULES`` (``from kvmpy import Machine``, ``kvmpy.Machine``) is an import of the module
it names. Importing ``P.M`` is not counted as importing P's ``__init__``.

A ``Violation`` has a stable, line-free ``key`` which allowlists name; the key of an
``expr._x`` read names the module and the attribute only, so one entry covers every such read.
"""
from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}
_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENDMARKER, tokenize.ENCODING}
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass
class Layout:
    floors: list[tuple[str, set[str]]]                    # bottom first: (name, units on it)
    sideways: dict[str, set[str]] = field(default_factory=dict)  # unit -> siblings it may import
    pure: set[str] = field(default_factory=set)           # units importable without the extension
    pure_may_use: set[str] = field(default_factory=set)   # lower modules a pure unit may use
    exempt: set[str] = field(default_factory=set)         # modules on no floor (a lazy facade)
    extensions: set[str] = field(default_factory=set)     # compiled modules, no .py source
    max_module_lines: int = 500
    max_function_lines: int = 60


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    lazy: bool = False          # inside a function: runs on first call, not at import
    typing_only: bool = False   # under ``if TYPE_CHECKING:``: never runs
    optional: bool = False      # in ``try: ... except ImportError``: the module works without it
    name: str | None = None     # ``from dst import name``, when name is not a module


@dataclass(frozen=True)
class Violation:
    key: str
    path: str
    line: int
    what: str
    why: str
    fix: str
    hard: bool = False          # no allowlist may excuse it
    lazy: bool = False          # every import behind it is lazy

    def __str__(self):
        return f"{self.path}:{self.line}: {self.what}\n    why: {self.why}\n    fix: {self.fix}\n    key: {self.key!r}"


@dataclass
class Module:
    name: str
    path: Path                  # relative to the package's parent (the repository root)
    is_pkg: bool
    source: str
    tree: ast.Module = field(init=False)

    def __post_init__(self):
        self.tree = ast.parse(self.source, str(self.path))


def load(root: Path) -> dict[str, Module]:
    """Every .py file under the package directory ``root``, by dotted name (not the build's
    output: ``_guests/``, the images ``make -C guests`` writes into the package)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if "_guests" in parts:
            continue
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        mods[name] = Module(name, path.relative_to(root.parent), is_pkg, path.read_text())
    return mods


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for h in node.handlers:
        for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]):
            if isinstance(t, ast.Name):
                names.add(t.id)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _contexts(node, ctx=(False, False, False)):
    """Every node under ``node`` with the (lazy, typing_only, optional) context it runs in."""
    def block(nodes, c):
        for n in nodes:
            yield n, c
            yield from _contexts(n, c)
    lazy, typing_only, optional = ctx
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, ctx
            yield from block(child.body, (lazy, True, optional))
            yield from block(child.orelse, ctx)
        elif isinstance(child, ast.Try) and _catches_import_error(child):
            yield child, ctx
            yield from block(child.body, (lazy, typing_only, True))
            yield from block(child.handlers + child.orelse + child.finalbody, ctx)
        else:
            yield child, ctx
            yield from _contexts(child, (True, typing_only, optional) if isinstance(child, _FUNCS) else ctx)


class Package:
    """The parsed package: its modules, facades, import edges and floors."""

    def __init__(self, root: Path, layout: Layout):
        self.layout, self.root = layout, root.name
        self.mods = load(root)
        self.known = set(self.mods) | layout.extensions
        self.facades = {m.name: _facade(m) for m in self.mods.values() if m.is_pkg}
        self.edges, self.binds = {}, {}
        for m in self.mods.values():
            self.edges[m.name], self.binds[m.name] = self._imports(m)

    def inside(self, name: str) -> bool:
        return name == self.root or name.startswith(self.root + ".")

    def resolve(self, base: str, name: str) -> tuple[str, bool]:
        """What ``from base import name`` depends on: (module, whether name is that module)."""
        if f"{base}.{name}" in self.known:
            return f"{base}.{name}", True
        return self.facades.get(base, {}).get(name, (base, False))

    def _imports(self, m: Module) -> tuple[list[Edge], dict[str, str | None]]:
        """m's edges into the package, and the names m binds to modules (None: outside it)."""
        edges, binds = [], {}
        for node, (lazy, typ, opt) in _contexts(m.tree):
            ctx = dict(lazy=lazy, typing_only=typ, optional=opt)
            if isinstance(node, ast.Import):
                for a in node.names:
                    top = a.name.split(".")[0]
                    if not self.inside(a.name):
                        binds[a.asname or top] = None
                        continue
                    dst = a.name
                    while dst not in self.known and "." in dst:
                        dst = dst.rsplit(".", 1)[0]
                    edges.append(Edge(m.name, dst, node.lineno, **ctx))
                    binds[a.asname or top] = dst if a.asname else top
            elif isinstance(node, ast.ImportFrom):
                base = _base(m, node)
                for a in node.names:
                    if not self.inside(base):
                        binds[a.asname or a.name] = None
                        continue
                    dst, is_mod = self.resolve(base, a.name)
                    edges.append(Edge(m.name, dst, node.lineno, name=None if is_mod else a.name, **ctx))
                    if is_mod:
                        binds[a.asname or a.name] = dst
        for node, (lazy, typ, opt) in _contexts(m.tree):       # kvmpy.Machine, x86.layout
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and binds.get(node.value.id):
                base = binds[node.value.id]
                dst, is_mod = self.resolve(base, node.attr)
                if dst != base:
                    edges.append(Edge(m.name, dst, node.lineno, lazy, typ, opt))
        return edges, binds

    def unit(self, module: str) -> str | None:
        best = None
        for _, units in self.layout.floors:
            for u in units:
                if (module == u or module.startswith(u + ".")) and (best is None or len(u) > len(best)):
                    best = u
        return best

    def floor(self, module: str) -> tuple[int, str]:
        u = self.unit(module)
        return next((i, name) for i, (name, units) in enumerate(self.layout.floors) if u in units)

    def is_up(self, e: Edge) -> bool:
        """Does e point up a floor, or sideways to a sibling unit it may not use?"""
        su, du = self.unit(e.src), self.unit(e.dst)
        if su is None or du is None or su == du:
            return False
        (sf, _), (df, _) = self.floor(e.src), self.floor(e.dst)
        return df > sf or (df == sf and du not in self.layout.sideways.get(su, set()))

    def where(self, module: str, line: int = 1) -> tuple[str, int]:
        m = self.mods.get(module)
        return (str(m.path) if m else module), line


def _base(m: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = m.name.split(".")[: None if m.is_pkg else -1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _facade(m: Module) -> dict[str, tuple[str, bool]]:
    """A lazy facade's table (its module-level ``_EXPORTS``/``_SUBMODULES`` dicts):
    name -> (module, whether the name is that module)."""
    out = {}
    for node in m.tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("_EXPORTS", "_SUBMODULES"):
            is_mod = node.targets[0].id == "_SUBMODULES"
            for name, rel in ast.literal_eval(node.value).items():
                out[name] = (f"{m.name}.{rel}", is_mod)
    return out


# --- the rules -------------------------------------------------------------------------

def check(root: Path, layout: Layout) -> list[Violation]:
    """Every violation in the package at ``root``, one per key (its first occurrence)."""
    pkg = Package(root, layout)
    found = {}
    every = [*check_floors(pkg), *check_cycles(pkg), *check_pure(pkg), *check_private(pkg), *check_size(pkg)]
    for v in sorted(every, key=lambda v: (v.path, v.line, v.key)):
        found.setdefault(v.key, v)
    return list(found.values())


def check_floors(pkg: Package):
    lay = pkg.layout
    for name in pkg.mods:
        if name not in lay.exempt and pkg.unit(name) is None:
            yield Violation(f"unplaced {name}", *pkg.where(name), f"{name} is on no floor",
                            "every module must have a place in the layers, or the guard cannot judge it",
                            "add its package to FLOORS (or EXEMPT if it is a lazy facade)")
    for name, edges in pkg.edges.items():
        for e in edges:
            if e.src in lay.exempt or e.dst in lay.exempt or not pkg.is_up(e):
                continue
            (_, sf), (_, df) = pkg.floor(e.src), pkg.floor(e.dst)
            lazy = all(x.lazy for x in edges if x.dst == e.dst)
            side = "sideways " if sf == df else ""
            yield Violation(f"up {e.src} -> {e.dst}", *pkg.where(e.src, e.line),
                            f"{e.src} ({sf}) imports {side}{e.dst} ({df}){' lazily' if lazy else ''}",
                            "imports point down only (DESIGN.md, Layers): a floor must work without "
                            "the floors above it and beside it",
                            "move what is shared down a floor, or have the caller pass it in "
                            "(an argument, a callback); a sideways direction that stays acyclic "
                            "may be added to SIDEWAYS with a reason", lazy=lazy)


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a loop (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _loop(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside members."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for w in sorted(graph.get(path[-1], ())):
            if w == start:
                return path + [w]
            if w in members and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return [start]


def check_cycles(pkg: Package):
    runs = [e for es in pkg.edges.values() for e in es
            if not e.typing_only and not (e.lazy and pkg.is_up(e)) and e.src != e.dst]
    graph, eager = {}, {}
    for e in runs:
        graph.setdefault(e.src, set()).add(e.dst)
        if not e.lazy:
            eager.setdefault(e.src, set()).add(e.dst)
    hard = {frozenset(c) for c in _sccs(eager)}
    for comp in _sccs(graph):
        loop = _loop(graph, comp[0], set(comp))
        lines = []
        for a, b in zip(loop, loop[1:]):
            e = min((e for e in pkg.edges[a] if e.dst == b and e in runs), key=lambda e: e.lazy)
            lines.append(f"{a} (line {e.line}{', lazy' if e.lazy else ''})")
        is_hard = frozenset(comp) in hard
        yield Violation(f"cycle {' '.join(comp)}", *pkg.where(loop[0]),
                        "import cycle: " + " -> ".join(lines) + f" -> {loop[0]}",
                        "modules in a loop are one unit: none can be read, tested or imported alone, "
                        "and import order starts to matter",
                        "move the piece both need into a lower module, or pass it in as an argument",
                        hard=is_hard, lazy=not is_hard)


def check_pure(pkg: Package):
    lay = pkg.layout
    pure = {n for n in pkg.known if pkg.unit(n) in lay.pure}
    ok = pure | lay.pure_may_use | lay.exempt

    def bad(e: Edge) -> bool:
        return e.dst not in ok and pkg.unit(e.dst) is not None and not pkg.is_up(e)

    why = "a pure module must import (and be unit-testable) without /dev/kvm and without the compiled extension"
    fix = "take plain values, dataclasses (kvm.regs) or a memory object as arguments; leave ioctls to the floor above"
    for src in sorted(pure & set(pkg.mods)):
        for e in pkg.edges[src]:
            if not e.typing_only and not e.optional and bad(e):
                yield Violation(f"impure {src} -> {e.dst}", *pkg.where(src, e.line),
                                f"{src} (pure) imports {e.dst}", why, fix)
        seen, todo = {src}, [(src, [src])]                    # what importing src pulls in
        while todo:
            mod, path = todo.pop()
            for e in pkg.edges.get(mod, []):
                if e.lazy or e.typing_only or e.optional or e.dst in seen:
                    continue
                seen.add(e.dst)
                if mod != src and bad(e):
                    yield Violation(f"impure {src} ->* {e.dst}", *pkg.where(src),
                                    f"importing {src} (pure) imports {e.dst}: {' -> '.join(path + [e.dst])}",
                                    why, fix)
                elif e.dst in ok:
                    todo.append((e.dst, path + [e.dst]))


def _own_privates(tree: ast.Module) -> set[str]:
    """Underscore names some class of this module defines (self._x = ..., class-body names)."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            own.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    own.add(stmt.name)
                targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                    [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
                for t in targets:
                    if isinstance(t, ast.Name):
                        own.add(t.id)
                        if t.id == "__slots__":
                            own.update(c.value for c in ast.walk(stmt.value) if isinstance(c, ast.Constant))
    return {n for n in own if isinstance(n, str) and _private(n)}


def check_private(pkg: Package):
    why = "an underscore name is private to its module (a private module to its package): " \
          "using it from outside couples you to insides the owner may change"
    fix = "give the owner a public name for what you need (a method, property, or save_state()/load_state()) " \
          "and use that; or move the code into the owner"
    for src, m in pkg.mods.items():
        for e in pkg.edges[src]:
            parts = e.dst.split(".")
            for i, part in enumerate(parts):
                owner = ".".join(parts[:i])
                if _private(part) and src != owner and not src.startswith(owner + "."):
                    yield Violation(f"private {src} imports {e.dst}", *pkg.where(src, e.line),
                                    f"{src} imports the private module {e.dst}", why, fix)
            if e.name and _private(e.name) and e.dst != src:
                yield Violation(f"private {src} imports {e.dst}.{e.name}", *pkg.where(src, e.line),
                                f"{src} imports {e.name} from {e.dst}", why, fix)
        own, binds = _own_privates(m.tree) | NAMEDTUPLE_API, pkg.binds[src]
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute):
                obj, attr = node.value, node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                obj, attr = node.args[0], node.args[1].value
            else:
                continue
            if not _private(attr) or (isinstance(obj, ast.Call) and ast.unparse(obj.func) == "super"):
                continue
            name = obj.id if isinstance(obj, ast.Name) else None
            if name in binds:
                if binds[name] and binds[name] != src:             # a package module: m._x
                    yield Violation(f"private {src} reads {binds[name]}.{attr}", *pkg.where(src, node.lineno),
                                    f"{src} uses {name}.{attr} of module {binds[name]}", why, fix)
            elif attr not in own:
                mine = name in ("self", "cls")
                yield Violation(f"private {src} uses {'self' if mine else ''}.{attr}",
                                *pkg.where(src, node.lineno),
                                f"{src} uses {ast.unparse(obj)}.{attr}, which no class in {src} defines", why,
                                fix if not mine else "a class uses only the private names its own module "
                                "defines: compose (own the part, call its public methods) instead of a mixin or "
                                "a base class's insides")


def code_lines(source: str, tree: ast.Module) -> set[int]:
    """Line numbers holding code: any token but comments, blank lines and docstrings."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.difference_update(range(node.lineno, node.end_lineno + 1))
    return lines


def _functions(node, prefix=""):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qual = prefix + child.name
            if not isinstance(child, ast.ClassDef):
                yield qual, child
            yield from _functions(child, qual + ".")
        else:
            yield from _functions(child, prefix)


def check_size(pkg: Package):
    lay = pkg.layout
    for name, m in pkg.mods.items():
        code = code_lines(m.source, m.tree)
        if len(code) > lay.max_module_lines:
            yield Violation(f"size {name}", str(m.path), 1,
                            f"{name} has {len(code)} code lines (budget {lay.max_module_lines})",
                            "modules of a few hundred lines can be read in one sitting (DESIGN.md habit 10)",
                            "split it along a seam: one concern per module")
        for qual, f in _functions(m.tree):
            n = len([i for i in code if f.lineno <= i <= f.end_lineno])
            if n > lay.max_function_lines:
                yield Violation(f"size {name}:{qual}", str(m.path), f.lineno,
                                f"{name}:{qual} has {n} code lines (budget {lay.max_function_lines})",
                                "a function should fit on a screen and do one thing",
                                "extract the steps into named helpers")
