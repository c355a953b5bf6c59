"""Background worker: calls the front end every few seconds and logs the answer."""
import json
import os
import time
import urllib.request

# Injected by berth because the worker depends_on web: the front end's
# stable address, which stays valid however its replicas move.
url = os.environ["WEB_URL"]
every = float(os.environ.get("EVERY_SECONDS", "2"))
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            reply = json.load(r)
        print(f"{reply['web']} via {reply['api'].get('instance')}: {reply['api'].get('greeting')}", flush=True)
    except Exception as e:
        print(f"front end not answering yet: {e}", flush=True)
    time.sleep(every)
