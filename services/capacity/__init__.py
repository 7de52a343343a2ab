"""``eta-capacity``: a sizing table for a traffic profile from measured per-unit costs (docs/capacity.md)."""
