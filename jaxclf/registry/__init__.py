"""The model registry: immutable, hashed model versions with aliases, lineage and an audit log.

    from jaxclf.registry import Registry
    reg = Registry("/srv/jaxclf-registry")
    v = reg.register("runs/default/model", name="sentiment")   # -> sentiment@v1
    reg.promote("sentiment", v.version, to="production")
    reg.resolve("sentiment@production")                        # -> the version's model directory

    names.py       name, alias and tag rules; Ref (NAME@vN, NAME@ALIAS)
    store.py       hashed read-only copies under models/, work directories under tmp/, verification
    index.py       the SQLite index: schema, transactions, rows; ModelVersion and Event
    archive.py     export/import of one version as a .tar.gz, bounded by ImportLimits
    contents.py    what a version's files must be, checked before it is committed
    provenance.py  who, when, which jaxclf commit, which data files
    core.py        Registry, composing the above
    comparison.py  compare(): two versions' metrics and settings side by side

JAX-free: the registry only moves files and rows. `jaxclf registry ...` (jaxclf.cli.registry) is
its command line; this package never imports the CLI.
"""

from jaxclf.registry.archive import ImportLimits
from jaxclf.registry.comparison import compare
from jaxclf.registry.core import Registry
from jaxclf.registry.errors import (ConflictError, InvalidNameError, NotFoundError, ReadOnlyRegistryError,
                                    RegistryError, TamperedVersionError, UnsafeArchiveError)
from jaxclf.registry.index import Event, ModelVersion
from jaxclf.registry.names import (Ref, check_alias, check_description, check_name, check_tags, parse_tag, printable,
                                   version_ref)
from jaxclf.registry.provenance import current_user, data_fingerprint, git_commit
from jaxclf.registry.store import content_hash, file_sha256, manifest_hash, model_files

__all__ = ["ConflictError", "Event", "ImportLimits", "InvalidNameError", "ModelVersion", "NotFoundError",
           "ReadOnlyRegistryError", "Ref", "Registry", "RegistryError", "TamperedVersionError", "UnsafeArchiveError",
           "check_alias", "check_description", "check_name", "check_tags", "compare", "content_hash",
           "current_user", "data_fingerprint", "file_sha256", "git_commit", "manifest_hash", "model_files",
           "parse_tag", "printable", "version_ref"]
