"""The pure core: wire protocol, codecs, chunking, model transfer, signing and secure
aggregation (secagg/).

Nothing here opens a socket, a file or a thread; the transport, storage and both sides
build on it. import-linter keeps it that way (pyproject.toml).
"""
