"""The test session's credentials, distinctive so that a test can search everything the
system wrote for them (tests/_leaks.py). tests/conftest.py puts the MLflow account in
every test's environment, as a deployment's pods get theirs from Secrets; the session's
`mlflow server` runs MLflow's basic-auth app and this is its pipeline account."""
from __future__ import annotations

import secrets

SESSION_CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "mar3d-pipeline",
                       "MLFLOW_TRACKING_PASSWORD": f"mlflow-pw-{secrets.token_hex(12)}"}
MLFLOW_ADMIN_PASSWORD = f"mlflow-admin-{secrets.token_hex(12)}"
