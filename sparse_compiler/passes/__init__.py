"""Graph passes: analyze (find candidates) and rewrite (replace chosen nodes with block-sparse ops)."""
