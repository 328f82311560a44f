"""JaxclfError: the one base of every error a user can act on.

Each subsystem raises its own subclass (ConfigError, DataError, ModelDirectoryError, WeightsError,
HFCheckpointError, RegistryError, InferenceError, ...) with a message that names the offending value
and what is accepted. Every CLI command turns any JaxclfError into one line on stderr and exit
status 2 (jaxclf.cli), so a user mistake never ends in a traceback.

JAX-free and import-free, so every module (torch_ref included) can depend on it.
"""


class JaxclfError(Exception):
    """A problem the user can fix: bad input, a wrong path, a refused file, a bad setting."""
