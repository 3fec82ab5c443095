"""Multi-seed ablations and attention comparisons (the DA paper, Tables I-III): runner, statistics, reports."""
