"""Reading objects: the one storage layer and everything that turns stored bytes into images.

Owns: URIs to filesystems (:mod:`.storage`: local, s3://, gs://, memory://, one-sentence errors),
concurrent, streamed and ranged reads (:mod:`.fetch`), tar / zip members read without unpacking
(:mod:`.archives`; members named by :mod:`.members`), strict decoding at a reduced size (:mod:`.decode`), the ``(path, version)``
identity of an object (:mod:`.objectkeys`), and a loopback latency proxy for benchmarks and tests
(:mod:`.latency_proxy`), and presigned URLs with the end of the credentials that sign them (:mod:`.signing`).

May import: the shared pieces at the top of ``maskmodel`` (errors, config...) and third-party
libraries; nothing of data, models, results, train, score or study, which all read through this layer.
"""
