"""Fault tests on the real processes of the local stack (issue 15): parts killed mid-work, outages of
NATS and the object store, lost work messages; every accepted session must still reach READY."""
