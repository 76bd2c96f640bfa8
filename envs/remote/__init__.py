"""Environments over HTTP: `server.EnvServer` serves any registered environment, and the `http`
environment (`client.RemoteEnv`) plays one from any process. The protocol (version 1, JSON over
HTTP with a bearer token) is documented in docs/agents.md, so that a server may be written in
any language; these are its names."""

PROTOCOL_VERSION = 1
#: Every path starts here.
PREFIX = f"/v{PROTOCOL_VERSION}"
#: The environment variable that holds the bearer token unless told otherwise.
TOKEN_ENV = "EMPG_ENV_TOKEN"
#: The shortest bearer token a server takes.
MIN_TOKEN_CHARS = 16
#: The largest request body the server reads (bytes).
MAX_BODY_BYTES = 64 * 1024
#: The longest action the server takes (characters).
MAX_ACTION_CHARS = 4096
#: Error types a server reports: `EnvCrashed` (status 503) is a crash the client retries on a
#: fresh episode; every other error stops the run.
CRASHED = "EnvCrashed"
