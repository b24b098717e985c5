"""Load on a slimserve endpoint: every user sends short completions to the public model name,
back to back, with a user id (so the A/B split is sticky per user).

    locust -f bench/locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:8000 --csv out/load

Environment: SLIMSERVE_MODEL (default smollm2), SLIMSERVE_MAX_TOKENS (default 16),
OPENAI_API_KEY (sent as Bearer when set). A 429 (load shed, with Retry-After) is counted as a
failure of type "429 shed" so that it can be told apart from real errors; the user then waits
as told."""

from __future__ import annotations

import itertools
import os
import time

from locust import HttpUser, constant, task

MODEL = os.environ.get("SLIMSERVE_MODEL", "smollm2")
MAX_TOKENS = int(os.environ.get("SLIMSERVE_MAX_TOKENS", "16"))
_ids = itertools.count()


class OpenAIUser(HttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.user_id = f"load-user-{next(_ids)}"
        key = os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    @task
    def complete(self):
        body = {"model": MODEL, "prompt": "The three primary colours are", "max_tokens": MAX_TOKENS,
                "temperature": 0, "user": self.user_id}
        with self.client.post("/v1/completions", json=body, headers=self.headers, name="completions",
                              catch_response=True) as r:
            if r.status_code == 200 and r.json()["choices"][0]["text"] is not None:
                r.success()
            elif r.status_code == 429:
                r.failure("429 shed")
                time.sleep(float(r.headers.get("retry-after", "1")))
            else:
                r.failure(f"{r.status_code} {r.text[:200]}")
