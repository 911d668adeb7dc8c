"""Static conformance checker: our DeepEP calls against the real ``deep_ep`` sources.

Nothing from DeepEP is imported or executed (the wheel needs CUDA): its Python sources are
parsed with ``ast`` and its compiled extension ``deep_ep/_C*.so`` is only searched for names
(pybind method names and Itanium-mangled C++ signatures, for ``Config``, a C++ class).

``load_api`` reads the API (classes exported by ``deep_ep/__init__.py`` with their method
signatures and the arity of every ``return``); ``find_calls`` finds, in our modules that mention
``deep_ep``, every call on a DeepEP object (the module, a class, an instance, a value returned
by a DeepEP method), tracking names statically; ``check_calls`` checks each call: the method
exists, keywords are parameters, positional arguments line up, required parameters are given,
and the number of values unpacked from the result is what the method returns.
``check_fake`` checks ``tests/fakes/deep_ep.py`` against the same API.

Discovery is strict so that a new call site is not silently skipped: in a module that mentions
``deep_ep``, an attribute call whose method name is a public DeepEP method name, or whose
receiver is named like a buffer, and whose receiver the checker cannot type, is an error. A
comment ``# deep_ep: <Class>`` on the call's line types the receiver by hand
(``# deep_ep: none`` says it is not a DeepEP object).
"""

from __future__ import annotations

import ast
import pathlib
import re
import zipfile
from dataclasses import dataclass, field

MODULE = "<module>"  # type of the deep_ep module object itself
SOURCE_FILES = (
    "deep_ep/__init__.py",
    "deep_ep/buffers/legacy.py",
    "deep_ep/buffers/elastic.py",
    "deep_ep/utils/event.py",
)


# ---------------------------------------------------------------------------- the real API
@dataclass
class Param:
    name: str
    kind: str  # "positional" (positional or keyword), "posonly", "kwonly", "varargs", "varkw"
    default: str | None  # source text of the default, None when required


@dataclass
class Method:
    cls: str
    name: str
    params: list[Param]  # without self / cls where the call binds it
    kind: str  # "method", "static", "class", "property", "binary"
    arities: set  # tuple sizes of the return statements; "value" for a non-tuple
    returns: list  # [str | None] class name of each element of the annotated return tuple
    where: str  # file:line

    def describe(self) -> str:
        return f"{self.cls}.{self.name} ({self.where})"


@dataclass
class ApiClass:
    name: str
    methods: dict[str, Method]
    where: str


@dataclass
class Api:
    classes: dict[str, ApiClass]
    exports: dict[str, str]  # name in deep_ep -> class name (or MODULE-level function marker)
    sources: dict[str, str] = field(default_factory=dict)
    version: str | None = None

    def method(self, cls: str, name: str) -> Method | None:
        c = self.classes.get(cls)
        return c.methods.get(name) if c else None

    def public_method_names(self) -> set[str]:
        """Public method names of the classes deep_ep exports (a call of one of these names
        on an untyped receiver is suspect)."""
        exported = {self.exports[n] for n in self.exports} & set(self.classes)
        return {
            m
            for c in exported
            for m in self.classes[c].methods
            if not m.startswith("_") and m not in GENERIC_NAMES
        }


# names too generic to flag on an untyped receiver (every object has them)
GENERIC_NAMES = {"destroy", "format", "barrier", "capture", "all_gather"}


def read_wheel(path: str | pathlib.Path) -> dict[str, str]:
    """{archive path: text} of the wheel's Python sources, plus ``<binary>``: the printable
    strings of ``deep_ep/_C*.so`` (names only; the file is never loaded)."""
    out: dict[str, str] = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.startswith("deep_ep/") and name.endswith(".py"):
                out[name] = zf.read(name).decode()
            elif name.startswith("deep_ep/_C") and name.endswith(".so"):
                data = zf.read(name)
                strings = re.findall(rb"[\x20-\x7e]{4,}", data)
                out["<binary>"] = "\n".join(s.decode() for s in strings)
    missing = [f for f in SOURCE_FILES if f not in out]
    if missing:
        raise ValueError(f"{path}: not a deep_ep wheel, missing {missing}")
    return out


