"""tapui's engine: sandbox, userspace network stack, TLS interception, HTTP decoding, exports.

Nothing here imports the UI (textual or tapui).
"""
