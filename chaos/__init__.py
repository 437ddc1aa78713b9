"""`make chaos`: fault scenarios against the real relay (see chaos/__main__.py)."""
