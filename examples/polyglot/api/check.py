"""Exec health check (Compose `CMD` form): exit 0 when /health answers."""
import os
import sys
import urllib.request

try:
    with urllib.request.urlopen(f"http://127.0.0.1:{os.environ['PORT']}/health", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # any failure is "unhealthy", with the reason as output
    print(e)
    sys.exit(1)
