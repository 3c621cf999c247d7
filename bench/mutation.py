"""Mutation testing: plant one small bug at a time and check that a test fails.

Usage (from the repository root; a benchmark-style check, not part of CI's time budget):

    OMP_NUM_THREADS=1 python bench/mutation.py                      # default modules, every mutant
    OMP_NUM_THREADS=1 python bench/mutation.py --max-mutants 30     # a seeded sample per module
    python bench/mutation.py --modules evaluation.py --tests tests/test_evaluation.py --list

Mutants (one at a time, each a single-token or single-statement edit):
  * comparison boundaries and negations: ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``,
    ``is`` <-> ``is not``, ``in`` <-> ``not in``;
  * arithmetic: ``+`` <-> ``-``, ``*`` <-> ``/`` (also in ``+=`` / ``-=``);
  * boolean: ``and`` <-> ``or``, ``not x`` -> ``x``;
  * integer constants off by one: ``n`` -> ``n + 1``;
  * statement deletion: an assignment or a call statement replaced by ``pass``.
Code inside ``raise`` statements and logging / warning / print calls is not mutated (messages
only), nor string concatenations.

The package and the tests are copied into a temporary directory; each mutant is written into
that copy, the module's test files run there (``pytest -x -q``, with a timeout of a few times
the clean run), and the file is restored. The working tree is never modified. Each test run is a
fork of this process with torch, NumPy and pytest already imported (``--no-fork``: a fresh
interpreter per mutant). A mutant is *killed* when the tests fail (or do not even import),
*survived* when they pass, *timeout* when they hang.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "feddmmr"

# module (relative to feddmmr/) -> the test files that should catch a bug in it
DEFAULT_TESTS = {
    "evaluation.py": ["tests/test_evaluation.py"],
    "federation/server.py": ["tests/test_federation.py", "tests/test_robust_aggregation.py", "tests/test_dropouts.py"],
    "federation/client.py": ["tests/test_federation.py", "tests/test_privacy.py", "tests/test_resume.py"],
    "federation/memory.py": ["tests/test_memory.py", "tests/test_federation.py"],
    "federation/privacy.py": ["tests/test_privacy.py"],
    "models/moe.py": ["tests/test_model.py"],
    "models/sasrec.py": ["tests/test_model.py"],
}

COMPARE_SWAPS = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
                 ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"),
                 ast.IsNot: ("is not", "is"), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}
BINOP_SWAPS = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*")}
BOOL_SWAPS = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
QUIET_CALLS = {"log", "logging", "warnings", "logger"}


@dataclass
class Mutant:
    module: str
    line: int
    kind: str
    before: str  # the original source line
    after: str  # the mutated source line(s)
    start: tuple[int, int] | None = None  # (line, char col) of the replaced span, 1-based line
    end: tuple[int, int] | None = None
    replacement: str = ""

    def label(self) -> str:
        return f"{self.module}:{self.line} [{self.kind}] {self.before.strip()}  ->  {self.after.strip()}"


# --------------------------------------------------------------------------- generating mutants

def _char_col(lines: list[str], line: int, byte_col: int) -> int:
    """ast column offsets are UTF-8 byte offsets; tokenize's (and str indexing) are characters."""
    return len(lines[line - 1].encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _quiet_spans(tree: ast.AST) -> list[tuple[int, int]]:
    """Line ranges of raise statements and logging / warning / print calls (messages, not results)."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            spans.append((node.lineno, node.end_lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else None
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            if name == "print" or owner in QUIET_CALLS:
                spans.append((node.lineno, node.end_lineno))
    return spans


def _is_stringy(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))) or isinstance(node, ast.JoinedStr)


def generate(module: str, source: str) -> list[Mutant]:
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type in (tokenize.OP, tokenize.NAME)]
    quiet = _quiet_spans(tree)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and _is_stringy(node.body[0].value)}

    def is_quiet(line: int) -> bool:
        return any(lo <= line <= hi for lo, hi in quiet)

    def pos(node: ast.AST, end: bool = False) -> tuple[int, int]:
        if end:
            return node.end_lineno, _char_col(lines, node.end_lineno, node.end_col_offset)
        return node.lineno, _char_col(lines, node.lineno, node.col_offset)

    def op_span(after: tuple[int, int], before: tuple[int, int], text: str) -> tuple | None:
        """The (start, end) of the operator ``text`` (one or two words) between two positions."""
        words = text.split()
        inside = [t for t in tokens if t.start >= after and t.end <= before]
        for i, token in enumerate(inside):
            if [t.string for t in inside[i:i + len(words)]] == words:
                return token.start, inside[i + len(words) - 1].end
        return None

    out: list[Mutant] = []

    def add(kind: str, start: tuple[int, int], end: tuple[int, int], replacement: str) -> None:
        if start[0] != end[0] or is_quiet(start[0]):
            return
        row = lines[start[0] - 1]
        after = row[:start[1]] + replacement + row[end[1]:]
        out.append(Mutant(module, start[0], kind, row.rstrip("\n"), after.rstrip("\n"), start, end, replacement))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                if type(op) in COMPARE_SWAPS:
                    old, new = COMPARE_SWAPS[type(op)]
                    span = op_span(pos(left, True), pos(right), old)
                    if span:
                        add("compare", *span, new)
                left = right
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            if _is_stringy(node.left) or _is_stringy(node.right):
                continue
            old, new = BINOP_SWAPS[type(node.op)]
            span = op_span(pos(node.left, True), pos(node.right), old)
            if span:
                add("arith", *span, new)
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAPS:
            old, new = BINOP_SWAPS[type(node.op)]
            span = op_span(pos(node.target, True), pos(node.value), old + "=")
            if span:
                add("arith", *span, new + "=")
        elif isinstance(node, ast.BoolOp) and type(node.op) in BOOL_SWAPS:
            old, new = BOOL_SWAPS[type(node.op)]
            for left, right in zip(node.values, node.values[1:]):
                span = op_span(pos(left, True), pos(right), old)
                if span:
                    add("bool", *span, new)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            start = pos(node)
            span = op_span(start, pos(node.operand), "not")
            if span:
                add("bool", span[0], pos(node.operand), "")
        elif isinstance(node, ast.Constant) and type(node.value) is int and id(node) not in docstrings:
            add("constant", pos(node), pos(node, True), str(node.value + 1))

    # statement deletion: a whole-line assignment or call statement -> pass
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr)):
            continue
        if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call):
            continue  # docstrings, bare names
        if isinstance(node, ast.AnnAssign) and node.value is None:
            continue
        if is_quiet(node.lineno):
            continue
        first = lines[node.lineno - 1]
        indent = len(first) - len(first.lstrip())
        if _char_col(lines, node.lineno, node.col_offset) != indent:
            continue  # shares its line with another statement
        last = lines[node.end_lineno - 1]
        if last[_char_col(lines, node.end_lineno, node.end_col_offset):].strip() not in ("", "\\") and \
                not last[_char_col(lines, node.end_lineno, node.end_col_offset):].lstrip().startswith("#"):
            continue
        out.append(Mutant(module, node.lineno, "delete", first.rstrip("\n"), " " * indent + "pass",
                          (node.lineno, 0), (node.end_lineno, len(last.rstrip("\n"))), " " * indent + "pass"))
    out.sort(key=lambda m: (m.line, m.start, m.kind, m.after))
    unique, seen = [], set()
    for mutant in out:
        key = (mutant.start, mutant.end, mutant.replacement)
        if key not in seen:
            seen.add(key)
            unique.append(mutant)
    return unique


def apply(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    (l0, c0), (l1, c1) = mutant.start, mutant.end
    head = "".join(lines[:l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + "".join(lines[l1:])
    mutated = head + mutant.replacement + tail
    compile(mutated, mutant.module, "exec")  # every mutant is valid Python
    return mutated


# --------------------------------------------------------------------------- running tests

def _child(workdir: Path, tests: list[str]) -> int:
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import importlib

    package = importlib.import_module(PACKAGE)
    if not Path(package.__file__).resolve().is_relative_to(workdir.resolve()):
        return 99  # the mutated copy is not the package under test
    import pytest

    return int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests]))


def run_tests(workdir: Path, tests: list[str], timeout: float, fork: bool) -> tuple[str, float]:
    """('passed' | 'failed' | 'timeout', seconds)."""
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(workdir)}
    if not fork:
        try:
            code = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=timeout, start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - started
        return ("passed" if code == 0 else "failed"), time.perf_counter() - started
    os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
    pid = os.fork()
    if pid == 0:  # the child: run pytest on the copy, exit with its code
        code = 1
        try:
            os.setsid()
            code = _child(workdir, tests)
        finally:
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.perf_counter() - started > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - started
        time.sleep(0.05)
    if code == 99:
        raise SystemExit(f"{PACKAGE} was not imported from the mutated copy {workdir}")
    return ("passed" if code == 0 else "failed"), time.perf_counter() - started


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_TESTS),
                        help="modules relative to feddmmr/ (a folder such as models/ means its .py files)")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="test files for every module (default: a per-module list, see DEFAULT_TESTS)")
    parser.add_argument("--max-mutants", type=int, default=None, help="a seeded random sample per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=None, metavar="MODULE:LINE",
                        help="only the mutants on these lines (e.g. evaluation.py:106), to re-check survivors")
    parser.add_argument("--survivors-of", type=Path, default=None, metavar="JSON",
                        help="only the mutants that survived in an earlier run's --json (after adding tests)")
    parser.add_argument("--kinds", nargs="+", default=["compare", "arith", "bool", "constant", "delete"])
    parser.add_argument("--timeout-factor", type=float, default=3.0, help="timeout = factor x clean run + 10 s")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    parser.add_argument("--no-fork", action="store_true", help="a fresh interpreter per mutant (slower)")
    parser.add_argument("--json", type=Path, default=None, help="write every result here (e.g. bench/results/)")
    args = parser.parse_args(argv)

    modules: list[str] = []
    for name in args.modules:
        path = ROOT / PACKAGE / name
        if path.is_dir():
            modules += sorted(str(p.relative_to(ROOT / PACKAGE)) for p in path.glob("*.py") if p.name != "__init__.py")
        else:
            modules.append(name)
    plan: dict[str, list[Mutant]] = {}
    totals: dict[str, int] = {}
    for module in modules:
        mutants = [m for m in generate(module, (ROOT / PACKAGE / module).read_text()) if m.kind in args.kinds]
        totals[module] = len(mutants)
        if args.only is not None:
            mutants = [m for m in mutants if f"{m.module}:{m.line}" in args.only]
        if args.survivors_of is not None:
            earlier = json.loads(args.survivors_of.read_text())["results"]
            keep = {(r["module"], r["before"], r["after"]) for r in earlier if r["outcome"] == "survived"}
            mutants = [m for m in mutants if (m.module, m.before, m.after) in keep]  # by text: lines may move
        if args.max_mutants is not None and len(mutants) > args.max_mutants and args.survivors_of is None:
            mutants = sorted(random.Random(f"{args.seed}:{module}").sample(mutants, args.max_mutants),
                             key=lambda m: (m.line, m.start))
        plan[module] = mutants
    if args.list:
        for module, mutants in plan.items():
            print(f"# {module}: {len(mutants)} of {totals[module]} mutants")
            for mutant in mutants:
                print("  " + mutant.label())
        return 0

    import numpy  # noqa: F401  (imported once, shared by every forked test run)
    import pytest  # noqa: F401
    import torch  # noqa: F401

    workdir = Path(tempfile.mkdtemp(prefix="feddmmr-mutation-"))
    results: list[dict] = []
    try:
        shutil.copytree(ROOT / PACKAGE, workdir / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", workdir / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(ROOT / "pyproject.toml", workdir / "pyproject.toml")
        for module, mutants in plan.items():
            tests = args.tests or DEFAULT_TESTS.get(module) or sys.exit(f"no tests known for {module}: pass --tests")
            status, clean = run_tests(workdir, tests, 3600, not args.no_fork)
            if status != "passed":
                sys.exit(f"{module}: the tests {tests} fail without any mutant")
            timeout = args.timeout_factor * clean + 10
            print(f"# {module}: {len(mutants)} of {totals[module]} mutants, tests {' '.join(tests)} "
                  f"(clean run {clean:.1f} s)", flush=True)
            target = workdir / PACKAGE / module
            original = target.read_text()
            for mutant in mutants:
                target.write_text(apply(original, mutant))
                try:
                    status, seconds = run_tests(workdir, tests, timeout, not args.no_fork)
                finally:
                    target.write_text(original)
                outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
                results.append({**asdict(mutant), "outcome": outcome, "seconds": round(seconds, 1)})
                print(f"  {outcome:8s} {seconds:5.1f}s  {mutant.label()}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n| module | mutants (sampled / all) | killed | survived | timeout |")
    print("|---|---|---|---|---|")
    for module in plan:
        mine = [r for r in results if r["module"] == module]
        count = {k: sum(r["outcome"] == k for r in mine) for k in ("killed", "survived", "timeout")}
        print(f"| {module} | {len(mine)} / {totals[module]} | {count['killed']} | {count['survived']} | "
              f"{count['timeout']} |")
    survivors = [r for r in results if r["outcome"] == "survived"]
    print(f"\n{len(survivors)} survivor(s):")
    for r in survivors:
        print(f"  {r['module']}:{r['line']} [{r['kind']}] {r['before'].strip()}  ->  {r['after'].strip()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "totals": totals,
                                         "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