def _params(args: ast.arguments, drop_first: bool) -> list[Param]:
    positional = [(a, "posonly") for a in args.posonlyargs] + [(a, "positional") for a in args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [
        Param(a.arg, kind, None if d is None else ast.unparse(d))
        for (a, kind), d in zip(positional, defaults)
    ]
    if drop_first:
        params = params[1:]
    if args.vararg:
        params.append(Param(args.vararg.arg, "varargs", "()"))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        params.append(Param(a.arg, "kwonly", None if d is None else ast.unparse(d)))
    if args.kwarg:
        params.append(Param(args.kwarg.arg, "varkw", "{}"))
    return params


def _returns_in(fn: ast.FunctionDef) -> list[ast.Return]:
    """The return statements of ``fn`` itself (not of functions nested in it)."""
    found: list[ast.Return] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Return):
                found.append(child)
            walk(child)

    walk(fn)
    return found


def _annotated_elements(fn: ast.FunctionDef) -> list:
    """Class names of the elements of a ``-> Tuple[A, B, ...]`` annotation (None: other)."""
    ann = fn.returns
    if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) in ("Tuple", "tuple"):
        elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        return [e.id if isinstance(e, ast.Name) else None for e in elts]
    if isinstance(ann, ast.Name):
        return [ann.id]
    return []


def _class_from_ast(node: ast.ClassDef, path: str) -> ApiClass:
    methods: dict[str, Method] = {}
    pending: dict[str, list] = {}
    for item in node.body:
        if not isinstance(item, ast.FunctionDef):
            continue
        decorators = {ast.unparse(d) for d in item.decorator_list}
        kind = (
            "static"
            if "staticmethod" in decorators
            else "class"
            if "classmethod" in decorators
            else "property"
            if "property" in decorators
            else "method"
        )
        # a @staticmethod that still names `self` first is called as a plain method would
        # be (`ElasticBuffer.combine(self, ...)` in DeepEP 2.1): keep what Python does
        params = _params(item.args, drop_first=kind in ("method", "class", "property"))
        arities: set = set()
        calls: list[str] = []
        for ret in _returns_in(item):
            value = ret.value
            if value is None:
                arities.add(0)
            elif isinstance(value, ast.Tuple):
                if any(isinstance(e, ast.Starred) for e in value.elts):
                    arities.add("unknown")
                else:
                    arities.add(len(value.elts))
            elif (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute)
                and isinstance(value.func.value, ast.Name)
                and value.func.value.id == "self"
            ):
                calls.append(value.func.attr)  # delegated: resolved below
            else:
                arities.add("value")
        if not _returns_in(item):
            # a body that only raises (a fake's refusal) returns nothing to compare
            raises = any(isinstance(n, ast.Raise) for n in ast.walk(item))
            arities.add("raises" if raises else 0)
        methods[item.name] = Method(
            node.name,
            item.name,
            params,
            kind,
            arities,
            _annotated_elements(item),
            f"{path}:{item.lineno}",
        )
        pending[item.name] = calls
    for name, calls in pending.items():  # `return self.internode_dispatch(...)`
        for callee in calls:
            target = methods.get(callee)
            methods[name].arities |= target.arities if target else {"unknown"}
    return ApiClass(node.name, methods, f"{path}:{node.lineno}")


_MANGLED_METHOD = re.compile(r"^_ZNK?7deep_ep6legacy6Config(\d+)(\w+)$")
_BUILTIN_CODES = set("abcdefghijlmnostxy")  # Itanium codes of builtin types, one letter each


