"""The platform boundary of training: megatron-core is imported at module level in the training
modules (the entry points set up the platform first), and the launcher's --preflight path never
imports it."""
import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _function_local_megatron_imports(path):
    tree = ast.parse(open(path).read(), path)
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                found += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {n}" for n in names if n.startswith("megatron")]
    return found


def test_training_imports_megatron_at_module_level_only():
    paths = glob.glob(os.path.join(ROOT, "mindspeed_mm", "training", "*.py")) + \
        [os.path.join(ROOT, "mindspeed_mm", "inference", "main.py")]
    assert [hit for p in paths for hit in _function_local_megatron_imports(p)] == []


def test_entry_points_and_preflight_do_not_import_megatron():
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); "
            "bad = [m for m in sys.modules if m.startswith('megatron')]; assert not bad, bad[:3]")
    for entry in ("pretrain_qwen2vl.py", "inference_qwen2vl.py"):
        proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, entry)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
