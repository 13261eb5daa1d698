"""What every bench script does at the end: print a table of its results and optionally save them as JSON."""

from __future__ import annotations

import json


def report(title: str, label: str, columns: list[tuple[str, str, str]], results: dict[str, dict], json_path: str | None) -> None:
    """Print ``results`` (row name -> values) as a table; ``columns`` are (header, key, format spec)."""
    print(title)
    print(f"{label:48s} " + " ".join(f"{header:>{len(header) + 2}s}" for header, _, _ in columns))
    for name, values in results.items():
        print(f"{name:48s} " + " ".join(f"{values[key]:>{len(header) + 2}{spec}}" for header, key, spec in columns))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
