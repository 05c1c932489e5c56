"""Contract suites: reusable pytest classes every implementation of a capability passes.

Subclass one as ``TestSomething(Contract)`` in your plugin's tests; pytest collects it
only then.
"""

from kernel.testing.contracts.transport import TransportContract

__all__ = ["TransportContract"]
