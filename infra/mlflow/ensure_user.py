"""Create or update the pipeline's account on the MLflow tracking server (basic auth).

Run by the one-shot compose service ``mlflow-users`` once the server is healthy, as the
admin (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``): the account
``SYNTHDX_MLFLOW_USERNAME`` gets the password ``SYNTHDX_MLFLOW_PASSWORD``, created if missing,
reset if present, so rotating it is an edit of infra/.env and ``docker compose up -d``. The
Prefect workers log as this account, never as the admin.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol

REQUIRED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "SYNTHDX_MLFLOW_USERNAME", "SYNTHDX_MLFLOW_PASSWORD")


class AuthClient(Protocol):
    """The calls used of MLflow's ``AuthServiceClient`` (``get_app_client("basic-auth")``)."""

    def get_user(self, username: str) -> Any:
        """Return the user; raise a RestException RESOURCE_DOES_NOT_EXIST if there is none."""

    def create_user(self, username: str, password: str) -> Any:
        """Create the user."""

    def update_user_password(self, username: str, password: str) -> None:
        """Set the user's password (as an admin)."""


def ensure_user(client: AuthClient, username: str, password: str) -> str:
    """Make ``username`` exist with ``password`` on the server; return what was done.

    Args:
        client: the server's auth client, signed in as an admin.
        username: the account to create or update.
        password: its password (the server requires at least 12 characters).

    Returns:
        ``"created"`` or ``"updated"``.

    Raises:
        mlflow.exceptions.MlflowException: the server refused (bad admin credentials, a too
            short password, ...).
    """
    try:
        client.get_user(username)
    except Exception as exc:  # mlflow's RestException, matched by its code
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        return "created"
    client.update_user_password(username, password)
    return "updated"


def main() -> int:
    """Entry point: check the environment, ensure the account, report in one line."""
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        print(f"ensure_user: error: not set: {', '.join(missing)}", file=sys.stderr)
        return 2
    username = os.environ["SYNTHDX_MLFLOW_USERNAME"]
    if username == os.environ["MLFLOW_TRACKING_USERNAME"]:
        print(f"ensure_user: error: the pipeline account {username!r} must not be the admin",
              file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    try:
        done = ensure_user(client, username, os.environ["SYNTHDX_MLFLOW_PASSWORD"])
    except MlflowException as exc:
        print(f"ensure_user: error: {username}: {exc.message}", file=sys.stderr)
        return 1
    print(f"ensure_user: MLflow account {username} {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
