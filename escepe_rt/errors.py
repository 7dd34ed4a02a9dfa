"""The one error type for bad model files."""

from __future__ import annotations


class FormatError(ValueError):
    """A .escepe file is not valid: corrupt, truncated, hostile or of an unknown version.

    `field` is the schema path of the offending item (e.g. "nodes[3].inputs"),
    `offset` the byte offset in the file where it lies, when known.
    """

    def __init__(self, message: str, field: str | None = None, offset: int | None = None):
        self.reason = message  # without the location prefix
        self.field = field
        self.offset = offset
        where = []
        if field:
            where.append(field)
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{' @ '.join(where)}: {message}" if where else message)
