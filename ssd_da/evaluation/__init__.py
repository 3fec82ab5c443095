"""ssd_da.evaluation."""
