"""docs/SECURITY.md names a test for each claim: every one it names must exist, so that a
renamed or removed test cannot leave a claim unbacked while the suite stays green."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def functions_named_test(path: str) -> set[str]:
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}


def test_every_test_named_in_security_md_exists():
    doc = open(os.path.join(ROOT, "docs", "SECURITY.md")).read()
    refs = REF.findall(doc)
    assert len(refs) > 50, "the page's references were not found"
    missing = []
    for path, name in refs:
        if not os.path.exists(os.path.join(ROOT, path)):
            missing.append(path)
        elif name and name not in functions_named_test(path):
            missing.append(f"{path}::{name}")
    assert not missing, missing
