"""gunicorn settings for the peer, read from the same environment variables as herdsman.

Run: gunicorn -c gunicorn.conf.py -k uvicorn.workers.UvicornWorker -w $WEB_CONCURRENCY \
         -b 127.0.0.1:$PORT app:app
(flags given on the command line win over this file; bench/run.py passes both.)
"""
import math
import os
import warnings

# uvicorn.workers is deprecated in favour of the uvicorn-worker package but still the
# most common way this stack is deployed; keep the warning out of the logs.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="uvicorn.workers")


def _int(name, default):
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _float(name, default):
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


bind = f"127.0.0.1:{_int('PORT', 8000)}"
workers = _int("WEB_CONCURRENCY", os.cpu_count() or 1)
worker_class = "uvicorn.workers.UvicornWorker"
# gunicorn takes whole seconds; herdsman takes fractions: round up.
timeout = math.ceil(_float("GUNICORN_TIMEOUT", 30))
graceful_timeout = math.ceil(_float("GRACEFUL_TIMEOUT", 25))
max_requests = _int("MAX_REQUESTS", 0)
max_requests_jitter = _int("MAX_REQUESTS_JITTER", 0)
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
accesslog = None
errorlog = "-"
keepalive = 5
# The harness runs several gunicorns at once; the control socket (gunicornc) is not part of
# the comparison and its default path is shared between them.
control_socket_disable = True
