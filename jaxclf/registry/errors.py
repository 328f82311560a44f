"""The registry's errors: one RegistryError (a JaxclfError) and a subclass per kind of refusal."""

from jaxclf.errors import JaxclfError


class RegistryError(JaxclfError, ValueError):
    """Something the user asked of the registry cannot be done; the message says why and what is accepted."""


class InvalidNameError(RegistryError):
    """A model name, alias, tag or description breaks the naming rules."""


class NotFoundError(RegistryError):
    """No such model, version or alias."""


class ConflictError(RegistryError):
    """The operation conflicts with the registry's state (e.g. deleting a version an alias points at)."""


class TamperedVersionError(RegistryError):
    """A stored version's files no longer match the hash recorded when it was registered."""


class UnsafeArchiveError(RegistryError):
    """An export archive holds something import refuses: absolute paths, '..', links, unknown files, sparse or
    oversized members, a malformed manifest."""


class ReadOnlyRegistryError(RegistryError):
    """A change was asked of a registry opened read-only (read_only=True, or a directory it cannot write)."""
