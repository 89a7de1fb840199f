"""The widgets of the tapui app, one per module."""
