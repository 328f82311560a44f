"""The model registry: immutable, hashed model versions with aliases, lineage and an audit log.

    from jaxclf.registry import Registry
    reg = Registry("/srv/jaxclf-registry")
    v = reg.register("runs/default/model", name="sentiment")   # -> sentiment@v1
    reg.promote("sentiment", v.version, to="production")
    reg.resolve("sentiment@production")                        # -> the version's model directory

JAX-free: the registry only moves files and rows. `jaxclf registry ...` is its command line.
"""

from jaxclf.registry.index import (ConflictError, Event, InvalidNameError, ModelVersion, NotFoundError, Ref,
                                   Registry, RegistryError, TamperedVersionError, UnsafeArchiveError,
                                   check_alias, check_description, check_name, check_tags, content_hash,
                                   current_user, data_fingerprint, file_sha256, git_commit, manifest_hash,
                                   model_files, parse_tag, version_ref)

__all__ = ["ConflictError", "Event", "InvalidNameError", "ModelVersion", "NotFoundError", "Ref", "Registry",
           "RegistryError", "TamperedVersionError", "UnsafeArchiveError", "check_alias", "check_description",
           "check_name", "check_tags", "content_hash", "current_user", "data_fingerprint", "file_sha256",
           "git_commit", "manifest_hash", "model_files", "parse_tag", "version_ref"]
