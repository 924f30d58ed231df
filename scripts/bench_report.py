"""Benchmark rows: what every scripts/bench_*.py writes with ``--json`` and scripts/benchmark.py prints.

A row compares one figure of ours with a reference measured in the same run:
    {"benchmark": "decode", "unit": "tokens/s", "better": "higher", "ours": 529.0,
     "reference": 205.0, "reference_name": "HF generate", "check": "same greedy tokens"}
"""
from __future__ import annotations


from mindspeed_mm.jsonio import write_json_atomic


def row(benchmark: str, unit: str, better: str, ours: float, reference: float, reference_name: str,
        check: str = "") -> dict:
    assert better in ("lower", "higher")
    return {"benchmark": benchmark, "unit": unit, "better": better, "ours": float(ours),
            "reference": float(reference), "reference_name": reference_name, "check": check}


def write_rows(path: str, setup: str, rows: list) -> None:
    """{"setup", "rows"} to ``path`` (through a temporary name)."""
    write_json_atomic(path, {"setup": setup, "rows": rows}, indent=1)


def ratio(r: dict) -> float:
    """ours / reference, in the row's unit."""
    return r["ours"] / r["reference"] if r["reference"] else float("nan")


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def format_table(rows: list) -> str:
    head = ("benchmark", "unit", "ours", "reference", "ours/ref", "better", "reference is", "check")
    body = [(r["benchmark"], r["unit"], _num(r["ours"]), _num(r["reference"]), f"{ratio(r):.2f}",
             f"{r['better']}", r["reference_name"], r.get("check", "")) for r in rows]
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
