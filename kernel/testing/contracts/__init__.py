"""Contract suites: reusable pytest classes every implementation of a capability passes.

Subclass one as ``TestSomething(Contract)`` in your plugin's tests; pytest collects it
only then.
"""

from kernel.testing.contracts.transport import TransportContract

__all__ = ["TransportContract"]

from kernel.testing.contracts.backend import BackendContract  # noqa: E402
from kernel.testing.contracts.pool import PoolContract  # noqa: E402
from kernel.testing.contracts.serializer import SerializerContract  # noqa: E402

__all__ += ["BackendContract", "PoolContract", "SerializerContract"]
