"""The versions of the peer's main packages, as `name==version ...` on one line.

Run with the venv's python by bench/measure.py's machine_info().
"""

import importlib.metadata as m

print(" ".join(f"{p}=={m.version(p)}" for p in ["fastapi", "uvicorn", "gunicorn", "starlette",
                                                 "redis", "bcrypt", "uvloop", "httptools"]))