def _binary_config(strings: str) -> ApiClass:
    """``deep_ep.Config`` (C++, bound with pybind11) from the extension's symbol names:
    ``_ZNK7deep_ep6legacy6Config24get_nvl_buffer_size_hintEmi`` is a const method of two
    builtin-typed parameters; ``constructorIJiiiiiE...6ConfigE`` is a five-int constructor.
    Parameter names are not in the binary (positional calls only)."""
    methods: dict[str, Method] = {}
    for line in strings.splitlines():
        m = _MANGLED_METHOD.match(line)
        if not m:
            continue
        length, rest = int(m.group(1)), m.group(2)
        name, tail = rest[:length], rest[length:]
        if not tail.startswith("E") or not set(tail[1:]) <= _BUILTIN_CODES:
            continue
        codes = tail[1:] if tail[1:] != "v" else ""
        params = [Param(f"arg{i}", "posonly", None) for i in range(len(codes))]
        methods[name] = Method("Config", name, params, "binary", {"value"}, [], "deep_ep/_C.so")
    ctor = re.search(
        r"constructorIJ([a-z]+)EE7executeINS_6class_IN7deep_ep6legacy6ConfigE", strings
    )
    if ctor:
        params = [Param(f"arg{i}", "posonly", None) for i in range(len(ctor.group(1)))]
        methods["__init__"] = Method(
            "Config", "__init__", params, "binary", {0}, [], "deep_ep/_C.so"
        )
    return ApiClass("Config", methods, "deep_ep/_C.so")


