"""Test-session settings. Prefect's flow-run logs are not shipped to its API during tests: no test reads them, and
a log worker holding records for a server a test has already stopped retries them at interpreter exit for hours
(the session never ends). Events still flow: triggers (``rooflab.data.arrived``) need them."""

import os

os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
