"""What a person reads: `inspect`'s text, the GitHub issue snippet and the rendered scripts.

Rule (tested): never imports capture or the CLI. Every string shown here
that comes from an archive is hostile and is escaped before it is printed.
"""
