"""tapui: see every HTTP(S) exchange a command makes, live, in a terminal UI."""

__version__ = "0.1.0"
