"""The Helm chart's secretless value set: the projected token the broker is told to read is the one the
chart mounts, with the token-exchange audience, and the rendered configuration passes the broker's own
validation. Skipped without helm (``make deploy-check`` installs it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from broker.config import parse_settings
from tests.test_deploy import CHART, HELM, VALUES, needs_helm


@needs_helm
def test_projected_token_is_mounted_where_the_app_credential_reads_it(tmp_path: Path) -> None:
    """federatedToken.enabled projects a service-account token (audience api://AzureADTokenExchange,
    at most a day) at the path config.apps.mde.credential.federated.token_file names."""
    assert HELM is not None
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp_path / "cache"), "HELM_CONFIG_HOME": str(tmp_path)}
    rendered = subprocess.run(
        [HELM, "template", "tb", str(CHART), "-f", str(VALUES / "secretless.yaml")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    ).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "federated-token"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "federated-token"]
    (source,) = volume["projected"]["sources"]
    settings = parse_settings(
        yaml.safe_load(config_map["data"]["broker.yaml"]), environ={}, check_files=False
    )
    token_file = settings.apps["mde"].credential.federated
    assert token_file is not None
    assert f"{mount['mountPath']}/{source['serviceAccountToken']['path']}" == str(token_file.token_file)
    assert ("api://AzureADTokenExchange", 3600) == (
        source["serviceAccountToken"]["audience"],
        source["serviceAccountToken"]["expirationSeconds"],
    )
    assert ["federated", "key_vault_key", "federated"] == [
        settings.apps[name].credential.kind for name in ("defender", "graph", "mde")
    ]