def load_api(sources: dict[str, str]) -> Api:
    """The DeepEP API from ``read_wheel``'s output (or an altered copy of it)."""
    classes: dict[str, ApiClass] = {}
    for path, text in sources.items():
        if not path.endswith(".py"):
            continue
        for node in ast.parse(text, filename=path).body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, _class_from_ast(node, path))
    if "<binary>" in sources:
        classes["Config"] = _binary_config(sources["<binary>"])
    exports: dict[str, str] = {}
    version = None
    for node in ast.parse(sources["deep_ep/__init__.py"]).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                if alias.name in classes:
                    exports[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module == "deep_ep._C":
            for alias in node.names:
                exports[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            version = ast.literal_eval(node.value)
    return Api(classes, exports, sources, version)


# ---------------------------------------------------------------------------- our calls
@dataclass
class Call:
    path: str
    line: int
    cls: str
    method: str  # "__init__" for a constructor
    node: ast.Call
    unpacked: int | None  # number of targets the result is unpacked into, if it is
    text: str

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Finding:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


_ANNOTATION = re.compile(r"#\s*deep_ep:\s*(\w+)")


class _ModuleScan:
    """Flow-insensitive typing of one module's names: which expressions are DeepEP objects."""

    def __init__(self, api: Api, path: str, text: str) -> None:
        self.api, self.path, self.text = api, path, text
        self.lines = text.splitlines()
        self.tree = ast.parse(text, filename=path)
        self.deep_ep_functions: set[str] = set()  # module functions returning the module
        self.attr_types: dict[str, str] = {}  # "self.buffer" -> "Buffer"
        self.calls: list[Call] = []
        self.findings: list[Finding] = []

    # ---------------------------------------------------------------- typing
    def type_of(self, node: ast.AST, names: dict[str, str]) -> str | None:
        if isinstance(node, ast.Name):
            return names.get(node.id)
        if isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            if dotted in self.attr_types:
                return self.attr_types[dotted]
            base = self.type_of(node.value, names)
            if base == MODULE:
                return self.api.exports.get(node.attr, f"?{node.attr}")
            return None
        if isinstance(node, ast.IfExp):
            return self.type_of(node.body, names) or self.type_of(node.orelse, names)
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                t = self.type_of(v, names)
                if t:
                    return t
            return None
        if isinstance(node, ast.Call):
            if _is_import_deep_ep(node):
                return MODULE
            if isinstance(node.func, ast.Name) and node.func.id in self.deep_ep_functions:
                return MODULE
            callee = self.type_of(node.func, names)
            if callee in self.api.classes:  # a constructor
                return callee
            if isinstance(node.func, ast.Attribute):
                owner = self.type_of(node.func.value, names)
                method = self.api.method(owner, node.func.attr) if owner else None
                if method and len(method.returns) == 1:
                    return method.returns[0]
        return None

    def bind_target(self, target: ast.AST, typ: str | None, names: dict[str, str]) -> None:
        if typ is None:
            return
        if isinstance(target, ast.Name):
            names[target.id] = typ
        elif isinstance(target, ast.Attribute):
            self.attr_types[ast.unparse(target)] = typ

    # ---------------------------------------------------------------- passes
    def run(self) -> None:
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(r.value, ast.Call) and _is_import_deep_ep(r.value)
                for r in _returns_in(node)
            ):
                self.deep_ep_functions.add(node.name)
        # two passes: attributes typed in one method (``self.buffer = Buffer(...)`` in
        # __init__) are known in every other method of the module
        for record in (False, True):
            self.calls, self.findings = [], []
            names: dict[str, str] = {}
            self._visit_block(self.tree.body, names, record)

    def _visit_block(self, body: list, names: dict[str, str], record: bool) -> None:
        for stmt in body:
            self._visit_stmt(stmt, names, record)

    def _visit_stmt(self, stmt: ast.stmt, names: dict[str, str], record: bool) -> None:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name == "deep_ep":
                    names[alias.asname or "deep_ep"] = MODULE
        elif isinstance(stmt, ast.ImportFrom) and stmt.module == "deep_ep":
            for alias in stmt.names:
                names[alias.asname or alias.name] = self.api.exports.get(
                    alias.name, f"?{alias.name}"
                )
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            self._visit_block(stmt.body, dict(names), record)
            return
        elif isinstance(stmt, ast.Assign):
            self._scan_expr(stmt.value, names, record, unpack_targets=stmt.targets)
            typ = self.type_of(stmt.value, names)
            for target in stmt.targets:
                if isinstance(target, ast.Tuple | ast.List):
                    self._bind_unpacked(target, stmt.value, names)
                else:
                    self.bind_target(target, typ, names)
            return
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            self._scan_expr(stmt.value, names, record)
            self.bind_target(stmt.target, self.type_of(stmt.value, names), names)
            return
        elif isinstance(stmt, ast.For):
            self._scan_expr(stmt.iter, names, record)
            if isinstance(stmt.iter, ast.Tuple | ast.List):
                types = {self.type_of(e, names) for e in stmt.iter.elts}
                if len(types) == 1:
                    self.bind_target(stmt.target, types.pop(), names)
            self._visit_block(stmt.body, names, record)
            self._visit_block(stmt.orelse, names, record)
            return
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.stmt):
                self._visit_stmt(child, names, record)
            elif isinstance(child, ast.expr):
                self._scan_expr(child, names, record)
            else:
                for grandchild in ast.iter_child_nodes(child):  # handlers, with-items
                    if isinstance(grandchild, ast.stmt):
                        self._visit_stmt(grandchild, names, record)
                    elif isinstance(grandchild, ast.expr):
                        self._scan_expr(grandchild, names, record)

    def _bind_unpacked(self, target: ast.Tuple | ast.List, value: ast.AST, names) -> None:
        """``a, b, event = buffer.dispatch(...)``: type targets from the annotated tuple."""
        if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)):
            return
        owner = self.type_of(value.func.value, names)
        method = self.api.method(owner, value.func.attr) if owner else None
        if method and len(method.returns) == len(target.elts):
            for elt, typ in zip(target.elts, method.returns):
                if typ in self.api.classes:
                    self.bind_target(elt, typ, names)

    def _scan_expr(self, expr: ast.AST, names, record: bool, unpack_targets=None) -> None:
        for node in ast.walk(expr):
            if isinstance(node, ast.Call):
                unpacked = None
                if node is expr and unpack_targets and len(unpack_targets) == 1:
                    target = unpack_targets[0]
                    if isinstance(target, ast.Tuple | ast.List):
                        unpacked = len(target.elts)
                self._classify(node, names, record, unpacked)

    def _classify(self, node: ast.Call, names, record: bool, unpacked: int | None) -> None:
        line_text = self.lines[node.lineno - 1]
        hand = _ANNOTATION.search(line_text)
        func = node.func
        callee = self.type_of(func, names)
        if callee in self.api.classes or (callee and callee.startswith("?")):
            self._record(node, callee, "__init__", unpacked, record)
            return
        if not isinstance(func, ast.Attribute):
            return
        owner = self.type_of(func.value, names)
        if hand:
            owner = None if hand.group(1) == "none" else hand.group(1)
            if owner is None:
                return
        if owner == MODULE:
            return  # deep_ep.X(...) is a constructor (above) or an unknown export (below)
        if owner is not None:
            self._record(node, owner, func.attr, unpacked, record)
            return
        receiver = ast.unparse(func.value)
        if func.attr in self.api.public_method_names() or "buffer" in receiver.lower():
            if record:
                self.findings.append(
                    Finding(
                        f"{self.path}:{node.lineno}",
                        f"cannot tell whether `{receiver}` in `{ast.unparse(node)[:60]}` is a "
                        "DeepEP object; type it (assign it from deep_ep) or mark the line "
                        "`# deep_ep: <Class>` / `# deep_ep: none`",
                    )
                )

    def _record(self, node, cls: str, method: str, unpacked, record: bool) -> None:
        if record:
            text = ast.unparse(node)
            self.calls.append(Call(self.path, node.lineno, cls, method, node, unpacked, text[:80]))


