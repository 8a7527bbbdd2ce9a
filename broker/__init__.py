"""token-broker: hands internal callers Entra ID app tokens for customer tenants from one endpoint."""

__version__ = "0.1.0"
