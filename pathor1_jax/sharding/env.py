"""The environment variables that tell a process which multi-process job it is in (read by
`multihost.maybe_initialize_distributed`, set by the launchers). Apart from jax, so that a launcher
(`launch.local`) starts without importing it."""

# Set by launch/gpu.sh and launch.local (and usable by hand) for an explicit cluster.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Set by launch/tpu_pod.sh: JAX finds the other TPU workers itself.
MULTIHOST_ENV = "PATHOR1_MULTIHOST"
# Seconds without a heartbeat after which the coordinator declares a process dead and every other
# process stops with an error (JAX's default, 100 s, when unset; launch/local.sh sets 60).
HEARTBEAT_ENV = "PATHOR1_HEARTBEAT_TIMEOUT_S"
