"""The Helm chart and the broker agree: what the rendered Deployment sets, the broker honours.

Rendering needs helm: ``make deploy-check`` (part of ``make test``) installs it into .tools/bin; without
it these tests are skipped (deploy/validate.sh checks the rendered objects on its own as well).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import parse_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "token-broker"
VALUES = ROOT / "deploy" / "helm-values"
HELM = shutil.which("helm", path=f"{ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
needs_helm = pytest.mark.skipif(HELM is None, reason="helm is not installed (make deploy-check installs it)")


def rendered_container(values_file: Path, helm_home: Path) -> dict[str, Any]:
    """The broker container of the Deployment ``helm template`` renders with ``values_file`` (helm's
    cache and config kept in ``helm_home``, away from the user's)."""
    assert HELM is not None
    env = {**os.environ, "HELM_CACHE_HOME": str(helm_home / "cache"), "HELM_CONFIG_HOME": str(helm_home)}
    rendered = subprocess.run(
        [HELM, "template", "tb", str(CHART), "-f", str(values_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    ).stdout
    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


@needs_helm
def test_existing_secret_config_listens_on_all_interfaces_and_trusts_the_extra_ca(tmp_path: Path) -> None:
    """With config.existingSecret the broker reads the user's own broker.yaml, which may say nothing of
    listen or outbound_ca_file: the env the chart sets makes that config listen on 0.0.0.0 at the
    container ports (where the probes and the Service look) and trust the mounted extra CA."""
    values_file = VALUES / "existing-config-secret.yaml"
    values = yaml.safe_load(values_file.read_text(encoding="utf-8"))
    container = rendered_container(values_file, tmp_path)
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    user_config = {
        "apps": {
            "defender": {
                "client_id": "11111111-2222-3333-4444-555555555555",
                "credential": {"file": "/mnt/secrets/defender"},
                "resources": ["https://api.security.microsoft.com"],
            }
        },
        "callers": {"soar": {"api_key_sha256": "a" * 64, "tenants": ["*"], "apps": ["defender"]}},
    }
    settings = parse_settings(user_config, environ=env, check_files=False)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    ca_file = f"{values['extraCA']['mountPath']}/{values['extraCA']['key']}"
    assert ("0.0.0.0", ports["http"], "0.0.0.0", ports["metrics"], ca_file) == (  # noqa: S104 - expected
        settings.listen.host,
        settings.listen.port,
        settings.metrics.host,
        settings.metrics.port,
        str(settings.outbound_ca_file),
    )
    assert values["extraCA"]["mountPath"] in [mount["mountPath"] for mount in container["volumeMounts"]]