def _is_import_deep_ep(node: ast.Call) -> bool:
    """``importlib.import_module("deep_ep")`` / ``import_module("deep_ep")``."""
    name = ast.unparse(node.func)
    return (
        name.endswith("import_module")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == "deep_ep"
    )


MENTIONS = re.compile(r"deep_?ep", re.IGNORECASE)


def our_modules(roots: list[pathlib.Path], base: pathlib.Path) -> dict[str, str]:
    """{relative path: text} of every Python file under ``roots`` that mentions DeepEP
    (``deep_ep``, ``DeepEP``, ``deepep``): also the modules that could be handed an engine's
    DeepEP buffer without importing deep_ep themselves."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            text = path.read_text()
            if MENTIONS.search(text):
                out[str(path.relative_to(base))] = text
    return out


def find_calls(api: Api, modules: dict[str, str]) -> tuple[list[Call], list[Finding]]:
    calls, findings = [], []
    for path, text in modules.items():
        scan = _ModuleScan(api, path, text)
        scan.run()
        calls += scan.calls
        findings += scan.findings
    return calls, findings


# ---------------------------------------------------------------------------- checks
def check_call(api: Api, call: Call) -> list[str]:
    """Problems of one call against the real signature (empty when it conforms)."""
    if call.cls.startswith("?"):
        return [f"deep_ep has no `{call.cls[1:]}` (exports: {sorted(api.exports)})"]
    method = api.method(call.cls, call.method)
    if method is None:
        what = "constructor" if call.method == "__init__" else f"method `{call.method}`"
        return [f"{call.cls} has no {what} in deep_ep {api.version}"]
    problems = []
    node = call.node
    params = method.params
    positional = [p for p in params if p.kind in ("posonly", "positional")]
    by_name = {p.name: p for p in params if p.kind in ("positional", "kwonly")}
    varargs = any(p.kind == "varargs" for p in params)
    varkw = any(p.kind == "varkw" for p in params)
    starred = any(isinstance(a, ast.Starred) for a in node.args)
    double_star = any(k.arg is None for k in node.keywords)
    given: set[str] = set()
    if not starred:
        if len(node.args) > len(positional) and not varargs:
            problems.append(
                f"{len(node.args)} positional arguments, {method.describe()} takes at most "
                f"{len(positional)} ({', '.join(p.name for p in positional)})"
            )
        given |= {p.name for p in positional[: len(node.args)]}
    for kw in node.keywords:
        if kw.arg is None:
            continue
        if kw.arg not in by_name and not varkw:
            problems.append(
                f"keyword `{kw.arg}` is not a parameter of {method.describe()} "
                f"(parameters: {', '.join(p.name for p in params)})"
            )
        elif kw.arg in given:
            problems.append(f"`{kw.arg}` given both by position and by keyword")
        given.add(kw.arg)
    if not (starred or double_star):
        for p in params:
            if p.default is None and p.kind in ("posonly", "positional", "kwonly"):
                if p.name not in given:
                    problems.append(f"required parameter `{p.name}` of {method.describe()} missing")
    if call.unpacked is not None:
        arities = method.arities
        if arities != {call.unpacked}:
            shown = " or ".join(str(a) for a in sorted(arities, key=str))
            problems.append(f"unpacks {call.unpacked} values, {method.describe()} returns {shown}")
    return problems


def check_calls(api: Api, calls: list[Call]) -> list[Finding]:
    out = []
    for call in calls:
        for problem in check_call(api, call):
            out.append(Finding(call.where(), f"{call.cls}.{call.method}: {problem}"))
    return out


def check_tree(api: Api, modules: dict[str, str]) -> tuple[list[Call], list[Finding]]:
    """All our calls, and every problem: unclassified receivers and non-conforming calls."""
    calls, findings = find_calls(api, modules)
    return calls, findings + check_calls(api, calls)


# ---------------------------------------------------------------------------- the fake
def check_fake(api: Api, fake_text: str, path: str = "tests/fakes/deep_ep.py") -> list[Finding]:
    """The fake's classes that stand for DeepEP classes: every public method exists in the real
    class with the same parameters (names, order, kinds, defaults), the same static-ness, and
    the same return arity; binary classes (``Config``) are checked by arity only."""
    fake = load_api({path: fake_text, "deep_ep/__init__.py": ""})
    findings = []
    for name, fcls in fake.classes.items():
        if name.startswith("_"):
            continue  # the fake's own helpers
        real_name = api.exports.get(name)
        if real_name is None:
            findings.append(Finding(fcls.where, f"class {name} is not exported by deep_ep"))
            continue
        rcls = api.classes.get(real_name)
        if rcls is None:
            findings.append(Finding(fcls.where, f"deep_ep.{name}: no source or symbol to check"))
            continue
        for mname, fm in fcls.methods.items():
            if mname.startswith("_") and mname not in ("__init__", "__enter__", "__exit__"):
                continue  # the fake's own helpers
            rm = rcls.methods.get(mname)
            if rm is None:
                findings.append(Finding(fm.where, f"{name}.{mname} does not exist in deep_ep"))
                continue
            findings += [Finding(fm.where, f"{name}.{mname}: {p}") for p in _compare(fm, rm)]
    return findings


def _compare(fake: Method, real: Method) -> list[str]:
    problems = []
    if real.kind == "binary":
        fixed = [p for p in fake.params if p.kind in ("posonly", "positional")]
        if len(fixed) != len(real.params):
            problems.append(f"takes {len(fixed)} arguments, the real one {len(real.params)}")
        return problems
    if (fake.kind == "static") != (real.kind == "static"):
        problems.append(f"static: fake {fake.kind == 'static'}, real {real.kind == 'static'}")
    fp = [(p.name, p.kind, p.default) for p in fake.params]
    rp = [(p.name, p.kind, p.default) for p in real.params]
    if fp != rp:
        problems.append(f"parameters {_show(fake.params)} differ from {_show(real.params)} "
                        f"({real.where})")  # fmt: skip
    fa, ra = fake.arities - {"unknown"}, real.arities - {"unknown"}
    if fa != ra and "raises" not in fa:
        problems.append(f"returns {sorted(fa, key=str)} values, the real one "
                        f"{sorted(ra, key=str)} ({real.where})")  # fmt: skip
    return problems


def _show(params: list[Param]) -> str:
    return "(" + ", ".join(p.name + ("" if p.default is None else f"={p.default}")
                           for p in params) + ")"  # fmt: skip
