"""MLflow registry webhooks: MLflow signs each delivery with the webhook's secret (HMAC-SHA256 over
``<delivery id>.<timestamp>.<body>``, sent as ``X-MLflow-Signature: v1,<base64>``) and cannot send a bearer
token, so ``/admin/reload`` accepts either. Register the webhook with ``tripcast models webhook URL``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from mlflow import MlflowClient
from mlflow.entities.webhook import Webhook

SIGNATURE, TIMESTAMP, DELIVERY_ID = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
TOLERANCE_SECONDS = 300  # a delivery older (or newer) than this is refused: a recorded one cannot be replayed
EVENTS = ["model_version_alias.created", "model_version_alias.deleted"]  # an alias moved, or was removed
MAX_BODY = 1 << 16  # a delivery is a few hundred bytes
NAME = "tripcast-reload"


def signature_problem(secret: str, headers: dict[str, str | None], body: bytes, now: float | None = None) -> str | None:
    """Why a delivery's signature does not hold (None if it does)."""
    signature, timestamp, delivery_id = (headers.get(h.lower()) for h in (SIGNATURE, TIMESTAMP, DELIVERY_ID))
    if not (signature and timestamp and delivery_id):
        return f"a signed webhook needs the {SIGNATURE}, {TIMESTAMP} and {DELIVERY_ID} headers"
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return f"{TIMESTAMP} is not a Unix time"
    if age > TOLERANCE_SECONDS:
        return f"webhook timestamp is {age:.0f} s off (more than {TOLERANCE_SECONDS} s)"
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    if not hmac.compare_digest(signature.encode(), b"v1," + base64.b64encode(digest)):
        return "webhook signature does not match (is the webhook's secret TRIPCAST_ADMIN_TOKEN?)"
    return None


def subscribe(client: MlflowClient, url: str, secret: str) -> Webhook:
    """The registry's webhook ``tripcast-reload``, made or updated to POST every alias change to ``url``,
    signed with ``secret``."""
    page = client.list_webhooks()
    while True:
        existing = next((w for w in page if w.name == NAME), None)
        if existing is not None or not page.token:
            break
        page = client.list_webhooks(page_token=page.token)
    if existing is not None:
        return client.update_webhook(existing.webhook_id, url=url, events=EVENTS, secret=secret, status="ACTIVE")
    return client.create_webhook(NAME, url, EVENTS, description="tripcast: the API checks the registry now",
                                 secret=secret)
