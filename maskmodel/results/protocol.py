"""Which Delta protocol features a results table may have: those the installed ``deltalake`` can honour.

Another writer (Spark, Databricks, a newer delta-rs) may enable features on the table, such as
``deletionVectors`` or ``columnMapping``, that this ``deltalake`` cannot read with its pyarrow reader, or
writer features (``checkConstraints``...) that its writer does not enforce. The jobs check this before any
work (:func:`maskmodel.results.readers.open_results` for reading, ``check_output`` for writing), so a run is
never scored into a table that cannot be read back.
"""

from __future__ import annotations

from maskmodel.errors import UserError


def unsupported_features(table, *, write: bool) -> list[str]:
    """The Delta protocol features of ``table`` that the installed ``deltalake`` cannot honour, sorted.

    Reader features (e.g. ``deletionVectors``, ``columnMapping``) that its
    pyarrow reader does not support, a reader version above its maximum, and
    with ``write`` the writer features (e.g. ``checkConstraints``) its writer
    does not enforce. ``[]``: every job can read (and write) the table.
    """
    from deltalake import table as dt_table

    protocol = table.protocol()
    out = set()
    if protocol.min_reader_version > dt_table.MAX_SUPPORTED_READER_VERSION:
        out.add(f"reader version {protocol.min_reader_version}")
    out |= set(protocol.reader_features or ()) - set(dt_table.SUPPORTED_READER_FEATURES)
    if write:
        if protocol.min_writer_version > dt_table.MAX_SUPPORTED_PYARROW_WRITER_VERSION:
            out.add(f"writer version {protocol.min_writer_version}")
        out |= set(protocol.writer_features or ()) - set(dt_table.SUPPORTED_WRITER_FEATURES)
    return sorted(out)


def check_protocol(table, uri: str, *, write: bool) -> None:
    """Raise :class:`UserError` naming the features when :func:`unsupported_features` finds any."""
    missing = unsupported_features(table, write=write)
    if missing:
        import deltalake

        raise UserError(f"The Delta table {uri!r} has the protocol feature(s) {', '.join(missing)}, which the "
                        f"installed deltalake {deltalake.__version__} cannot {'honour when writing' if write else 'read'}"
                        f"; score into another --output (or upgrade deltalake, if a newer one supports them).")
