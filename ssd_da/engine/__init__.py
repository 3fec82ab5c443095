"""ssd_da.engine."""
