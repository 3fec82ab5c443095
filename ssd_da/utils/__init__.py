"""ssd_da.utils."""
