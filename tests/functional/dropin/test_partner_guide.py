"""The partner guide's own token examples (PARTNER-GUIDE.md), as written there except for the host and
the secret (the caller's key in place of the app secret), run against a broker serving TLS."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

from tests.functional.conftest import APP_ID, TENANT_A, TENANT_B, World
from tests.functional.dropin.conftest import (
    GUIDE_V1_RESOURCE,
    GUIDE_V2_RESOURCE,
    StartTlsBroker,
    clean_env,
)

# The guide's Python example (v1 endpoint, resource=), verbatim but for the host in `url` and the three
# values pasted in. It trusts the CA as any urllib program does: SSL_CERT_FILE.
GUIDE_PYTHON = """
import json
import urllib.request
import urllib.parse

tenantId = '{tenant}' # Paste your own tenant ID here
appId = '{app}' # Paste your own app ID here
appSecret = '{secret}' # Paste your own app secret here

url = "https://{host}/%s/oauth2/token" % (tenantId)

resourceAppIdUri = 'https://api.securitycenter.windows.com'

body = {{
    'resource' : resourceAppIdUri,
    'client_id' : appId,
    'client_secret' : appSecret,
    'grant_type' : 'client_credentials'
}}

data = urllib.parse.urlencode(body).encode("utf-8")

req = urllib.request.Request(url, data)
response = urllib.request.urlopen(req)
jsonResponse = json.loads(response.read())
aadToken = jsonResponse["access_token"]
"""

# The guide's curl example (v2 endpoint, scope=), verbatim but for the host and the three values.
GUIDE_CURL = (
    'curl -X POST -H "Content-Type:application/x-www-form-urlencoded" -d "grant_type=client_credentials" '
    '-d "client_id={app}" -d "scope=https://securitycenter.onmicrosoft.com/windowsatpservice/.default" '
    '-d "client_secret={secret}" "https://{host}/{tenant}/oauth2/v2.0/token" -k'
)


def test_guide_python_urllib_snippet_v1(guide_world: World, start_tls_broker: StartTlsBroker) -> None:
    """The guide's urllib snippet gets a v1 token for its resource from the broker, trusting the
    broker's CA through SSL_CERT_FILE like any urllib program."""
    world = guide_world
    broker = start_tls_broker(world.broker_config(), world.env)
    snippet = GUIDE_PYTHON.format(
        tenant=TENANT_A, app=APP_ID, secret=world.soar_key, host=f"127.0.0.1:{broker.port}"
    )
    result = subprocess.run(
        [sys.executable, "-c", snippet + "\nprint(json.dumps(jsonResponse))\n"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(SSL_CERT_FILE=str(broker.ca_file)),
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    response = json.loads(result.stdout)
    claims = world.emulator.verify_token(response["access_token"], GUIDE_V1_RESOURCE)
    assert (TENANT_A, ["Machine.Read.All"]) == (claims["tid"], claims["roles"])
    assert str(claims["exp"]) == response["expires_on"]
    assert ["oauth2_v1"] == [line["surface"] for line in broker.audit_lines()]


def test_guide_curl_command_v2(guide_world: World, start_tls_broker: StartTlsBroker) -> None:
    """The guide's curl command (with its -k) gets a v2 token for the WindowsDefenderATP scope; so
    does the README's version of it, which verifies the broker's certificate (--cacert) instead."""
    world = guide_world
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test"
    broker = start_tls_broker(world.broker_config(), world.env)
    as_written = GUIDE_CURL.format(
        app=APP_ID, secret=world.soar_key, host=f"127.0.0.1:{broker.port}", tenant=TENANT_B
    )
    verified = as_written.removesuffix(" -k") + f" --cacert {broker.ca_file}"
    tokens = []
    for command in (as_written, verified):
        result = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=60, env=clean_env(), check=False
        )
        assert 0 == result.returncode, result.stderr
        response = json.loads(result.stdout)
        assert {"token_type", "expires_in", "ext_expires_in", "access_token"} == set(response)
        tokens.append(response["access_token"])
    claims = world.emulator.verify_token(tokens[0], GUIDE_V2_RESOURCE)
    assert (TENANT_B, ["Alert.Read.All"]) == (claims["tid"], claims["roles"])
    assert tokens[0] == tokens[1]
    assert ["oauth2_v2", "oauth2_v2"] == [line["surface"] for line in broker.audit_lines()]
