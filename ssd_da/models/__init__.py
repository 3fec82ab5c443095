"""ssd_da.models."""
