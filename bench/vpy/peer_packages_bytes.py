"""The bytes on disk of the named distributions and everything they require (extras left out),
from the installed distributions' file lists.

    bench/.venv/bin/python bench/vpy/peer_packages_bytes.py REQUIREMENT...

Prints the total. Run with the venv's python by bench/measure.py's peer_packages_bytes().
"""

import importlib.metadata as md
import re
import sys

todo, seen, total = list(sys.argv[1:]), set(), 0
while todo:
    name = re.split(r"[\s\[<>=;!~]", todo.pop())[0].lower().replace("_", "-")
    if not name or name in seen:
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    total += sum(f.size or 0 for f in dist.files or [])
    todo += [r for r in dist.requires or [] if "extra ==" not in r]
print(total)
