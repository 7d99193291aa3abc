"""Functions over 60 lines and classes over 200 lines in the given packages (default: engine, cluster).

    .venv/bin/python scripts/unit_sizes.py [scopevid/engine scopevid/cluster ...]

Lines count from the `def` / `class` line to the last line of the body (docstrings included).
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_LINES, CLASS_LINES = 60, 200


def main(paths: list[str]) -> int:
    found = []
    for d in paths or ["scopevid/engine", "scopevid/cluster"]:
        for f in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                n = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > FUNCTION_LINES:
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno} def {node.name}: {n} lines")
                elif isinstance(node, ast.ClassDef) and n > CLASS_LINES:
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno} class {node.name}: {n} lines")
    print("\n".join(found) or "none")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
