"""ssd_da.data."""
