// Partner code in JavaScript, pointed at the broker: the unmodified Azure SDK clients, configured as
// tests/functional/dropin/test_node_clients.py says (the broker's host, the caller's key in place of
// the app secret). Trust comes from NODE_EXTRA_CA_CERTS, as for any private CA.
//
//   node get-token.mjs client-secret     @azure/identity ClientSecretCredential
//   node get-token.mjs msal-node         @azure/msal-node ConfidentialClientApplication
//   node get-token.mjs managed-identity  @azure/identity ManagedIdentityCredential (IDENTITY_ENDPOINT/_HEADER)
//
// Settings come from the environment: BROKER_URL, TENANT_ID, CLIENT_ID, CALLER_KEY, SCOPE.
// Prints one JSON line: {"token", "expiresOnTimestamp"} or {"error"}.
import { ClientSecretCredential, ManagedIdentityCredential } from "@azure/identity";
import { ConfidentialClientApplication } from "@azure/msal-node";

const { BROKER_URL, TENANT_ID, CLIENT_ID, CALLER_KEY, SCOPE } = process.env;

async function clientSecret() {
  const credential = new ClientSecretCredential(TENANT_ID, CLIENT_ID, CALLER_KEY, {
    authorityHost: BROKER_URL,
    disableInstanceDiscovery: true,
  });
  return credential.getToken(SCOPE);
}

async function msalNode() {
  const app = new ConfidentialClientApplication({
    auth: {
      clientId: CLIENT_ID,
      clientSecret: CALLER_KEY,
      authority: `${BROKER_URL}/${TENANT_ID}`,
      knownAuthorities: [BROKER_URL],
    },
  });
  const result = await app.acquireTokenByClientCredential({ scopes: [SCOPE] });
  return { token: result.accessToken, expiresOnTimestamp: result.expiresOn.getTime() };
}

async function managedIdentity() {
  return new ManagedIdentityCredential().getToken(SCOPE);
}

const modes = { "client-secret": clientSecret, "msal-node": msalNode, "managed-identity": managedIdentity };

try {
  const token = await modes[process.argv[2]]();
  console.log(JSON.stringify({ token: token.token, expiresOnTimestamp: token.expiresOnTimestamp }));
} catch (error) {
  console.log(JSON.stringify({ error: String(error && error.message ? error.message : error) }));
  process.exitCode = 1;
}
